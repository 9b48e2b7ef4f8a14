"""The whole study on the toy world, offline on a CPU: ``python -m cmdistill.demo``.

1. build (or reuse) the toy world: captioned shape images, a trained SDXL-architecture teacher,
   a toy metric encoder (``cmdistill.toy``);
2. precompute the training set's latents and text embeddings (``cmdistill.precompute``);
3. teacher references with ``test_teacher.py`` (DDIM on the N-grid, guidance w);
4. for each seed, distill a CM (``train_cm.py``) and a Direct CM (``train_direct_cm.py``) with the
   same recipe and budget, and evaluate each with ``test.py`` at 1/2/4 steps;
5. the table of ``cmdistill.results`` (every metric, mean and spread over seeds), its plots (ODE error
   against toy FD, metrics against sampling steps, training losses) and a picture of teacher / CM /
   Direct CM samples from the same noise, captions under the columns.

Every stage runs the project's own command-line programs with the arguments a user would give them, in
worker processes that import the libraries once (``cmdistill.toy.runner``: one worker per core, one torch thread
each, stages side by side where they do not depend on each other); ``logs/`` holds each program's output
after the command that reproduces it. A rerun reuses what is finished. Toy metrics are named as such: ``toy
FD`` is the Frechet distance of the toy encoder's features (to the teacher's samples for students, to real
images for the teacher), ``caption acc.`` the fraction of caption attributes the toy classifier finds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import results, summary
from .errors import exit_on_user_error
from .toy.calls import (eval_call, precompute_call, recipe_parser, reference_folder, teacher_call, train_call, trained,
                        world_call)
from .toy.runner import Job, Workers, default_workers, run_jobs

OBJECTIVES = (("direct_cm", "Direct CM"), ("cm", "CM"))  # the longer runs first, when they run side by side


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmdistill.demo", description=__doc__, parents=[recipe_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--max_train_steps", type=int, default=150)
    p.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4])
    return p


def workers_for(a, jobs: int) -> int:
    return min(default_workers(), jobs) if a.workers is None else a.workers


# ---------------------------------------------------------------------------------------------
# The findings


def verdict(rows: list[dict], steps_list: list[int]) -> list[str]:
    """Plain statements of the finding, per number of sampling steps (rows of ``results.collect``): seed means,
    and in how many seeds the comparison goes the same way."""
    def by_steps(key, lower_is_better=True):
        return {c["steps"]: c for c in summary.compare(rows, key, lower_is_better)}

    ode, fd, acc = by_steps("ode_error"), by_steps("fd_toy"), by_steps("toy_caption_acc", lower_is_better=False)
    out = []
    for k in steps_list:
        parts = []
        if k in ode:
            c = ode[k]
            parts.append(f"Direct CM's ODE error is {'LOWER' if c['a'] < c['b'] else 'HIGHER'} than CM's "
                         f"({c['a']:.4g} vs {c['b']:.4g}; lower in {c['better']} of {c['n']} seeds)")
        if k in fd:
            c = fd[k]
            parts.append(f"its toy FD is {'WORSE' if c['a'] > c['b'] else 'BETTER'} ({c['a']:.4g} vs {c['b']:.4g}; "
                         f"better in {c['better']} of {c['n']} seeds)")
        if k in acc:
            c = acc[k]
            parts.append(f"its caption accuracy is {'WORSE' if c['a'] < c['b'] else 'BETTER'} "
                         f"({c['a']:.3f} vs {c['b']:.3f}; better in {c['better']} of {c['n']} seeds)")
        if parts:
            out.append(f"{k} step{'s' if k > 1 else ''}: " + "; ".join(parts) + ".")
    return out


def picture(out: Path, teacher_dir: Path, runs: dict, steps_list: list[int], n: int = 8, size: int = 96) -> Path:
    """Rows: teacher, then CM and Direct CM at each step count (first seed); columns: captions, written under
    them."""
    from .evaluation.scoring import captioned_grid
    from .evaluation.store import CAPTIONS_NAME

    rows = [("teacher", teacher_dir)]
    for k in steps_list:
        for name, folder in runs.items():
            sub = list((folder / "train_gen_images").glob(f"*/{k}_steps"))
            if sub:
                rows.append((f"{name} {k}", sub[0]))

    def sample(folder: Path, i: int) -> Path:
        return next((p for p in (folder / f"{i}.jpg", folder / f"{i}.png") if p.is_file()), folder / f"{i}.jpg")

    captions_file = teacher_dir / CAPTIONS_NAME
    captions = json.loads(captions_file.read_text()) if captions_file.is_file() else []
    n = min([n] + [sum(1 for i in range(n) if sample(f, i).is_file()) for _, f in rows])
    grid = captioned_grid([[sample(f, i) for i in range(n)] for _, f in rows], captions[:n], size,
                          row_labels=[label for label, _ in rows], label_width=90, max_lines=6)
    path = out / "comparison.png"
    grid.save(path)
    return path


@exit_on_user_error
def main(argv=None):
    a = parser().parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    (out / "demo_config.json").write_text(json.dumps(vars(a), indent=2))
    N, w, steps = a.num_discr_timesteps, a.w, a.max_train_steps
    precomputed, tdir = out / "precomputed", out / "teacher"
    ref = reference_folder(tdir, N, w)
    names = dict(OBJECTIVES)

    # The jobs: each program call with the jobs it waits for (precompute and references side by side, then the
    # runs, each evaluated as soon as it and the references are done).
    jobs = []
    build = world_call(a, logs / "world.log")
    if build is not None:
        jobs.append(Job("world", [build]))
    jobs += [Job("precompute", [precompute_call(a, precomputed, logs / "precompute.log")], ("world",)),
             Job("teacher", [teacher_call(a, tdir, N, w, logs / "teacher.log")], ("world",))]
    runs = {}
    for seed in a.seeds:
        for obj, _ in OBJECTIVES:
            runs[(obj, seed)] = out / f"{obj}_seed{seed}"
    for (obj, seed), rdir in runs.items():
        if not trained(rdir, steps):
            jobs.append(Job(f"train_{obj}_{seed}", [train_call(a, rdir, obj, seed, steps, N, w, precomputed,
                                                                logs / f"{rdir.name}.log")], ("precompute",)))
    for (obj, seed), rdir in runs.items():
        jobs.append(Job(f"eval_{obj}_{seed}", [eval_call(a, rdir, ref, a.num_inference_steps,
                                                         logs / f"{rdir.name}.log")], (f"train_{obj}_{seed}", "teacher")))
    n_workers = workers_for(a, 2 * len(a.seeds))
    print(f"cmdistill demo: toy world {a.world}, outputs in {out} (program logs: {logs}); {n_workers or 'no'} "
          f"worker process{'es' if n_workers != 1 else ''}, {a.threads} torch thread{'s' if a.threads > 1 else ''} "
          "each", flush=True)
    if build is None:
        print(f"[1/5] toy world present in {a.world}", flush=True)

    def what(job):
        name = job.name
        if name == "world":
            return "[1/5] toy world (python -m cmdistill.toy build: present stages are reused)"
        if name == "precompute":
            return "[2/5] precomputing latents and text embeddings"
        if name == "teacher":
            return (f"[3/5] teacher references: {a.num_prompts} captions, {a.solver.upper()}, N = {N}, w = {w}")
        kind, obj, seed = name.split("_", 1)[0], name.split("_", 1)[1].rsplit("_", 1)[0], name.rsplit("_", 1)[1]
        if kind == "train":
            return f"[4/5] seed {seed}: {names[obj]}: {steps} steps of batch {a.train_batch_size}"
        return f"[4/5] seed {seed}: {names[obj]}: test.py at {', '.join(map(str, a.num_inference_steps))} steps"

    def started(job):
        print(f"{what(job)} ...", flush=True)

    def done(job, seconds):
        print(f"      done in {sum(seconds):.0f} s: {what(job)[6:]}", flush=True)

    with Workers(n_workers, a.threads) as pool:
        ran = run_jobs(pool, jobs, on_start=started, on_done=done)
    times = {name: round(sum(seconds), 1) for name, seconds in ran.items()}
    t_programs = time.time() - t0

    # 5. the table, its plots and the picture.
    folders = [tdir] + [runs[(obj, seed)] for obj in ("cm", "direct_cm") for seed in a.seeds]
    table_rows = [r for r in results.collect([str(f) for f in folders])
                  if r.get("kind") == "teacher" or r.get("num_inference_steps") in a.num_inference_steps]
    text = results.format_table(table_rows, "markdown")
    files = results.write_report(table_rows, out)
    lines = verdict(table_rows, a.num_inference_steps)
    pic = picture(out, ref, {"CM": runs[("cm", a.seeds[0])], "Direct CM": runs[("direct_cm", a.seeds[0])]},
                  a.num_inference_steps)
    total = time.time() - t0
    figures = "".join(f"![{name}]({name})\n" for name in ("ode_error_vs_fd.png", "comparison.png")
                      if (out / name).is_file())
    others = ", ".join(n for n in files if n.endswith(".png") and n != "ode_error_vs_fd.png")
    report = (f"{text}\n\n" + "\n".join(lines) + f"\n\n{figures}\npicture: {pic}; plots: ode_error_vs_fd.png"
              + (f", {others}" if others else "")
              + f"\nprogram seconds ({n_workers or 1} worker{'s' if n_workers > 1 else ''} side by side, "
              f"{a.threads} thread{'s' if a.threads > 1 else ''} each): " + json.dumps(times)
              + f"\nwall seconds: programs {t_programs:.0f}, table and plots {total - t_programs:.0f}"
              + f"\ntotal: {total / 60:.1f} min\n")
    (out / "RESULTS.md").write_text(report)
    rows_by = {}
    for r in table_rows:
        name = "Teacher" if r.get("kind") == "teacher" else names.get(r.get("method"), r.get("method"))
        rows_by.setdefault(f"{name}|{r.get('num_inference_steps')}", []).append(
            {**{k: v for k, v in r.items() if k not in ("recipe", "group")}, "seed": r.get("train_seed")})
    (out / "results.json").write_text(json.dumps({"rows": rows_by, "verdict": lines, "seconds": times,
                                                  "total_seconds": round(total, 1)}, indent=1, default=str))
    print("[5/5] results\n" + report, flush=True)


if __name__ == "__main__":
    main()
