"""The toy study as a sweep (issue #21): where does "better ODE solving, worse samples" hold?

    python -m cmdistill.toy sweep --dry_run                     # the cells, what is done, the estimated time
    python -m cmdistill.toy sweep --only budget --time_limit_s 500
    python -m cmdistill.toy report                               # docs/toy_study.md from the finished cells

Three axes around the demo's recipe (``cmdistill.demo``: batch 16, LoRA rank 16, lr 1e-3, DDIM teacher,
N = 10, w = 3), each cell one seed of one objective (CM or Direct CM), trained with ``train_cm.py`` /
``train_direct_cm.py`` and evaluated with ``test.py`` at 1, 2, 4 and 8 sampling steps (toy FD, caption accuracy,
ODE error, pixel errors) against teacher references of its (N, w), made once with ``test_teacher.py`` and
shared:

- ``budget``: training steps 150, 600, 2400 at N = 10, w = 3;
- ``grid``: N in 10, 50, 100 at ``--fixed_budget`` (600), w = 3;
- ``guidance``: w in 1, 3, 9 at ``--fixed_budget``, N = 10;

three seeds each; a cell shared by two axes runs once. The programs run in worker processes
(``cmdistill.toy.runner``; on CUDA when available). Each cell is reproduced by one command,
``python -m cmdistill.toy sweep ... --cell NAME``, recorded with the programs it runs in the cell's ``cell.json``.

Two folders: ``--out`` holds the work (precomputed latents, references, runs with their LoRA and samples);
``--results`` the small files to commit: per finished cell its ``metrics.json``, ``training_config.json`` and
``cell.json``; per setting the table and plots of ``cmdistill.results`` (``ode_error_vs_fd.png``,
``metrics_vs_steps.png``); over all cells ``sweep.csv`` / ``sweep.json`` (mean ± standard deviation over seeds)
and ``cells.csv`` (every cell and number of steps). A cell is finished when its metrics in ``--results`` are
complete (every number of steps, every metric, every caption): a rerun skips it, so the sweep runs in parts
(``--time_limit_s`` starts no cell that would not finish in time by its estimate; ``--only`` picks axes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import results
from ..errors import UserError
from .runner import Call, Job, Workers, run_jobs

AXES = ("budget", "grid", "guidance")
OBJECTIVES = ("direct_cm", "cm")
METRICS = ("fd_toy", "toy_caption_acc", "ode_error", "pixel_mse", "psnr")
CELL_FILES = ("metrics.json", "training_config.json")
# Flags that define what a cell computes (recorded, compared on resume, repeated in its one-line command).
RECIPE_FLAGS = ("world", "train_batch_size", "learning_rate", "lora_rank", "solver", "num_prompts", "eval_seed",
                "num_inference_steps", "threads")
# The sweep's settings, written to --results/sweep_config.json: the report's defaults.
CONFIG_NAME = "sweep_config.json"
CONFIG_FLAGS = RECIPE_FLAGS + ("seeds", "num_discr_timesteps", "w", "budgets", "fixed_budget", "grid_N", "ws")


@dataclass(frozen=True)
class Cell:
    objective: str
    budget: int
    N: int
    w: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.objective}_{self.setting}_s{self.seed}"

    @property
    def setting(self) -> str:
        return setting_name(self.budget, self.N, self.w)

    @classmethod
    def parse(cls, name: str) -> Cell:
        import re

        m = re.fullmatch(r"(cm|direct_cm)_b(\d+)_N(\d+)_w([0-9.]+)_s(\d+)", name)
        if not m:
            raise UserError(f"--cell '{name}': expected OBJECTIVE_b<steps>_N<N>_w<w>_s<seed>, e.g. cm_b600_N10_w3_s0")
        return cls(m[1], int(m[2]), int(m[3]), float(m[4]), int(m[5]))


def setting_name(budget: int, N: int, w: float) -> str:
    return f"b{budget}_N{N}_w{w:g}"


def settings(a) -> dict[str, list[tuple]]:
    """axis -> its settings (budget, N, w), for the axes of ``--only``."""
    N, w = a.num_discr_timesteps, a.w
    every = {"budget": [(b, N, w) for b in a.budgets],
             "grid": [(a.fixed_budget, n, w) for n in a.grid_N],
             "guidance": [(a.fixed_budget, N, x) for x in a.ws]}
    return {axis: every[axis] for axis in AXES if axis in a.only}


def cells(a) -> list[Cell]:
    """The cells of the selected axes in running order: axis by axis, setting by setting, seed by seed; each
    once."""
    out = []
    for axis_settings in settings(a).values():
        for budget, N, w in axis_settings:
            for seed in a.seeds:
                for obj in OBJECTIVES:
                    c = Cell(obj, budget, N, float(w), seed)
                    if c not in out:
                        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Folders and files


def teacher_dir(a, N: int, w: float) -> Path:
    return Path(a.out) / "teachers" / f"N{N}_w{w:g}"


def recipe(a) -> dict:
    return {k: getattr(a, k) for k in RECIPE_FLAGS}


def cell_command(a, cell: Cell) -> str:
    """The one command that runs (or reproduces) ``cell``."""
    flags = []
    for k, v in {"out": a.out, "results": a.results, **recipe(a)}.items():
        flags += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return "python -m cmdistill.toy sweep " + " ".join(shlex.quote(f) for f in flags) + f" --cell {cell.name}"


def finished(a, cell: Cell) -> bool:
    """True when ``--results`` holds the cell's complete metrics (every number of steps, every metric, every
    caption). A cell recorded with another recipe is an error: the results folder belongs to one recipe."""
    folder = Path(a.results) / "cells" / cell.name
    try:
        info = json.loads((folder / "cell.json").read_text())
        rows = results.load(folder)
    except (OSError, ValueError):
        return False
    rec = info.get("recipe", {})
    diff = {k: (rec.get(k), v) for k, v in json.loads(json.dumps(recipe(a))).items() if rec.get(k) != v}
    if diff:
        raise UserError(f"'{folder}' holds cell {cell.name} made with other settings (recorded, asked): {diff}; "
                        "pass another --results (and --out) for this recipe")
    for k in a.num_inference_steps:
        r = next((r for r in rows.values() if r.get("num_inference_steps") == k and r.get("weights") == "final"), None)
        if r is None or r.get("num_images") != a.num_prompts or not all(
                isinstance(r.get(m), (int, float)) and math.isfinite(r[m]) for m in METRICS):
            return False
    return True


def record_cell(a, cell: Cell, rdir: Path, calls: list[Call], seconds: list[float], device: str) -> None:
    """The finished cell's small files into ``--results/cells/<name>``."""
    folder = Path(a.results) / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in CELL_FILES:
        if (rdir / name).is_file():
            shutil.copyfile(rdir / name, folder / name)
    info = {"cell": cell.name, "spec": asdict(cell), "recipe": recipe(a), "command": cell_command(a, cell),
            "programs": [c.command(a.threads) for c in calls], "seconds": dict(zip([c.program for c in calls],
                                                                                    [round(s, 1) for s in seconds])),
            "device": device, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / "cell.json").write_text(json.dumps(info, indent=1) + "\n")


def record_teacher(a, N: int, w: float) -> None:
    src = teacher_dir(a, N, w) / results.METRICS_NAME
    if src.is_file():
        dst = Path(a.results) / "teachers" / f"N{N}_w{w:g}"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / results.METRICS_NAME)


def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Time estimates: seconds of one worker per training step, per caption and sampling step, per program start.
# CPU: measured on a 2-core machine, one torch thread (docs/toy_study.md); CUDA: an H200, measured the same way.
# A cell's training step costs one student forward/backward and the teacher's work: one guided DDIM step for CM,
# the solve to t = 0 for Direct CM (N/2 guided steps on average).
COSTS = {"cpu": {"student": 0.17, "teacher_step": 0.08, "sample": 0.0017, "image": 0.008, "start": 6.0,
                 "precompute": 40.0},
         "cuda": {"student": 0.012, "teacher_step": 0.004, "sample": 0.00005, "image": 0.001, "start": 3.0,
                  "precompute": 10.0}}


# Worker processes sharing one GPU: each is bound by its own kernel launches, so several keep the GPU busier.
CUDA_WORKERS = 4


def train_estimate(cost: dict, cell: Cell) -> float:
    teacher = 1 if cell.objective == "cm" else cell.N / 2
    return cost["start"] + cell.budget * (cost["student"] + teacher * cost["teacher_step"])


def eval_estimate(cost: dict, a) -> float:
    return cost["start"] + a.num_prompts * (sum(a.num_inference_steps) * cost["sample"]
                                            + len(a.num_inference_steps) * cost["image"])


def teacher_estimate(cost: dict, a, N: int) -> float:
    return cost["start"] + a.num_prompts * (2 * N * cost["sample"] + cost["image"])


# ---------------------------------------------------------------------------------------------
# The sweep


def _jobs(a, todo: list[Cell], refs: list[tuple]) -> tuple[list[Job], dict]:
    from ..demo import eval_call, precompute_call, reference_folder, teacher_call, train_call, trained, world_call

    out, logs = Path(a.out), Path(a.out) / "logs"
    precomputed = out / "precomputed"
    jobs, meta = [], {}
    build = world_call(a, logs / "world.log")
    if build is not None:
        jobs.append(Job("world", [build]))
    jobs.append(Job("precompute", [precompute_call(a, precomputed, logs / "precompute.log")], ("world",)))
    for N, w in refs:
        jobs.append(Job(f"teacher_N{N}_w{w:g}", [teacher_call(a, teacher_dir(a, N, w), N, w,
                                                              logs / f"teacher_N{N}_w{w:g}.log")], ("world",)))
        meta[jobs[-1].name] = ("teacher", N, w)
    for cell in todo:
        rdir = out / "cells" / cell.name
        log = logs / f"{cell.name}.log"
        calls = [] if trained(rdir, cell.budget) else [
            train_call(a, rdir, cell.objective, cell.seed, cell.budget, cell.N, cell.w, precomputed, log)]
        ref = reference_folder(teacher_dir(a, cell.N, cell.w), cell.N, cell.w)
        calls.append(eval_call(a, rdir, ref, a.num_inference_steps, log))
        jobs.append(Job(cell.name, calls, ("precompute", f"teacher_N{cell.N}_w{cell.w:g}")))
        meta[cell.name] = ("cell", cell, rdir)
    return jobs, meta


def _estimate(a, job: Job, meta: dict, cost: dict) -> float:
    kind = meta.get(job.name, ("other",))
    if kind[0] == "teacher":
        return teacher_estimate(cost, a, kind[1])
    if kind[0] == "cell":
        return (train_estimate(cost, kind[1]) if len(job.calls) > 1 else 0.0) + eval_estimate(cost, a)
    return cost["precompute"]


def default_worker_count(a, kind: str) -> int:
    """--workers, else one per core on a CPU, CUDA_WORKERS processes sharing the GPU."""
    from .runner import default_workers

    return a.workers if a.workers is not None else CUDA_WORKERS if kind == "cuda" else default_workers()


def run(a) -> dict:
    """Run the unfinished cells of the selection (``--cell``: that one); returns {cell name: seconds}."""
    selected = [Cell.parse(a.cell)] if a.cell else cells(a)
    for k in a.num_inference_steps:
        for c in selected:
            if not 1 <= k <= c.N:
                raise UserError(f"--num_inference_steps {k} must lie in 1..N ({c.N} for cell {c.name})")
    todo = [c for c in selected if not finished(a, c)]
    if not a.cell:
        Path(a.results).mkdir(parents=True, exist_ok=True)
        (Path(a.results) / CONFIG_NAME).write_text(json.dumps({k: getattr(a, k) for k in CONFIG_FLAGS}, indent=1) + "\n")
    device = device_name()
    cost = COSTS["cuda" if device.startswith("cuda") else "cpu"]
    skipped = len(selected) - len(todo)
    print(f"toy sweep: {len(selected)} cells ({', '.join(a.only) if not a.cell else a.cell}), {skipped} finished "
          f"in {a.results}, {len(todo)} to run on {device}; work folder {a.out}", flush=True)
    if not todo:
        return {}
    refs = list(dict.fromkeys((c.N, c.w) for c in todo))
    jobs, meta = _jobs(a, todo, refs)
    t0, ratio = time.time(), {"measured": 0.0, "estimated": 0.0}
    workers = 0 if a.cell else min(default_worker_count(a, "cuda" if device.startswith("cuda") else "cpu"), len(jobs))

    def expected(job):
        scale = ratio["measured"] / ratio["estimated"] if ratio["estimated"] else 1.0
        return _estimate(a, job, meta, cost) * scale

    def may_start(job):
        if a.time_limit_s is None or job.name in ("world", "precompute"):
            return True
        left = a.time_limit_s - (time.time() - t0)
        if expected(job) > left:
            print(f"time limit: {job.name} (about {expected(job):.0f} s) does not fit in the {left:.0f} s left; "
                  "stopping here (rerun to continue)", flush=True)
            return False
        return True

    def started(job):
        what = meta.get(job.name, (job.name,))
        print(f"[{time.time() - t0:6.0f} s] {job.name} ..." if what[0] != "cell" else
              f"[{time.time() - t0:6.0f} s] {job.name}: {' + '.join(c.program for c in job.calls)} ...", flush=True)

    def done(job, seconds):
        what = meta.get(job.name, (job.name,))
        ratio["measured"] += sum(seconds)
        ratio["estimated"] += _estimate(a, job, meta, cost)
        if what[0] == "cell":
            record_cell(a, what[1], what[2], job.calls, seconds, device)
        elif what[0] == "teacher":
            record_teacher(a, what[1], what[2])
        print(f"[{time.time() - t0:6.0f} s] {job.name} done in {sum(seconds):.0f} s", flush=True)

    with Workers(workers, a.threads) as pool:
        ran = run_jobs(pool, jobs, may_start=may_start, on_done=done, on_start=started)
    summarize(a)
    left = [c.name for c in todo if c.name not in ran]
    print(f"toy sweep: {sum(1 for c in todo if c.name in ran)} cells run in {time.time() - t0:.0f} s"
          + (f"; {len(left)} left (rerun to continue)" if left else "") + f"; results in {a.results}", flush=True)
    return {k: sum(v) for k, v in ran.items()}


def dry_run(a) -> None:
    """The cells, which are finished, and the estimated time of the rest (per axis and in all)."""
    import torch

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    cost = COSTS[kind]
    selected = cells(a)
    done = {c.name for c in selected if finished(a, c)}
    ref_done = {(N, w) for N, w in {(c.N, c.w) for c in selected}
                if (Path(a.results) / "teachers" / f"N{N}_w{w:g}" / results.METRICS_NAME).is_file()}
    total, seen_refs = 0.0, set()
    print(f"{'cell':<32} {'axis':<9} {'status':<9} est. s ({kind}, one worker)")
    per_axis = {}
    seen = set()
    for axis, axis_settings in settings(a).items():
        for budget, N, w in axis_settings:
            for seed in a.seeds:
                for obj in OBJECTIVES:
                    c = Cell(obj, budget, N, float(w), seed)
                    if c in seen:
                        continue
                    seen.add(c)
                    est = 0.0 if c.name in done else train_estimate(cost, c) + eval_estimate(cost, a)
                    if c.name not in done and (N, c.w) not in seen_refs and (N, c.w) not in ref_done:
                        seen_refs.add((N, c.w))
                        est += teacher_estimate(cost, a, N)
                    per_axis[axis] = per_axis.get(axis, 0.0) + est
                    total += est
                    print(f"{c.name:<32} {axis:<9} {'finished' if c.name in done else 'to run':<9} {est:8.0f}")
    workers = default_worker_count(a, kind)
    print(f"\n{len(selected)} cells, {len(done)} finished; estimated {total:.0f} s of one worker ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in per_axis.items()) + ")"
          + (f"; with {workers} workers about {total / workers / 60:.1f} min if they run side by side at full speed"
             if workers > 1 else f", {total / 60:.1f} min"))


# ---------------------------------------------------------------------------------------------
# Summary and report


def _rows(a, cell_names=None, teachers=None) -> list[dict]:
    res = Path(a.results)
    folders = [d for d in sorted((res / "cells").glob("*")) if (d / results.METRICS_NAME).is_file()
               and (cell_names is None or d.name in cell_names)]
    folders += [d for d in sorted((res / "teachers").glob("*")) if (d / results.METRICS_NAME).is_file()
                and (teachers is None or d.name in teachers)]
    if not folders:
        return []
    steps = set(a.num_inference_steps)
    return [r for r in results.collect([str(f) for f in folders])
            if r.get("kind") == "teacher" or r.get("num_inference_steps") in steps]


def _finished_cells(a) -> list[Cell]:
    out = []
    for d in sorted((Path(a.results) / "cells").glob("*")):
        try:
            c = Cell.parse(d.name)
        except UserError:
            continue
        if finished(a, c):
            out.append(c)
    return out


def summarize(a) -> dict[str, Path]:
    """``sweep.csv`` / ``sweep.json`` (every finished cell, mean ± std over seeds), ``cells.csv`` and, per setting,
    the table and plots of ``cmdistill.results`` in ``--results/<setting>/``."""
    res = Path(a.results)
    done = _finished_cells(a)
    files = {}
    if not done:
        return files
    rows = _rows(a, {c.name for c in done})
    files["sweep.csv"] = res / "sweep.csv"
    files["sweep.csv"].write_text(results.format_table(rows, "csv") + "\n")
    summary = [{**{k: v for k, v in e.items() if k not in ("rows", "model_key", "run_dirs")},
                "method": e["rows"][0].get("method"), **_setting_of(e["rows"][0])} for e in results.aggregate(rows)]
    files["sweep.json"] = res / "sweep.json"
    files["sweep.json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    files["cells.csv"] = res / "cells.csv"
    files["cells.csv"].write_text(results.rows_csv(
        [{"cell": r["run"], **{k: v for k, v in r.items() if k not in ("group", "recipe", "run_dir", "folder")}}
         for r in rows], ["cell", *results.LEADING_COLUMNS]))
    for setting in dict.fromkeys(c.setting for c in done):
        members = [c for c in done if c.setting == setting]
        c0 = members[0]
        rows = _rows(a, {c.name for c in members}, {f"N{c0.N}_w{c0.w:g}"})
        for name, path in results.write_report(rows, res / setting).items():
            files[f"{setting}/{name}"] = path
    return files


def _setting_of(r: dict) -> dict:
    """budget, N, w of a results row (from its recipe; the teacher's from its own fields)."""
    if r.get("kind") == "teacher":
        return {"N": r.get("num_original_inference_steps"), "w": r.get("guidance_scale")}
    rec = json.loads(r["recipe"]) if str(r.get("recipe", "")).startswith("{") else {}
    return {"budget": rec.get("max_train_steps"), "N": rec.get("num_discr_timesteps"), "w": rec.get("w")}


def _fmt_setting(s: dict) -> str:
    return f"budget {s.get('max_train_steps')}, N = {s.get('num_discr_timesteps')}, w = {s.get('w'):g}"


# The two halves of the paper's finding, as comparisons of Direct CM with CM: (metric, lower is better, the claim,
# whether the claim is that Direct CM is better on it).
HALVES = (("ode_error", True, "Direct CM's ODE error is lower than CM's", True),
          ("fd_toy", True, "Direct CM's toy FD is worse (higher) than CM's", False),
          ("toy_caption_acc", False, "Direct CM's caption accuracy is worse (lower) than CM's", False))


def findings(rows: list[dict]) -> list[dict]:
    """Per metric of the two halves: every comparison of Direct CM with CM (``results.compare``), whether it goes
    the paper's way on the seed mean (``holds``) and in how many seeds (``seeds_way``; a tied seed goes neither
    way)."""
    out = []
    for key, lower_is_better, claim, dcm_better in HALVES:
        comps = results.compare(rows, key, lower_is_better)
        for c in comps:
            sign = (1 if lower_is_better else -1) * (1 if dcm_better else -1)
            c["holds"] = sign * (c["a"] - c["b"]) < 0
            c["seeds_way"] = c["better"] if dcm_better else c["worse"]
        out.append({"key": key, "claim": claim, "comparisons": comps})
    return out


def _where(comps: list[dict], holds: bool) -> str:
    """'budget 150, N = 10, w = 3 at 1 step (3 of 3 seeds), 2 steps (2 of 3); ...'."""
    by: dict[str, list] = {}
    for c in comps:
        if c["holds"] == holds:
            by.setdefault(_fmt_setting(c["setting"]), []).append(c)
    parts = []
    for s, cs in by.items():
        parts.append(f"{s} at " + ", ".join(f"{c['steps']} step{'s' if c['steps'] != 1 else ''} ({c['seeds_way']} of "
                                            f"{c['n']} seeds)" for c in cs))
    return "; ".join(parts) or "nowhere"


AXIS_TITLES = {"budget": "Training budget (N = {N}, w = {w:g})", "grid": "Teacher grid N (budget {budget}, w = {w:g})",
               "guidance": "Guidance w (budget {budget}, N = {N})"}


def on_axis(a, axis: str, cell: Cell) -> bool:
    """Whether ``cell`` lies on ``axis`` around the base setting (N, w of the recipe, --fixed_budget)."""
    N, w, fixed = a.num_discr_timesteps, float(a.w), a.fixed_budget
    return {"budget": cell.N == N and cell.w == w, "grid": cell.budget == fixed and cell.w == w,
            "guidance": cell.budget == fixed and cell.N == N}[axis]


def _section(a, title: str, members: list[Cell], rel: Path) -> list[str]:
    """A report section: the table of ``members`` with their teachers' rows, the ODE-error-vs-FD plot per setting."""
    rows = _rows(a, {c.name for c in members}, {f"N{c.N}_w{c.w:g}" for c in members})
    lines = [f"## {title}", "", results.format_table(rows, "markdown"), ""]
    for c in sorted({(c.budget, c.N, c.w) for c in members}):
        s = setting_name(*c)
        if (Path(a.results) / s / "ode_error_vs_fd.png").is_file():
            lines.append(f"![ODE error against toy FD, {s}]({(rel / s / 'ode_error_vs_fd.png').as_posix()})")
    return lines + [""]


def report(a) -> Path:
    """docs/toy_study.md from the finished cells: the statements of where each half holds, the tables per axis,
    the plots per setting; every number read from ``--results``."""
    files = summarize(a)
    done = _finished_cells(a)
    if not done:
        raise UserError(f"no finished cell in '{a.results}': run `python -m cmdistill.toy sweep` first")
    doc = Path(a.doc)
    rel = Path(os.path.relpath(Path(a.results), doc.parent))
    rows = _rows(a, {c.name for c in done})
    infos = [json.loads((Path(a.results) / "cells" / c.name / "cell.json").read_text()) for c in done]
    devices = sorted({i.get("device", "?") for i in infos})
    seeds = sorted({c.seed for c in done})
    steps = ", ".join(map(str, a.num_inference_steps))
    lines = [
        "# The toy study: where does \"better ODE solving, worse samples\" hold?",
        "",
        f"Written by `python -m cmdistill.toy report` from the {len(done)} finished cells in `{a.results}` "
        f"(on {', '.join(devices)}); every number below is read from there. The paper's finding has two halves: "
        "Direct CM solves the teacher's ODE better than CM (a lower ODE error), yet its samples are worse. Each "
        "cell distils one seed of one objective with the demo's recipe (batch "
        f"{a.train_batch_size}, LoRA rank {a.lora_rank}, lr {a.learning_rate:g}, {a.solver.upper()} teacher) and "
        f"is scored at {steps} sampling steps on {a.num_prompts} captions: toy FD against the teacher's samples, "
        "caption accuracy, ODE error (latent MSE to the teacher's ODE solution from the same noise). Seeds: "
        f"{', '.join(map(str, seeds))}; a comparison is made on the seeds both objectives have, and says in how "
        "many of them it goes the paper's way.",
        "",
        "Reproduce: `python -m cmdistill.toy sweep` (it skips finished cells), one cell with the command in its "
        "`cell.json`.",
        "",
        "## Where each half holds",
        "",
    ]
    for f in findings(rows):
        comps = f["comparisons"]
        if not comps:
            continue
        held = [c for c in comps if c["holds"]]
        every = sum(1 for c in held if c["seeds_way"] == c["n"])
        half = "First half" if f["key"] == "ode_error" else "Second half"
        lines += [f"**{half}: {f['claim']}.** On the seed mean it holds in {len(held)} of {len(comps)} comparisons "
                  f"(setting x sampling steps), in every seed in {every} of them.",
                  "",
                  f"- holds: {_where(comps, True)}.",
                  f"- does not hold: {_where(comps, False)}.",
                  ""]
    # Tables and plots, axis by axis: every finished cell on the axis (whatever the sweep's lists say now).
    finished_names = {c.name for c in done}
    placed = set()
    for axis in AXES:
        members = [c for c in done if on_axis(a, axis, c)]
        placed.update(c.name for c in members)
        if members:
            lines += _section(a, AXIS_TITLES[axis].format(N=a.num_discr_timesteps, w=a.w, budget=a.fixed_budget),
                              members, rel)
    others = [c for c in done if c.name not in placed]
    if others:
        lines += _section(a, "Other settings", others, rel)
    missing = [c.name for c in cells(a) if c.name not in finished_names]
    if missing:
        lines += ["## Not run yet", "", f"{len(missing)} cells: " + ", ".join(missing) + ".", ""]
    lines += ["Files: " + ", ".join(f"`{(rel / k).as_posix()}`" for k in ("sweep.csv", "sweep.json", "cells.csv")
                                     if k in files) + "; per setting `<setting>/table.md` and its plots.", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    print(f"wrote {doc}", flush=True)
    return doc


# ---------------------------------------------------------------------------------------------
# Flags


def add_flags(p: argparse.ArgumentParser, report_only: bool = False) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--out", default="runs/toy_sweep", help="work folder: precomputed latents, references, runs")
    g.add_argument("--results", default="docs/toy_study", help="the small files to commit (finished cells, tables, "
                                                                "plots)")
    g.add_argument("--only", nargs="+", choices=AXES, default=list(AXES), help="axes to run (in this order)")
    g.add_argument("--budgets", type=int, nargs="+", default=[150, 600, 2400], help="training steps (budget axis)")
    g.add_argument("--fixed_budget", type=int, default=600, help="training steps of the grid and guidance axes")
    g.add_argument("--grid_N", type=int, nargs="+", default=[10, 50, 100], help="teacher grids N (grid axis)")
    g.add_argument("--ws", type=float, nargs="+", default=[1.0, 3.0, 9.0], help="guidance scales (guidance axis)")
    g.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4, 8])
    if report_only:
        g.add_argument("--doc", default="docs/toy_study.md", help="the report to write")
        return
    g.add_argument("--time_limit_s", type=float, default=None,
                   help="start no cell that would not finish within this many seconds of the start (its estimate, "
                        "scaled by how the finished ones compared with theirs); running ones finish")
    g.add_argument("--dry_run", action="store_true", help="list the cells, which are finished, the estimated time")
    g.add_argument("--cell", default=None, help="run this one cell in this process (its reproduction), e.g. "
                                                "cm_b600_N10_w3_s0")


def parser(prog: str = "python -m cmdistill.toy sweep", report_only: bool = False) -> argparse.ArgumentParser:
    from ..demo import recipe_parser

    p = argparse.ArgumentParser(prog=prog, description=__doc__, parents=[recipe_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, report_only)
    p.set_defaults(num_prompts=1000)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.dry_run:
        dry_run(a)
    else:
        run(a)
    return 0


def report_main(argv=None) -> int:
    """The report, its settings defaulting to those of the sweep that wrote --results (sweep_config.json)."""
    p = parser("python -m cmdistill.toy report", report_only=True)
    config = Path(p.parse_known_args(argv)[0].results) / CONFIG_NAME
    if config.is_file():
        p.set_defaults(**{k: v for k, v in json.loads(config.read_text()).items() if k in CONFIG_FLAGS})
    report(p.parse_args(argv))
    return 0
