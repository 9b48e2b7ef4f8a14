"""The driver both evaluation programs run (docs/method.md §8, §9): a list of jobs, one per evaluated setting.

Validate the jobs' sample folders, shard the caption indices over the processes (process r takes r, r + P, ...),
generate what is not already on disk, then on the main process merge the latents, score, log to the trackers
and record ``metrics.json`` / ``results.csv``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import plots, results
from ..errors import UserError, one_line
from ..fast import plan
from ..hub import redact, update_model_card
from ..progress import quiet_libraries
from . import scoring
from .flags import warn
from .generate import Models, generate, load_models
from .inputs import InitNoise
from .store import SampleStore
@dataclass
class Job:
    """One evaluated setting: where its samples go, how to make and score them."""

    store: SampleStore
    identity: dict                      # what the samples depend on (the resume check)
    config: dict                        # written beside the samples
    desc: str
    setting: str                        # key in metrics.json / results.csv
    row: dict                           # fixed fields of its results row
    tb_group: str
    tb_step: int                        # the number of sampling steps
    make_sampler: Callable[[Models], Callable]
    unet_calls: int                     # UNet calls of a batch (a teacher's N x evaluations x passes, a student's K)
    score: Callable[[int], dict]
    grid: Callable[[int], list]         # count -> rows of image paths for the comparison grid
    prepare: Callable[[list[int]], None] | None = None  # per-process work on its indices (reference images)
    attach: Callable | None = None      # attach(unet) before the cast: the student's LoRA (None: the teacher)
    train_step: int | None = None       # the training step of a student's weights (None: unknown, or the teacher)


def process_state():
    """The processes of this evaluation (accelerate's), on the CPU without a GPU."""
    from datetime import timedelta

    from accelerate import PartialState

    # Processes wait at barriers while others generate (e.g. a resumed run whose shards are uneven):
    # allow far longer than the collective default.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))


def run_jobs(args, state, jobs: list[Job], captions: list[str], count: int, init_noise: InitNoise) -> list[dict]:
    """Generate, score and record the jobs over ``captions[:count]``; the rows recorded (none off the main
    process)."""
    with _project_logs():
        return _run_jobs(args, state, jobs, captions, count, init_noise)


def _run_jobs(args, state, jobs: list[Job], captions: list[str], count: int, init_noise: InitNoise) -> list[dict]:
    quiet_libraries(errors_only=True)
    main = state.is_main_process
    clear = [job.store.check_config(job.identity, captions, args.overwrite) for job in jobs]
    state.wait_for_everyone()
    if main:
        for job, c in zip(jobs, clear):
            if c:
                job.store.reset()
    state.wait_for_everyone()

    mine = list(range(state.process_index, count, state.num_processes))
    todo = []
    for job in jobs:
        done = job.store.done(mine)
        todo.append([i for i in mine if i not in done])
        if main and done:
            print(f"{job.desc}: {len(done)} of this process's {len(mine)} captions already done, skipped", flush=True)
    # --compile auto: one decision for every process, on the largest share of the work (it sets the wall time).
    work = [(job, td) for job, td in zip(jobs, todo) if td]
    shares = [(planned_work(work, args.batch_size), [bool(td) for td in todo])]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        shares = gather_object(shares)
    kind = jobs[0].row["kind"]
    compiled = plan.resolve_sampling(args, kind, state.device, *max(plans for plans, _ in shares))
    if main:
        print(f"--compile {compiled}", flush=True)
        for j, job in enumerate(jobs):  # the decision goes with the samples it makes
            made = any(has[j] for _, has in shares)
            job.store.write_config({**job.config, **({"compile": compiled} if made else {})}, captions)
    state.wait_for_everyone()
    if work:
        featurize = scoring.instance_featurizer(args, state.device)  # before the generator: missing weights fail fast
        timer = plan.sampling_timer(args, kind) if main else plan.CompileTimer(None)
        models, attached = None, None
        for k, (job, td) in enumerate(work):
            if models is None or job.attach is not attached:  # jobs of one set of weights share the loaded models
                models = None
                models, attached = load_models(args, state.device, job.attach), job.attach
            generate(job.store, td, captions, init_noise, job.make_sampler(models), models, args.batch_size,
                     args.vae_decode_batch_size, job.desc, show_progress=main, featurize=featurize,
                     on_batch=timer.observe if k == 0 else None)  # the compile: the first setting's first batch
        del models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for job in jobs:
        if job.prepare is not None:
            job.prepare(mine)
    state.wait_for_everyone()
    if not main:
        state.destroy_process_group()
        return []

    out = []
    log_dir = Path(args.output_dir) / args.logging_dir / "evaluation"
    trackers = scoring.Trackers(args.report_to, log_dir)
    for job in jobs:
        n = job.store.merge()
        if n < count:
            raise UserError(f"{job.store.folder} has samples for {n} of {count} captions after generation: rerun to "
                            "complete it")
        metrics = job.score(count)
        row = {**job.row, "num_images": count, **metrics, "folder": str(job.store.folder),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        results.record(args.output_dir, job.setting, row)
        # Per setting, against the number of sampling steps (the old series); per sampling steps, against the
        # training step of the weights (a curve over the evaluated checkpoints); the teacher at step 0.
        trackers.log({f"{job.tb_group}/{k}": v for k, v in metrics.items()}, job.tb_step)
        if job.row.get("kind") == "teacher":
            trackers.log({f"metrics/{k}/teacher": v for k, v in metrics.items()}, 0)
        elif job.train_step is not None:
            trackers.log({f"metrics/{k}/{job.tb_step}_steps": v for k, v in metrics.items()}, job.train_step)
        shown = captions[:min(count, args.num_log_images)]
        trackers.images(job.tb_group, job.grid(count), shown, job.tb_step)
        shown = ", ".join(f"{k}={v:.5g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{job.desc}: {count} samples in {job.store.folder}; {shown or 'no metrics'}", flush=True)
        out.append(row)
    _log_plots(args, trackers, out)
    trackers.end()
    update_model_card(args.output_dir)  # a training run's README.md gets the metrics; a teacher folder has none
    print(f"results: {Path(args.output_dir) / results.METRICS_NAME}, {Path(args.output_dir) / results.RESULTS_NAME}; "
          f"TensorBoard: {log_dir}", flush=True)
    state.destroy_process_group()
    return out


def planned_work(work: list[tuple[Job, list[int]]], batch_size: int) -> tuple[int, int]:
    """(UNet calls, sets of weights) that generating ``work`` (jobs with their captions to do) takes: each job's
    batches x its calls per batch; a set of weights per run of consecutive jobs with the same ``attach`` (the
    models are loaded, and the UNet compiled, once per set)."""
    calls = sum(-(-len(todo) // batch_size) * job.unet_calls for job, todo in work)
    loads = sum(1 for k, (job, _) in enumerate(work) if k == 0 or job.attach is not work[k - 1][0].attach)
    return calls, loads


@contextmanager
def _project_logs():
    """This project's log lines (the compile cache, the compile time recorded) on stderr while the jobs run, where
    nothing else configured logging; other libraries' stay as they are."""
    log = logging.getLogger("cmdistill")
    if log.handlers or logging.getLogger().handlers:
        yield
        return
    handler, level = logging.StreamHandler(), log.level
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _log_plots(args, trackers, rows: list[dict]) -> None:
    """The plots of this output folder's results (``cmdistill.plots``: metrics against sampling steps, the ODE
    error against the FD, the loss, metrics against the training step) to the trackers, at the last step
    evaluated; the PNGs are kept in --logging_dir/plots."""
    if trackers.acc is None:
        return
    try:
        rows_all = results.collect([args.output_dir])
        folder = Path(args.output_dir) / args.logging_dir / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        step = max([r.get("training_step") or 0 for r in rows] or [0])
        trackers.figures(plots.write_plots(rows_all, folder), step)
    except Exception as e:  # noqa: BLE001 -- a plot must never lose an evaluation that is recorded
        warn(f"the plots of '{args.output_dir}' were not logged ({one_line(e)})")


def quality(args, store: SampleStore, refs, captions: list[str], n: int, device, cache) -> dict:
    """FID / FD-DINO from the saved files of samples 0..n-1; instance metrics from the features of the
    in-memory images stored at generation (from the files where they were not stored, with a warning)."""
    feats, notes = scoring.stored_features(args, store, n, device)
    for note in notes:
        warn(note)
    return scoring.quality_metrics(args, [store.image_path(i) for i in range(n)], refs, captions, device, cache,
                                   gen_features=feats)


def resolved_config(args, identity: dict, state, **extra) -> dict:
    """The configuration written beside a job's samples; no secret in it."""
    return redact({"identity": identity, "args": vars(args), "num_processes": state.num_processes,
                   "written": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})
