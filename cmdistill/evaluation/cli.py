"""The evaluation programs: ``test_teacher.py`` (teacher ODE reference samples), ``test.py`` (student
samples) and ``make_init_noise`` (docs/method.md §8, §9). Flags keep the reference scripts' names.

Both programs run the same driver: validate the inputs, shard the caption indices over the
processes (process r takes r, r + P, ...), generate what is not already on disk, then on the main
process merge the latents, score, log to TensorBoard and record ``metrics.json`` / ``results.csv``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import results
from ..errors import UserError, exit_on_user_error
from ..models import DEFAULT_LORA_TARGETS, LORA_WEIGHT_NAME
from . import scoring
from .generate import DTYPES, Models, generate, load_models, student_sampler, teacher_sampler
from .inputs import (InitNoise, empty_caption_note, image_size, latent_shape, make_init_noise, model_defaults,
                     noise_resolution, prepare_reference_image, read_captions_file, read_metadata, read_noise_file)
from .store import CAPTIONS_NAME, CONFIG_NAME, IMAGE_FORMATS, LATENTS_NAME, SampleStore, image_complete

PAPER_TEACHER = "stabilityai/stable-diffusion-xl-base-1.0"
TRAINING_CONFIG = "training_config.json"


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Flags


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's default after its help text (a default of None is described in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            default = action.default
            if isinstance(default, (list, tuple)):
                default = " ".join(map(str, default))
            text += f" (default: {default})".replace("%", "%%")
        return text


def _parser(description: str, output_help: str, student: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    run = f"{TRAINING_CONFIG}'s, else " if student else ""  # test.py's defaults come from the run and references
    refs = "the references', else " if student else ""
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_teacher_model", default=None,
                   help=f"hub id or local folder of the SDXL pipeline (default: {run}{PAPER_TEACHER})")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a VAE to use instead of the pipeline's own (paper: madebyollin/sdxl-vae-fp16-fix; "
                        f"default: {run}the pipeline's VAE)")
    g.add_argument("--revision", default=None, help="hub revision of --pretrained_vae_model_name_or_path "
                                                    "(default: the latest)")
    g.add_argument("--teacher_revision", default=None, help="hub revision of --pretrained_teacher_model "
                                                            "(default: the latest)")
    g.add_argument("--weight_dtype", default="fp32", choices=list(DTYPES),
                   help="precision of the UNet and text encoders; the paper's scripts use fp16")
    g = p.add_argument_group("captions and noise")
    g.add_argument("--captions_file", default=None,
                   help="one caption a line, or a JSON list (default: the captions of --train_data_dir" +
                        (f", its {CAPTIONS_NAME})" if student else ")"))
    g.add_argument("--max_prompts", type=int, default=None,
                   help="evaluate only the first N captions, for a quick look (default: all)")
    g.add_argument("--seed", type=int, default=None,
                   help=f"seed of the per-caption noise{' and of the fresh noise between steps' if student else ''} "
                        f"(default: {refs}24, the paper's)")
    g.add_argument("--resolution", type=int, default=None,
                   help=f"image size in pixels (default: {refs}the --init_noise file's size, else the model's own: "
                        "the UNet's sample_size x the VAE factor, 1024 for SDXL)")
    g.add_argument("--init_noise", default=None,
                   help=f"[num_captions, 4, H/8, W/8] tensor of initial noise, e.g. data/init_noise.pt (default: "
                        f"{refs}per-caption noise from --seed, the values scripts/make_init_noise.py writes)")
    g = p.add_argument_group("generation")
    g.add_argument("--output_dir", default=None, help=output_help)
    g.add_argument("--batch_size", type=int, default=8, help="captions per sampling batch, per process")
    g.add_argument("--vae_decode_batch_size", type=int, default=4, help="latents per VAE decoding call")
    g.add_argument("--overwrite", action="store_true", help="regenerate samples already on disk")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (batch dimension dynamic): "
                   "faster sampling on a GPU after a compile of a few minutes; same values to kernel rounding")
    g.add_argument("--compile_channels_last", action="store_true",
                   help="with --compile: the compiled UNet in channels_last, convolutions in cuDNN's native layout, "
                        "group norms with per-channel statistics (fast.compile_unet); same values to kernel "
                        "rounding (COMPILE=1 adds it)")
    g = p.add_argument_group("files")
    g.add_argument("--image_format", default="jpg", choices=list(IMAGE_FORMATS),
                   help="how samples are saved, as {i}.jpg or {i}.png; FID and FD-DINO read these files (jpg: "
                        "JPEG at PIL's default quality 75, as the paper; png: lossless)")
    g = p.add_argument_group("metrics")
    g.add_argument("--dgm_metrics", nargs="+", default=["fd"], help="'fd' (Frechet distances), or 'none'")
    g.add_argument("--dgm_models", nargs="+", default=["inception", "dinov2"],
                   help="feature extractors of the Frechet distances: inception = FID, dinov2 = FD-DINO")
    g.add_argument("--instance_metrics", nargs="+", default=["clip_score", "aesthetic"],
                   help="per-image scores of the in-memory images, or 'none'")
    g.add_argument("--dgm_metrics_batch_size", type=int, default=64, help="images per metric-network batch")
    g.add_argument("--metrics_weights_dir", default=None,
                   help="folder with the metric networks' weight files (default: $CMDISTILL_METRICS_WEIGHTS, the "
                        "usual caches, then a download)")
    g.add_argument("--metrics_cache_dir", default=None,
                   help="cache of reference-set features (default: metrics_cache beside the reference images)")
    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    g.add_argument("--num_log_images", type=int, default=4, help="captions shown in the comparison grids")
    g.add_argument("--report_to", default="tensorboard", choices=scoring.REPORT_TO,
                   help="trackers of the metrics, grids and captions (accelerate's): tensorboard writes "
                        "--logging_dir/evaluation")
    return p


def teacher_parser() -> argparse.ArgumentParser:
    p = _parser("Teacher reference samples: deterministic ODE sampling with classifier-free guidance from "
                "per-caption noise, scored against the real training images.",
                "where the samples (train_gen_images/{N}_steps/{w}_gscale) and results go")
    g = p.add_argument_group("teacher sampling")
    g.add_argument("--train_data_dir", default=None,
                   help="training image folder with metadata.csv: the captions and the real reference images "
                        "(required unless --captions_file and --dgm_metrics none)")
    g.add_argument("--caption_column", default="text", help="caption column of the metadata")
    g.add_argument("--image_column", default="file_name", help="image file column of the metadata")
    g.add_argument("--real_image_crop", action="store_true",
                   help="score against the real images resized (shorter side) and center-cropped to --resolution, "
                        "saved as PNG; without it the raw files are read, each squashed full-frame to the metric "
                        "network's input size (as dgm-eval reads the folder)")
    g.add_argument("--scheduler", default="ddim", choices=["ddim", "euler", "heun"], help="the ODE solver")
    g.add_argument("--num_original_inference_steps", type=int, default=100,
                   help="N, the number of solver steps (the paper's); must divide the model's train timesteps")
    g.add_argument("--guidance_scale", type=float, default=9.0, help="w, Imagen form (the paper's)")
    g.add_argument("--cfg_batched", action="store_true", help="conditional and unconditional passes as one batch")
    g.add_argument("--compile_freezing", action="store_true",
                   help="with --compile: inductor's freezing (the teacher's weights become constants of the "
                        "compiled graph; a longer compile; COMPILE=1 adds it)")
    p.set_defaults(output_dir="results/teacher")
    return p


def student_parser() -> argparse.ArgumentParser:
    p = _parser("Student samples: multistep consistency sampling with the LoRA of a training run, from the "
                "teacher's noise, scored against the teacher's samples.",
                "the training run's folder (required): it holds the LoRA; the samples and results go there too",
                student=True)
    g = p.add_argument_group("student sampling")
    g.add_argument("--train_data_dir", default=None,
                   help="the teacher reference folder, .../train_gen_images/{N}_steps/{w}_gscale of "
                        "test_teacher.py (required)")
    g.add_argument("--allow_reference_mismatch", action="store_true",
                   help="score against references made with another N, w, resolution or noise than the student "
                        "(a warning instead of an error)")
    g.add_argument("--lora_weights", default="auto",
                   help="'auto' (final weights, else the latest checkpoint), 'final', 'latest', a checkpoint-* "
                        "name or a folder")
    g.add_argument("--checkpoints", default=None,
                   help="evaluate weights over training instead of --lora_weights: 'all' (every checkpoint-<step> "
                        "and the final weights, the run's last step), 'latest' (the last step's weights) or "
                        "training steps 'N,M'; each is logged at its training step (metrics/<metric>/<K>_steps), "
                        "and a rerun skips those already evaluated")
    g.add_argument("--lora_scale", type=float, default=1.0, help="multiplier of the LoRA update")
    g.add_argument("--fuse_lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the LoRA into the UNet weights (faster; as the reference)")
    g.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="numbers of consistency sampling steps, each evaluated")
    g.add_argument("--num_original_inference_steps", type=int, default=None,
                   help="grid size N (default: training_config.json's num_discr_timesteps, else the references')")
    g.add_argument("--timestep_scaling_factor", type=float, default=None,
                   help="boundary-condition scaling (default: training_config.json's, else 10)")
    g.add_argument("--lora_rank", type=int, default=None, help="LoRA rank (default: training_config.json's, else 64)")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha (default: training_config.json's, else 64)")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="modules with LoRA adapters (default: training_config.json's, else the training default)")
    g.add_argument("--guidance_scale", type=float, default=0.0, help="must be 0: the student is never guided")
    return p


# ---------------------------------------------------------------------------------------------
# The shared driver


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
    score: Callable[[int], dict]
    grid: Callable[[int], list]         # count -> rows of image paths for the comparison grid
    prepare: Callable[[list[int]], None] | None = None  # per-process work on its indices (reference images)
    load: Callable[[torch.device], Models] | None = None  # its models, where they differ from run_jobs' (a LoRA)
    train_step: int | None = None       # the training step of a student's weights (None: unknown, or the teacher)


def _state():
    from datetime import timedelta

    from accelerate import PartialState

    # Processes wait at barriers while others generate (e.g. a resumed run whose shards are uneven):
    # allow far longer than the collective default.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))


def _quiet_hub_logs() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def run_jobs(args, state, jobs: list[Job], captions: list[str], count: int, init_noise: InitNoise,
             load: Callable[[torch.device], Models]) -> list[dict]:
    main = state.is_main_process
    clear = [job.store.check_config(job.identity, captions, args.overwrite) for job in jobs]
    state.wait_for_everyone()
    if main:
        for job, c in zip(jobs, clear):
            if c:
                job.store.reset()
            job.store.write_config(job.config, captions)
    state.wait_for_everyone()

    mine = list(range(state.process_index, count, state.num_processes))
    todo = []
    for job in jobs:
        done = job.store.done(mine)
        todo.append([i for i in mine if i not in done])
        if main and done:
            print(f"{job.desc}: {len(done)} of this process's {len(mine)} captions already done, skipped", flush=True)
    if any(todo):
        featurize = scoring.instance_featurizer(args, state.device)  # before the generator: missing weights fail fast
        _quiet_hub_logs()
        models, loaded = None, None
        for job, td in zip(jobs, todo):
            if not td:
                continue
            fn = job.load or load
            if fn is not loaded:  # jobs of one set of weights share the loaded models
                models = None
                models, loaded = fn(state.device), fn
            generate(job.store, td, captions, init_noise, job.make_sampler(models), models, args.batch_size,
                     args.vae_decode_batch_size, job.desc, show_progress=main, featurize=featurize)
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
    from ..hub import update_model_card
    update_model_card(args.output_dir)  # a training run's README.md gets the metrics; a teacher folder has none
    print(f"results: {Path(args.output_dir) / results.METRICS_NAME}, {Path(args.output_dir) / results.RESULTS_NAME}; "
          f"TensorBoard: {log_dir}", flush=True)
    state.destroy_process_group()
    return out


def _log_plots(args, trackers, rows: list[dict]) -> None:
    """The plots of this output folder's results (``cmdistill.plots``: metrics against sampling steps, the ODE
    error against the FD, the loss, metrics against the training step) to the trackers, at the last step
    evaluated; the PNGs are kept in --logging_dir/plots."""
    if trackers.acc is None:
        return
    try:
        from .. import plots

        rows_all = results.collect([args.output_dir])
        folder = Path(args.output_dir) / args.logging_dir / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        step = max([r.get("training_step") or 0 for r in rows] or [0])
        trackers.figures(plots.write_plots(rows_all, folder), step)
    except Exception as e:  # noqa: BLE001 -- a plot must never lose an evaluation that is recorded
        warn(f"the plots of '{args.output_dir}' were not logged ({type(e).__name__}: {e})")


def _quality(args, store: SampleStore, refs, captions: list[str], n: int, device, cache) -> dict:
    """FID / FD-DINO from the saved files of samples 0..n-1; instance metrics from the features of the
    in-memory images stored at generation (from the files where they were not stored, with a warning)."""
    feats, notes = scoring.stored_features(args, store, n, device)
    for note in notes:
        warn(note)
    return scoring.quality_metrics(args, [store.image_path(i) for i in range(n)], refs, captions, device, cache,
                                   gen_features=feats)


def _count(args, captions: list[str]) -> int:
    if not captions:
        raise UserError("no captions to evaluate")
    if args.batch_size < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise UserError("--batch_size and --max_prompts must be positive")
    return len(captions) if args.max_prompts is None else min(args.max_prompts, len(captions))


def _resolved_config(args, identity: dict, state, **extra) -> dict:
    from ..hub import redact  # no secret in any recorded configuration

    return redact({"identity": identity, "args": vars(args), "num_processes": state.num_processes,
                   "written": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


# ---------------------------------------------------------------------------------------------
# test_teacher.py


def _check_compile_flags(args) -> None:
    for flag in ("compile_freezing", "compile_channels_last"):
        if getattr(args, flag, False) and not args.compile:
            raise UserError(f"--{flag} applies to the compiled UNet: add --compile (COMPILE=1)")


def _resolve_size_and_grid(args, N: int, n_flag: str) -> None:
    """Before any model loads: ``args.resolution`` (flag, else the --init_noise file's size, else the
    model's own) and a grid size N that divides the model's train timesteps."""
    size, T = model_defaults(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path, args.revision,
                             args.teacher_revision)
    if args.init_noise and args.resolution is None:
        args.resolution = noise_resolution(read_noise_file(args.init_noise))
    args.resolution = args.resolution or size
    latent_shape(args.resolution)  # a multiple of 8
    if N <= 0 or T % N:
        divisors = [d for d in (10, 20, 25, 50, 100, 200, 250, 500, 1000) if T % d == 0]
        raise UserError(f"{n_flag} {N} must divide the model's {T} train timesteps (e.g. "
                        f"{', '.join(map(str, divisors))})")


@exit_on_user_error
def teacher_main(argv=None) -> list[dict]:
    args = teacher_parser().parse_args(argv)
    _check_compile_flags(args)
    scoring.check_trackers(args.report_to)
    args.pretrained_teacher_model = args.pretrained_teacher_model or PAPER_TEACHER
    args.seed = 24 if args.seed is None else args.seed
    args.init_noise = _abs(args.init_noise)
    dgm = scoring.metric_names(args.dgm_metrics)
    notes = []

    real = None
    if args.train_data_dir:
        captions, real = read_metadata(args.train_data_dir, args.caption_column, args.image_column)
    if args.captions_file:
        captions = read_captions_file(args.captions_file)
    elif not args.train_data_dir:
        raise UserError("give the captions: --train_data_dir (the training image folder with metadata.csv) or "
                        "--captions_file")
    if dgm and real is None:
        raise UserError("FID / FD-DINO of the teacher need the real images: pass --train_data_dir, or "
                        "--dgm_metrics none")
    count = _count(args, captions)
    notes.append(empty_caption_note(captions[:count], args.captions_file or args.train_data_dir))
    missing = next((p for p in (real or [])[:count] if not p.is_file()), None)
    if missing is not None:
        raise UserError(f"real image '{missing}' listed in the metadata of --train_data_dir does not exist")
    N, w = args.num_original_inference_steps, float(args.guidance_scale)
    _resolve_size_and_grid(args, N, "--num_original_inference_steps")
    init = InitNoise(args.seed, args.resolution, len(captions), args.init_noise)
    state = _state()
    for note in notes if state.is_main_process else []:
        if note:
            warn(note)

    folder = Path(args.output_dir) / "train_gen_images" / f"{N}_steps" / f"{w}_gscale"
    store = SampleStore(folder, args.resolution, args.image_format)
    identity = {"kind": "teacher", "model": args.pretrained_teacher_model,
                "vae": args.pretrained_vae_model_name_or_path, "revision": args.revision,
                "teacher_revision": args.teacher_revision, "scheduler": args.scheduler, "num_steps": N,
                "guidance_scale": w, "resolution": args.resolution, "weight_dtype": args.weight_dtype,
                "image_format": args.image_format, **init.fingerprint()}
    crop_dir = Path(args.output_dir) / "real_images" / f"{args.resolution}px"

    def real_paths(indices, write=False):
        # The raw files, as dgm-eval reads the folder (each squashed to the network's input size by its
        # preprocessing); --real_image_crop: resized and center-cropped copies at --resolution.
        if not args.real_image_crop:
            return [real[i] for i in indices if i < len(real)]
        return [prepare_reference_image(real[i], crop_dir / f"{i}.png", args.resolution, write) for i in indices
                if i < len(real)]

    def prepare(indices):
        if real is not None and args.real_image_crop and (dgm or args.num_log_images):
            real_paths(indices, True)

    def score(n):
        refs = real_paths(range(n)) if dgm else None
        cache = args.metrics_cache_dir or Path(args.output_dir) / "metrics_cache"
        return _quality(args, store, refs, captions[:n], n, state.device, cache)

    def grid(n):
        k = min(n, args.num_log_images)
        top = real_paths(range(k)) if real is not None else []
        return ([top] if len(top) == k else []) + [[store.image_path(i) for i in range(k)]]

    job = Job(store=store, identity=identity, config=_resolved_config(args, identity, state),
              desc=f"teacher {args.scheduler} N={N} w={w}", setting=f"teacher/{args.scheduler}/{N}_steps/{w}_gscale",
              row={"kind": "teacher", "method": "teacher", "solver": args.scheduler,
                   "num_original_inference_steps": N, "guidance_scale": w, "num_inference_steps": N,
                   "resolution": args.resolution, "seed": args.seed, "image_format": args.image_format,
                   "real_reference": "crop" if args.real_image_crop else "raw"},
              tb_group=f"teacher_{args.scheduler}_w{w}", tb_step=N,
              make_sampler=lambda m: teacher_sampler(m, args.scheduler, N, w, args.cfg_batched, args.compile,
                                                     freezing=args.compile_freezing,
                                                     channels_last=args.compile_channels_last),
              score=score, grid=grid, prepare=prepare)
    return run_jobs(args, state, [job], captions, count, init, lambda dev: load_models(args, dev))


# ---------------------------------------------------------------------------------------------
# test.py


def resolve_lora(output_dir: Path, choice: str) -> tuple[Path, str]:
    """(folder holding pytorch_lora_weights.safetensors, its name) for --lora_weights."""
    if not output_dir.is_dir():
        raise UserError(f"--output_dir '{output_dir}' does not exist (the training run's folder with the LoRA)")
    ckpts = sorted((p for p in output_dir.glob("checkpoint-*")
                    if re.fullmatch(r"checkpoint-\d+", p.name) and (p / LORA_WEIGHT_NAME).is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    final = (output_dir / LORA_WEIGHT_NAME).is_file()
    if choice in ("auto", "final") and final:
        return output_dir, "final"
    if choice in ("auto", "latest") and ckpts:
        return ckpts[-1], ckpts[-1].name
    if choice not in ("auto", "final", "latest"):
        path = Path(choice) if Path(choice).is_dir() else output_dir / choice
        if (path / LORA_WEIGHT_NAME).is_file():
            return path, path.name
        raise UserError(f"--lora_weights '{choice}': no {LORA_WEIGHT_NAME} in '{path}'")
    what = {"auto": f"{LORA_WEIGHT_NAME} or checkpoint-*/{LORA_WEIGHT_NAME}", "final": LORA_WEIGHT_NAME,
            "latest": f"checkpoint-*/{LORA_WEIGHT_NAME}"}[choice]
    raise UserError(f"no LoRA weights in '{output_dir}' (looked for {what}): train first, or pass --lora_weights")


def _final_step(output_dir: Path) -> int | None:
    """The training step of a run's final weights: the last step of train_log.jsonl, else the configuration's
    max_train_steps."""
    log = output_dir / "train_log.jsonl"
    if log.is_file():
        for line in reversed(log.read_text().splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    step = _read_json(output_dir / TRAINING_CONFIG).get("max_train_steps")
    return int(step) if isinstance(step, (int, float)) else None


def weights_step(output_dir: Path, weights: str) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", weights)
    return int(m[1]) if m else _final_step(output_dir) if weights == "final" else None


def select_checkpoints(output_dir: Path, spec: str) -> list[tuple[Path, str, int | None]]:
    """(folder with the LoRA, its name, its training step) of ``--checkpoints`` all | latest | N,M, in training
    order; the final weights stand for the run's last step (a checkpoint of the same step is the same)."""
    if not output_dir.is_dir():
        raise UserError(f"--output_dir '{output_dir}' does not exist (the training run's folder with the LoRA)")
    found = {int(p.name.split("-")[1]): (p, p.name) for p in output_dir.glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / LORA_WEIGHT_NAME).is_file()}
    final = _final_step(output_dir) if (output_dir / LORA_WEIGHT_NAME).is_file() else None
    if (output_dir / LORA_WEIGHT_NAME).is_file():
        found[final if final is not None else max(found, default=0) + 1] = (output_dir, "final")
    if not found:
        raise UserError(f"no LoRA weights in '{output_dir}' (looked for {LORA_WEIGHT_NAME} and "
                        f"checkpoint-*/{LORA_WEIGHT_NAME}): train first")
    if spec == "all":
        steps = sorted(found)
    elif spec == "latest":
        steps = [max(found)]
    else:
        try:
            steps = [int(x) for x in spec.replace(" ", ",").split(",") if x]
        except ValueError:
            raise UserError(f"--checkpoints '{spec}': give all, latest or training steps like 500,1000") from None
        missing = [s for s in steps if s not in found]
        if missing or not steps:
            raise UserError(f"--checkpoints {spec}: no weights of step {', '.join(map(str, missing))} in "
                            f"'{output_dir}' (there are: {', '.join(map(str, sorted(found)))})")
    steps = list(dict.fromkeys(steps))
    return [(found[s][0], found[s][1], s if found[s][1] != "final" or final is not None else None) for s in steps]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is not readable JSON ({type(e).__name__}): restore it, or delete it and rerun "
                        "the program that wrote it") from None
    return data if isinstance(data, dict) else {}


def _teacher_folder(path: str | None) -> Path:
    if not path:
        raise UserError("--train_data_dir: give the teacher reference folder "
                        "(.../train_gen_images/{N}_steps/{w}_gscale written by test_teacher.py)")
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--train_data_dir: folder '{folder}' does not exist (run test_teacher.py first)")
    if not any(folder.glob("0.*")) and (folder / "train_gen_images").is_dir():
        found = sorted(str(p) for p in (folder / "train_gen_images").glob("*/*") if p.is_dir())
        raise UserError(f"--train_data_dir '{folder}' is a test_teacher.py output folder; pass one of its sample "
                        f"folders: {', '.join(found) or 'none yet'}")
    return folder


def _teacher_format(folder: Path, identity: dict) -> str:
    """The file format of the teacher's samples: its config's, else that of its first image."""
    if identity:
        return identity.get("image_format", "png")  # folders written before the option held PNGs
    return "png" if (folder / "0.png").is_file() and not (folder / "0.jpg").is_file() else "jpg"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _check_lora_file(path: Path) -> None:
    """A LoRA file that loads and holds finite weights, checked before any model loads."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise UserError(f"LoRA file '{path}' cannot be read ({type(e).__name__}): it is truncated or not a "
                        "safetensors file; pick another --lora_weights (e.g. a checkpoint-* folder)") from None
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"LoRA file '{path}' holds non-finite weights (NaN/Inf in {bad}): the training diverged; "
                        "evaluate an earlier checkpoint with --lora_weights checkpoint-<step>")


def _read_teacher_latents(path: Path) -> torch.Tensor:
    try:
        t = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise UserError(f"teacher latents '{path}' cannot be read ({type(e).__name__}: truncated or corrupt): delete "
                        "it and rerun test_teacher.py to regenerate the references") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        raise UserError(f"teacher latents '{path}' is not a [num_captions, 4, H/8, W/8] tensor: delete it and rerun "
                        "test_teacher.py to regenerate the references")
    return t


def _reference_mismatches(t_id: dict, teacher_dir: Path, train_cfg: dict, args, init: InitNoise) -> list[str]:
    """The settings in which the teacher references differ from the student's: N (its training grid), w (its
    training guidance), resolution and initial noise; read from the references' eval_config.json (or, for a
    folder without one, N and w from its path .../{N}_steps/{w}_gscale)."""
    ref_N, ref_w, ref_res = t_id.get("num_steps"), t_id.get("guidance_scale"), t_id.get("resolution")
    if not t_id:
        m = re.search(r"(\d+)_steps/([0-9.]+)_gscale$", teacher_dir.resolve().as_posix())
        ref_N, ref_w = (int(m[1]), float(m[2])) if m else (None, None)
    src = f"the student's {TRAINING_CONFIG}" if train_cfg else "the student's flags"
    stu_N = train_cfg.get("num_discr_timesteps", args.num_original_inference_steps)
    stu_w = train_cfg.get("w")
    diffs = []
    if ref_N is not None and int(ref_N) != int(stu_N):
        diffs.append(f"N {ref_N} (references) vs {stu_N} ({src})")
    if ref_w is not None and stu_w is not None and float(ref_w) != float(stu_w):
        diffs.append(f"w {float(ref_w)} (references) vs {float(stu_w)} ({src})")
    if ref_res is not None and int(ref_res) != args.resolution:
        diffs.append(f"resolution {ref_res} (references) vs {args.resolution} (--resolution / --init_noise)")
    elif "seed" in t_id:
        ref_file = t_id.get("init_noise")
        ref = t_id.get("init_noise_row0") if ref_file else InitNoise(t_id["seed"], args.resolution, 1).digest()
        if ref is None or abs(float(ref) - init.digest()) > 1e-6 * max(1.0, abs(float(ref))):
            name = lambda f, s: f"--init_noise {f}" if f else f"seed {s}"  # noqa: E731
            diffs.append(f"initial noise {name(ref_file, t_id['seed'])} (references) vs "
                         f"{name(args.init_noise, args.seed)} (student)")
    return diffs


def _student_jobs(args, state, out, lora_dir, weights, train_step, N, c, init, train_cfg, teacher_dir, teacher_image,
                  score_fn, load, recorded, count) -> list[Job]:
    """The jobs of one set of weights, one per number of sampling steps; with --checkpoints, none for a
    setting that metrics.json records for the same weights, captions and references (a rerun skips it)."""
    tag = weights + ("" if args.lora_scale == 1.0 else f"_lora{args.lora_scale}")
    base_identity = {"kind": "student", "model": args.pretrained_teacher_model,
                     "vae": args.pretrained_vae_model_name_or_path, "revision": args.revision,
                     "teacher_revision": args.teacher_revision, "lora_sha256": _sha256(lora_dir / LORA_WEIGHT_NAME),
                     "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                     "lora_target_modules": args.lora_target_modules, "lora_scale": args.lora_scale,
                     "fuse_lora": args.fuse_lora, "num_discr_timesteps": N, "timestep_scaling_factor": c,
                     "resolution": args.resolution, "weight_dtype": args.weight_dtype,
                     "image_format": args.image_format, **init.fingerprint()}

    jobs = []
    for K in dict.fromkeys(args.num_inference_steps):
        store = SampleStore(out / "train_gen_images" / tag / f"{K}_steps", args.resolution, args.image_format)
        identity = {**base_identity, "num_inference_steps": K}
        jobs.append(Job(
            store=store, identity=identity,
            config=_resolved_config(args, identity, state, lora_folder=str(lora_dir.resolve()),
                                    teacher_folder=str(teacher_dir.resolve())),
            desc=f"student {tag} K={K}", setting=f"student/{tag}/{K}_steps",
            row={"kind": "student", "method": train_cfg.get("objective"), "weights": weights,
                 "training_step": train_step, "lora_sha256": identity["lora_sha256"],
                 "lora_scale": args.lora_scale, "num_inference_steps": K, "num_original_inference_steps": N,
                 "timestep_scaling_factor": c, "resolution": args.resolution, "seed": args.seed,
                 "image_format": args.image_format, "teacher_folder": str(teacher_dir)},
            tb_group=f"student_{tag}", tb_step=K, load=load, train_step=train_step,
            make_sampler=lambda m, K=K: student_sampler(m, N, K, args.seed, c, args.compile,
                                                        channels_last=args.compile_channels_last),
            score=score_fn(store),
            grid=lambda n, store=store: [[teacher_image(i) for i in range(min(n, args.num_log_images))],
                                         [store.image_path(i) for i in range(min(n, args.num_log_images))]]))

    if args.checkpoints and not args.overwrite:
        def finished(job):
            r = recorded.get(job.setting, {})
            return (r.get("lora_sha256") == job.identity["lora_sha256"] and r.get("num_images") == count
                    and r.get("teacher_folder") == str(teacher_dir) and r.get("seed") == args.seed
                    and job.store.folder.is_dir() and len(job.store.done(range(count))) == count)
        done = [j for j in jobs if finished(j)]
        if done and state.is_main_process:
            print(f"{weights}: {len(done)} of {len(jobs)} settings already evaluated, skipped", flush=True)
        jobs = [j for j in jobs if not any(j is d for d in done)]
    return jobs


@exit_on_user_error
def student_main(argv=None) -> list[dict]:
    args = student_parser().parse_args(argv)
    _check_compile_flags(args)
    if args.output_dir is None:
        raise UserError("--output_dir: give the training run's output folder (it holds the LoRA)")
    out = Path(args.output_dir)
    scoring.check_trackers(args.report_to)
    if args.checkpoints:
        selected = select_checkpoints(out, args.checkpoints)
    else:
        lora_dir, weights = resolve_lora(out, args.lora_weights)
        selected = [(lora_dir, weights, weights_step(out, weights))]
    lora_dir = selected[-1][0]
    if args.guidance_scale != 0:
        raise UserError("--guidance_scale must be 0: the student samples unguided")
    teacher_dir = _teacher_folder(args.train_data_dir)
    notes = []  # warnings, printed once the inputs are known to be valid
    train_cfg = _read_json(lora_dir / TRAINING_CONFIG) or _read_json(out / TRAINING_CONFIG)
    if not train_cfg:
        notes.append(f"no {TRAINING_CONFIG} in '{out}': LoRA and grid settings fall back to flags and paper defaults")
    t_cfg = _read_json(teacher_dir / CONFIG_NAME)
    t_args, t_id = t_cfg.get("args", {}), t_cfg.get("identity", {})
    if not t_id:
        notes.append(f"no {CONFIG_NAME} in the teacher folder '{teacher_dir}': its resolution and noise cannot be "
                     "checked against the student's")

    # Defaults: flag > training config > the teacher folder's config > paper.
    def pick(flag, train_key, teacher_key, default):
        for v in (flag, train_cfg.get(train_key), t_args.get(teacher_key) if teacher_key else None):
            if v is not None:
                return v
        return default

    args.pretrained_teacher_model = pick(args.pretrained_teacher_model, "pretrained_teacher_model",
                                         "pretrained_teacher_model", PAPER_TEACHER)
    args.pretrained_vae_model_name_or_path = pick(args.pretrained_vae_model_name_or_path,
                                                  "pretrained_vae_model_name_or_path",
                                                  "pretrained_vae_model_name_or_path", None)
    n_from = ("--num_original_inference_steps" if args.num_original_inference_steps is not None else
              f"num_discr_timesteps of {TRAINING_CONFIG}" if "num_discr_timesteps" in train_cfg else
              "--num_original_inference_steps (the references' N)")
    args.num_original_inference_steps = int(pick(args.num_original_inference_steps, "num_discr_timesteps",
                                                 "num_original_inference_steps", 100))
    args.timestep_scaling_factor = float(pick(args.timestep_scaling_factor, "timestep_scaling_factor", None, 10.0))
    args.lora_rank = int(pick(args.lora_rank, "lora_rank", None, 64))
    args.lora_alpha = float(pick(args.lora_alpha, "lora_alpha", None, 64))
    args.lora_target_modules = list(pick(args.lora_target_modules, "lora_target_modules", None, DEFAULT_LORA_TARGETS))
    # The noise and the resolution default to the references' (a one-to-one comparison needs the same);
    # a noise file given here fixes the resolution itself.
    if args.resolution is None and args.init_noise is None:
        args.resolution = t_id.get("resolution", t_args.get("resolution"))
    for key in ("seed", "init_noise"):
        if getattr(args, key) is None:
            setattr(args, key, t_id.get(key, t_args.get(key)))
    args.seed = 24 if args.seed is None else args.seed
    args.init_noise = _abs(args.init_noise)
    _resolve_size_and_grid(args, args.num_original_inference_steps, n_from)

    if args.captions_file:
        captions = read_captions_file(args.captions_file)
    elif (teacher_dir / CAPTIONS_NAME).is_file():
        captions = json.loads((teacher_dir / CAPTIONS_NAME).read_text(encoding="utf-8"))
    else:
        raise UserError(f"no {CAPTIONS_NAME} in the teacher folder '{teacher_dir}': pass the captions it was "
                        "generated from with --captions_file")
    count = _count(args, captions)
    notes.append(empty_caption_note(captions[:count], teacher_dir / CAPTIONS_NAME))
    init = InitNoise(args.seed, args.resolution, len(captions), args.init_noise)

    diffs = _reference_mismatches(t_id, teacher_dir, train_cfg, args, init)
    if diffs:
        n = train_cfg.get("num_discr_timesteps", args.num_original_inference_steps)
        fix = (f"test_teacher.py --num_original_inference_steps {n}"
               + (f" --guidance_scale {float(train_cfg['w'])}" if "w" in train_cfg else "")
               + f" --resolution {args.resolution}"
               + (f" --init_noise {args.init_noise}" if args.init_noise else f" --seed {args.seed}"))
        msg = f"the teacher references '{teacher_dir}' do not match this student: {'; '.join(diffs)}"
        if not args.allow_reference_mismatch:
            raise UserError(f"{msg}: pass references made with the student's settings ({fix}) as --train_data_dir, "
                            "or add --allow_reference_mismatch to score anyway")
        notes.append(f"{msg} (--allow_reference_mismatch)")
    # The teacher's samples: images are required (each decoded once here), latents.pt only for the ODE error.
    t_fmt = _teacher_format(teacher_dir, t_id)

    def teacher_image(i: int) -> Path:
        return teacher_dir / f"{i}.{t_fmt}"

    res = (args.resolution, args.resolution)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        ok = list(pool.map(lambda i: image_complete(teacher_image(i), res), range(count)))
    if not all(ok):
        bad = ok.index(False)
        p = teacher_image(bad)
        size = image_size(p)
        what = ("missing" if not p.is_file() else "unreadable" if size is None else
                f"{size[0]}x{size[1]} px, not {res[0]}x{res[1]}" if size != res else "truncated or corrupt")
        raise UserError(f"teacher image '{p}' is {what} (caption {bad} of {count}): complete the references with "
                        "test_teacher.py (it regenerates missing and broken images), or pass --max_prompts")
    t_latents = teacher_dir / LATENTS_NAME
    if t_latents.is_file():
        tl = _read_teacher_latents(t_latents)
        if tuple(tl.shape[1:]) != latent_shape(args.resolution):
            raise UserError(f"{t_latents} holds latents of shape {tuple(tl.shape[1:])}, not "
                            f"{latent_shape(args.resolution)} of --resolution {args.resolution}")
        if tl.shape[0] < count:
            raise UserError(f"{t_latents} has {tl.shape[0]} rows for {count} captions (is its run unfinished?): "
                            "complete it with test_teacher.py, or pass --max_prompts")
    else:
        notes.append(f"no {LATENTS_NAME} in the teacher folder '{teacher_dir}': the ODE solving error is skipped")
    for K in args.num_inference_steps:
        if not 1 <= K <= args.num_original_inference_steps:
            raise UserError(f"--num_inference_steps {K} must lie in 1..{args.num_original_inference_steps} "
                            "(the grid size N)")
    for d, _, _ in selected:
        _check_lora_file(d / LORA_WEIGHT_NAME)
    state = _state()
    for note in notes if state.is_main_process else []:
        if note:
            warn(note)

    N, c = args.num_original_inference_steps, args.timestep_scaling_factor

    def score_fn(store):
        def score(n):
            ref = [teacher_image(i) for i in range(n)]
            metrics = scoring.pixel_errors([store.image_path(i) for i in range(n)], ref)
            if t_latents.is_file():
                metrics["ode_error"] = scoring.ode_error(store.latents(n), _read_teacher_latents(t_latents)[:n])
            # Teacher-image features are cached beside them, for every student scored against them.
            cache = args.metrics_cache_dir or (teacher_dir / "metrics_cache" if os.access(teacher_dir, os.W_OK)
                                               else out / "metrics_cache")
            return {**_quality(args, store, ref, captions[:n], n, state.device, cache), **metrics}
        return score

    def attach_lora_fn(lora_dir):
        def attach_lora(unet):
            from ..models import add_lora, load_lora_into

            add_lora(unet, args.lora_rank, args.lora_alpha, 0.0, args.lora_target_modules)
            load_lora_into(unet, lora_dir)
            if args.lora_scale != 1.0:
                unet.set_adapters(["default"], weights=[args.lora_scale])
            if args.fuse_lora:
                unet.fuse_lora()  # merges at the scale set above
        return lambda dev: load_models(args, dev, attach_lora)

    jobs = []
    recorded = results.load(out)
    for lora_dir, weights, train_step in selected:
        jobs += _student_jobs(args, state, out, lora_dir, weights, train_step, N, c, init, train_cfg, teacher_dir,
                              teacher_image, score_fn, attach_lora_fn(lora_dir), recorded, count)
    if not jobs:
        if state.is_main_process:
            print(f"every selected checkpoint of '{out}' is evaluated already: nothing to do (see "
                  f"{out / results.METRICS_NAME})", flush=True)
        state.destroy_process_group()
        return []
    return run_jobs(args, state, jobs, captions, count, init, jobs[0].load)


# ---------------------------------------------------------------------------------------------
# make_init_noise


def init_noise_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write the shared initial noise of the evaluation (data/init_noise.pt): "
                                            "row i = the per-caption noise of caption i, the values test_teacher.py "
                                            "and test.py draw without the file.", formatter_class=_HelpFormatter)
    g = p.add_argument_group("captions (one of)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--num_captions", type=int, help="number of rows")
    src.add_argument("--train_data_dir", help="image folder with metadata.csv: one row per caption")
    src.add_argument("--captions_file", help="captions file (one a line, or a JSON list): one row per caption")
    g.add_argument("--caption_column", default="text", help="caption column of the metadata")
    g = p.add_argument_group("noise")
    g.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels (default: --pretrained_teacher_model's own size, else 1024, SDXL's)")
    g.add_argument("--pretrained_teacher_model", default=None,
                   help="a pipeline whose own size (UNet sample_size x VAE factor) is the resolution when "
                        "--resolution is not given")
    g.add_argument("--seed", type=int, default=24, help="noise seed, the paper's")
    g.add_argument("--output", default="data/init_noise.pt", help="the file to write")
    return p


@exit_on_user_error
def init_noise_main(argv=None) -> Path:
    args = init_noise_parser().parse_args(argv)
    if args.resolution is None:
        args.resolution = model_defaults(args.pretrained_teacher_model)[0] if args.pretrained_teacher_model else 1024
    latent_shape(args.resolution)
    if args.num_captions is not None:
        n = args.num_captions
    elif args.train_data_dir:
        n = len(read_metadata(args.train_data_dir, args.caption_column)[0])
    else:
        n = len(read_captions_file(args.captions_file))
    if n < 1:
        raise UserError("no captions: the noise file would be empty")
    path = make_init_noise(args.output, n, args.resolution, args.seed)
    print(f"wrote {path}: {n} x {latent_shape(args.resolution)} noise ({args.resolution} px), seed {args.seed}")
    return path
