"""``test_teacher.py``: the teacher's ODE reference samples (docs/method.md §8) from the shared per-caption noise,
scored against the real training images (docs/method.md §9); the students are scored against these samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import empty_caption_note
from ..errors import UserError, exit_on_user_error
from ..guidance import GuidedEps
from ..models import SDXL_BASE
from ..solvers import EVALUATIONS, SOLVERS
from ..trackers import check_trackers
from . import scoring
from .driver import Job, process_state, quality, resolved_config, run_jobs
from .flags import absolute, caption_count, check_compile_flags, common_parser, resolve_size_and_grid, warn
from .generate import teacher_sampler
from .inputs import InitNoise, prepare_reference_image, read_captions_file, read_metadata
from .store import SampleStore


def teacher_parser() -> argparse.ArgumentParser:
    p = common_parser("Teacher reference samples: deterministic ODE sampling with classifier-free guidance from "
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
    g.add_argument("--scheduler", default="ddim", choices=list(SOLVERS), help="the ODE solver")
    g.add_argument("--num_original_inference_steps", type=int, default=100,
                   help="N, the number of solver steps (the paper's); must divide the model's train timesteps")
    g.add_argument("--guidance_scale", type=float, default=9.0, help="w, Imagen form (the paper's)")
    g.add_argument("--cfg_batched", action="store_true", help="conditional and unconditional passes as one batch")
    g.add_argument("--compile_freezing", action="store_true",
                   help="when compiled: inductor's freezing (the teacher's weights become constants of the "
                        "compiled graph; a longer compile; the script adds it)")
    p.set_defaults(output_dir="results/teacher")
    return p


@exit_on_user_error
def teacher_main(argv=None) -> list[dict]:
    args = teacher_parser().parse_args(argv)
    check_compile_flags(args)
    check_trackers(args.report_to)
    args.pretrained_teacher_model = args.pretrained_teacher_model or SDXL_BASE
    args.seed = 24 if args.seed is None else args.seed
    args.init_noise = absolute(args.init_noise)
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
    count = caption_count(args, captions)
    notes.append(empty_caption_note(captions[:count], args.captions_file or args.train_data_dir))
    missing = next((p for p in (real or [])[:count] if not p.is_file()), None)
    if missing is not None:
        raise UserError(f"real image '{missing}' listed in the metadata of --train_data_dir does not exist")
    N, w = args.num_original_inference_steps, float(args.guidance_scale)
    resolve_size_and_grid(args, N, "--num_original_inference_steps")
    init = InitNoise(args.seed, args.resolution, len(captions), args.init_noise)
    state = process_state()
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
        return quality(args, store, refs, captions[:n], n, state.device, cache)

    def grid(n):
        k = min(n, args.num_log_images)
        top = real_paths(range(k)) if real is not None else []
        return ([top] if len(top) == k else []) + [[store.image_path(i) for i in range(k)]]

    job = Job(store=store, identity=identity, config=resolved_config(args, identity, state),
              desc=f"teacher {args.scheduler} N={N} w={w}", setting=f"teacher/{args.scheduler}/{N}_steps/{w}_gscale",
              row={"kind": "teacher", "method": "teacher", "solver": args.scheduler,
                   "num_original_inference_steps": N, "guidance_scale": w, "num_inference_steps": N,
                   "resolution": args.resolution, "seed": args.seed, "image_format": args.image_format,
                   "real_reference": "crop" if args.real_image_crop else "raw"},
              tb_group=f"teacher_{args.scheduler}_w{w}", tb_step=N,
              unet_calls=N * EVALUATIONS[args.scheduler] * GuidedEps.passes(w),
              make_sampler=lambda m: teacher_sampler(m, args.scheduler, N, w, args.cfg_batched, args.compile == "on",
                                                     freezing=args.compile_freezing,
                                                     channels_last=args.compile_channels_last),
              score=score, grid=grid, prepare=prepare)
    return run_jobs(args, state, [job], captions, count, init)
