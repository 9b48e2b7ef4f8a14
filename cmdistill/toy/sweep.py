"""The toy study as a sweep (docs/toy_study.md): where does "better ODE solving, worse samples" hold?

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
(``cmdistill.toy.runner``): on CUDA when available, eight sharing the GPU (each is bound by its own kernel launches),
else one per core; ``--workers`` says otherwise. Each cell is reproduced by one command,
``python -m cmdistill.toy sweep ... --cell NAME``, recorded with the programs it runs in the cell's ``cell.json``.

Two folders: ``--out`` holds the work (precomputed latents, references, runs with their LoRA and samples);
``--results`` the small files to commit: per finished cell its ``metrics.json``, ``training_config.json`` and
``cell.json``; per setting the table and plots of ``cmdistill.results`` (``ode_error_vs_fd.png``,
``metrics_vs_steps.png``); over all cells ``sweep.csv`` / ``sweep.json`` (mean ± standard deviation over seeds)
and ``cells.csv`` (every cell and number of steps). A cell is finished when its metrics in ``--results`` are
complete (every number of steps, every metric, every caption): a rerun skips it, so the sweep runs in parts
(``--time_limit_s`` starts no cell that would not finish in time by its estimate; ``--only`` picks axes).
Cells run again on another device, as a sweep of their own with ``--results <results>/device_check`` and a
fresh ``--out`` (one that holds the first device's runs would only re-score them), are set beside the same cells
in the report ("Same cells on two devices").
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import results
from ..errors import UserError
from ..run_folder import CONFIG_NAME
from ..schedule import check_sampling_steps
from .calls import (eval_call, precompute_call, recipe_parser, reference_folder, teacher_call, train_call, trained,
                    world_call)
from .estimate import COSTS, calibration, eval_estimate, teacher_estimate, train_estimate
from .runner import Call, Job, Workers, default_workers, run_jobs

AXES = ("budget", "grid", "guidance")
OBJECTIVES = ("direct_cm", "cm")
METRICS = ("fd_toy", "toy_caption_acc", "ode_error", "pixel_mse", "psnr")
CELL_FILES = (results.METRICS_NAME, CONFIG_NAME)
# Flags that define what a cell computes (recorded, compared on resume, repeated in its one-line command).
RECIPE_FLAGS = ("world", "train_batch_size", "learning_rate", "lora_rank", "solver", "num_prompts", "eval_seed",
                "num_inference_steps", "threads")
# The sweep's settings, written to --results/sweep_config.json: the report's defaults.
SWEEP_CONFIG_NAME = "sweep_config.json"
CONFIG_FLAGS = RECIPE_FLAGS + ("seeds", "num_discr_timesteps", "w", "budgets", "fixed_budget", "grid_N", "ws")
# Worker processes sharing one GPU: each is bound by its own Python and kernel launches, so several keep the GPU
# busier (on an H100, a Direct CM step took about as long with eight processes sharing it as with four).
CUDA_WORKERS = 8


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
    return complete(a, rows)


def complete(a, rows: dict) -> bool:
    """Whether a cell's metrics (``rows``: its metrics.json) hold every number of steps of ``a`` for its final
    weights, on every caption, with every metric finite."""
    final = final_rows(rows)
    for k in a.num_inference_steps:
        r = final.get(k)
        if r is None or r.get("num_images") != a.num_prompts or not all(
                isinstance(r.get(m), (int, float)) and math.isfinite(r[m]) for m in METRICS):
            return False
    return True


def final_rows(rows: dict) -> dict[int, dict]:
    """Number of sampling steps -> the results row of a cell's final weights (``rows``: its metrics.json)."""
    return {r["num_inference_steps"]: r for r in rows.values()
            if r.get("weights") == "final" and isinstance(r.get("num_inference_steps"), int)}


def record_cell(a, cell: Cell, rdir: Path, programs: list[Call], ran: list[Call], seconds: list[float],
                device: str) -> None:
    """The finished cell's small files into ``--results/cells/<name>``: its metrics and training configuration,
    and ``cell.json`` (its settings, its one command, the program calls it makes, the seconds of those that ran
    here)."""
    folder = Path(a.results) / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in CELL_FILES:
        if (rdir / name).is_file():
            shutil.copyfile(rdir / name, folder / name)
    info = {"cell": cell.name, "spec": asdict(cell), "recipe": recipe(a), "command": cell_command(a, cell),
            "programs": [c.command(a.threads) for c in programs],
            "seconds": {c.program: round(s, 1) for c, s in zip(ran, seconds)},
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
# The sweep


def _jobs(a, todo: list[Cell], refs: list[tuple]) -> tuple[list[Job], dict]:
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
        ref = reference_folder(teacher_dir(a, cell.N, cell.w), cell.N, cell.w)
        programs = [train_call(a, rdir, cell.objective, cell.seed, cell.budget, cell.N, cell.w, precomputed, log),
                    eval_call(a, rdir, ref, a.num_inference_steps, log)]
        # A run trained in --out already (its evaluation was interrupted) is only evaluated.
        calls = programs[1:] if trained(rdir, cell.budget) else programs
        jobs.append(Job(cell.name, calls, ("precompute", f"teacher_N{cell.N}_w{cell.w:g}")))
        meta[cell.name] = ("cell", cell, rdir, programs)
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
    return a.workers if a.workers is not None else CUDA_WORKERS if kind == "cuda" else default_workers()


def run(a) -> dict:
    """Run the unfinished cells of the selection (``--cell``: that one); returns {cell name: seconds}."""
    selected = [Cell.parse(a.cell)] if a.cell else cells(a)
    for k in a.num_inference_steps:
        for c in selected:
            check_sampling_steps(k, c.N, f" of cell {c.name}")
    todo = [c for c in selected if not finished(a, c)]
    if not a.cell:
        Path(a.results).mkdir(parents=True, exist_ok=True)
        config = {k: getattr(a, k) for k in CONFIG_FLAGS}
        (Path(a.results) / SWEEP_CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
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
            record_cell(a, what[1], what[2], what[3], job.calls, seconds, device)
        elif what[0] == "teacher":
            record_teacher(a, what[1], what[2])
        print(f"[{time.time() - t0:6.0f} s] {job.name} done in {sum(seconds):.0f} s", flush=True)

    with Workers(workers, a.threads) as pool:
        ran = run_jobs(pool, jobs, may_start=may_start, on_done=done, on_start=started)
    left = [c.name for c in todo if c.name not in ran]
    print(f"toy sweep: {sum(1 for c in todo if c.name in ran)} cells run in {time.time() - t0:.0f} s"
          + (f"; {len(left)} left (rerun to continue)" if left else "") + f"; results in {a.results}", flush=True)
    return {k: sum(v) for k, v in ran.items()}


def dry_run(a) -> None:
    """The cells, which are finished, and the estimated time of the rest (per axis and in all)."""
    import torch

    kind = a.dry_run if a.dry_run in COSTS else "cuda" if torch.cuda.is_available() else "cpu"
    scale, measured = calibration(a.results, kind)
    cost = {k: v * scale for k, v in COSTS[kind].items()}
    selected = cells(a)
    done = {c.name for c in selected if finished(a, c)}
    ref_done = {(N, w) for N, w in {(c.N, c.w) for c in selected}
                if (Path(a.results) / "teachers" / f"N{N}_w{w:g}" / results.METRICS_NAME).is_file()}
    total, longest, seen_refs = 0.0, 0.0, set()
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
                    longest = max(longest, est)
                    print(f"{c.name:<32} {axis:<9} {'finished' if c.name in done else 'to run':<9} {est:8.0f}")
    workers = default_worker_count(a, kind)
    if measured:
        print(f"\n(estimates x {scale:.2f}: the measured seconds of {measured} finished cells on {kind} over their "
              "estimates)")
    print(f"\n{len(selected)} cells, {len(done)} finished; estimated {total:.0f} s of one worker ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in per_axis.items()) + ")"
          + (f"; with {workers} workers about {max(total / workers, longest) / 60:.1f} min if they run side by side "
             "at full speed (no less than the longest cell)"
             if workers > 1 else f", {total / 60:.1f} min"))


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
    g.add_argument("--dry_run", nargs="?", const="here", choices=["here", *COSTS], default=None,
                   help="list the cells, which are finished, and the estimated time here (or on cpu / cuda)")
    g.add_argument("--cell", default=None, help="run this one cell in this process (its reproduction), e.g. "
                                                "cm_b600_N10_w3_s0")


def parser(prog: str = "python -m cmdistill.toy sweep", report_only: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, parents=[recipe_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, report_only)
    p.set_defaults(num_prompts=1000)
    return p
