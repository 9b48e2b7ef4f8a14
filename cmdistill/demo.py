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

Every stage runs the project's own command-line programs, exactly as a user would, and a rerun
reuses what is finished. Toy metrics are named as such: ``toy FD`` is the Frechet distance of
the toy encoder's features (to the teacher's samples for students, to real images for the
teacher), ``caption acc.`` the fraction of caption attributes the toy classifier finds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import results
from .errors import UserError, exit_on_user_error
from .summary import mean_spread

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmdistill.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="toy/world", help="toy world folder (built if missing)")
    p.add_argument("--reduced_world", action="store_true", help="build the small CI world if it must be built")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (spread of the table)")
    p.add_argument("--max_train_steps", type=int, default=150)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--num_discr_timesteps", type=int, default=10, help="N of the grid (paper: 100)")
    p.add_argument("--w", type=float, default=3.0, help="teacher guidance, Imagen form")
    p.add_argument("--solver", default="ddim", choices=["ddim", "euler", "heun"])
    p.add_argument("--num_prompts", type=int, default=256, help="captions of the evaluation")
    p.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--eval_seed", type=int, default=0, help="seed of the shared initial noise")
    p.add_argument("--threads", type=int, default=2)
    return p


def run(cmd: list, log: Path, env: dict) -> float:
    """Run one of the project's programs, its output appended to ``log``; returns seconds."""
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise UserError(f"{Path(str(cmd[1])).name} failed (exit {r.returncode}); see {log}:\n" + "\n".join(tail))
    return time.time() - t


def load_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def verdict(rows: dict, steps_list: list[int]) -> list[str]:
    """Plain statements of the finding, per number of sampling steps: seed means, and in how many
    seeds the comparison goes the same way."""
    out = []
    for k in steps_list:
        cm, dcm = rows.get(("CM", k)), rows.get(("Direct CM", k))
        if not cm or not dcm:
            continue

        def stat(key, lower_is_better=True):
            a = {e["seed"]: e.get(key) for e in dcm}
            b = {e["seed"]: e.get(key) for e in cm}
            seeds = [s for s in a if a[s] is not None and b.get(s) is not None]
            if not seeds:
                return None
            ma, mb = mean_spread([a[s] for s in seeds])[0], mean_spread([b[s] for s in seeds])[0]
            better = sum(1 for s in seeds if (a[s] < b[s]) == lower_is_better)
            return ma, mb, better, len(seeds)

        ode, fd, acc = stat("ode_error"), stat("fd_toy"), stat("toy_caption_acc", lower_is_better=False)
        parts = []
        if ode:
            parts.append(f"Direct CM's ODE error is {'LOWER' if ode[0] < ode[1] else 'HIGHER'} than CM's "
                         f"({ode[0]:.4g} vs {ode[1]:.4g}; lower in {ode[2]} of {ode[3]} seeds)")
        if fd:
            parts.append(f"its toy FD is {'WORSE' if fd[0] > fd[1] else 'BETTER'} ({fd[0]:.4g} vs {fd[1]:.4g}; "
                         f"better in {fd[2]} of {fd[3]} seeds)")
        if acc:
            parts.append(f"its caption accuracy is {'WORSE' if acc[0] < acc[1] else 'BETTER'} "
                         f"({acc[0]:.3f} vs {acc[1]:.3f}; better in {acc[2]} of {acc[3]} seeds)")
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
    out, world = Path(a.out), Path(a.world)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    py = sys.executable
    times = {}
    (out / "demo_config.json").write_text(json.dumps(vars(a), indent=2))
    print(f"cmdistill demo: toy world {world}, outputs in {out} (log: {log})", flush=True)

    # 1. the toy world.
    from .toy.build import world_paths

    P = world_paths(world)
    # The build skips every stage whose output is present with the same settings (the repository ships the
    # trained teacher and encoder; the images are regenerated from the seed in seconds).
    if all(p.exists() for p in (P["teacher"] / "model_index.json", P["encoder"], P["data"] / "metadata.csv")):
        print(f"[1/5] toy world present in {world}", flush=True)
        times["world"] = 0.0
    else:
        print("[1/5] toy world (python -m cmdistill.toy build: present stages are reused) ...", flush=True)
        times["world"] = run([py, "-m", "cmdistill.toy", "build", "--out", world,
                              *(["--reduced"] if a.reduced_world else [])], log, env)
    data, teacher, enc = P["data"], P["teacher"], P["encoder"]
    metric_flags = ["--dgm_metrics", "fd", "--dgm_models", "toy", "--instance_metrics", "toy_caption_acc",
                    "--metrics_weights_dir", enc]
    common = ["--pretrained_teacher_model", teacher, "--train_data_dir", data, "--resolution", 64,
              "--num_discr_timesteps", a.num_discr_timesteps, "--w", a.w, "--solver", a.solver]

    # 2. precompute latents + embeddings once (shared by every run).
    print("[2/5] precomputing latents and text embeddings ...", flush=True)
    times["precompute"] = run([py, "-m", "cmdistill.precompute", *common[:6], "--center_crop",
                               "--mixed_precision", "no", "--precomputed_dir", out / "precomputed"], log, env)

    # 3. teacher references.
    print(f"[3/5] teacher references: {a.num_prompts} captions, {a.solver.upper()}, N = {a.num_discr_timesteps}, "
          f"w = {a.w} ...", flush=True)
    tdir = out / "teacher"
    times["teacher"] = run([py, "test_teacher.py", "--pretrained_teacher_model", teacher, "--train_data_dir", data,
                            "--output_dir", tdir, "--resolution", 64, "--scheduler", a.solver,
                            "--num_original_inference_steps", a.num_discr_timesteps, "--guidance_scale", a.w,
                            "--max_prompts", a.num_prompts, "--seed", a.eval_seed, "--batch_size", 100,
                            "--vae_decode_batch_size", 100, *metric_flags], log, env)
    ref = tdir / "train_gen_images" / f"{a.num_discr_timesteps}_steps" / f"{a.w}_gscale"

    # 4. distill and evaluate, per seed and objective.
    runs, rows = {}, {}
    teacher_entries = [e for e in load_metrics(tdir).values()]
    rows[("Teacher", a.num_discr_timesteps)] = [{**e, "seed": a.eval_seed} for e in teacher_entries[-1:]]
    for seed in a.seeds:
        for obj, name in (("cm", "CM"), ("direct_cm", "Direct CM")):
            rdir = out / f"{obj}_seed{seed}"
            print(f"[4/5] seed {seed}: {name}: {a.max_train_steps} steps of batch {a.train_batch_size} ...",
                  flush=True)
            # A finished run (final weights of the last step) is reused as is: resuming would save them again.
            from .evaluation.weights import final_step

            done = ((rdir / "pytorch_lora_weights.safetensors").is_file()
                    and (final_step(rdir) or 0) >= a.max_train_steps)
            times[f"train_{obj}_{seed}"] = 0.0 if done else run(
                [py, f"train_{obj}.py", *common, "--output_dir", rdir, "--seed", seed, "--center_crop",
                 "--train_batch_size", a.train_batch_size, "--max_train_steps", a.max_train_steps,
                 "--learning_rate", a.learning_rate, "--lora_rank", a.lora_rank, "--lora_alpha", a.lora_rank,
                 "--checkpointing_steps", a.max_train_steps, "--validation_steps", 0, "--mixed_precision", "no",
                 "--precomputed_dir", out / "precomputed", "--resume_from_checkpoint", "latest"], log, env)
            times[f"eval_{obj}_{seed}"] = run(
                [py, "test.py", "--output_dir", rdir, "--train_data_dir", ref, "--num_inference_steps",
                 *a.num_inference_steps, "--max_prompts", a.num_prompts, "--batch_size", 100,
                 "--vae_decode_batch_size", 100, *metric_flags], log, env)
            if seed == a.seeds[0]:
                runs[name] = rdir
            for e in load_metrics(rdir).values():
                if e.get("num_inference_steps") in a.num_inference_steps:
                    rows.setdefault((name, e["num_inference_steps"]), []).append({**e, "seed": seed})

    # 5. the table, its plots and the picture.
    order = [("Teacher", a.num_discr_timesteps)] + [(n, k) for n in ("CM", "Direct CM") for k in a.num_inference_steps]
    rows = {k: rows[k] for k in order if k in rows}
    folders = [tdir] + [out / f"{obj}_seed{seed}" for obj in ("cm", "direct_cm") for seed in a.seeds]
    table_rows = [r for r in results.collect([str(f) for f in folders])
                  if r.get("kind") == "teacher" or r.get("num_inference_steps") in a.num_inference_steps]
    text = results.format_table(table_rows, "markdown")
    files = results.write_report(table_rows, out)
    lines = verdict(rows, a.num_inference_steps)
    pic = picture(out, ref, runs, a.num_inference_steps)
    total = sum(times.values())
    figures = "".join(f"![{name}]({name})\n" for name in ("ode_error_vs_fd.png", "comparison.png")
                      if (out / name).is_file())
    others = ", ".join(n for n in files if n.endswith(".png") and n != "ode_error_vs_fd.png")
    report = (f"{text}\n\n" + "\n".join(lines) + f"\n\n{figures}\npicture: {pic}; plots: ode_error_vs_fd.png"
              + (f", {others}" if others else "") + "\nstage seconds: "
              + json.dumps({k: round(v, 1) for k, v in times.items()}) + f"\ntotal: {total / 60:.1f} min\n")
    (out / "RESULTS.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"rows": {f"{k[0]}|{k[1]}": v for k, v in rows.items()},
                                                  "verdict": lines, "seconds": times}, indent=1, default=str))
    print("[5/5] results\n" + report, flush=True)

if __name__ == "__main__":
    main()
