"""What ``test_teacher.py`` and ``test.py`` share before any model loads: their common flags (the reference
scripts' names), the checks of those flags, and the one-line warnings both print.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..args import HelpFormatter
from ..errors import UserError
from ..fast import plan
from ..models import SDXL_BASE
from ..run_folder import CONFIG_NAME
from ..schedule import check_grid_size
from ..trackers import REPORT_TO
from .generate import DTYPES
from .inputs import latent_shape, model_defaults, noise_resolution, read_noise_file
from .store import CAPTIONS_NAME, IMAGE_FORMATS


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def common_parser(description: str, output_help: str, student: bool = False) -> argparse.ArgumentParser:
    """The flags of both programs; ``student``: with test.py's help texts (its defaults come from the run)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    run = f"{CONFIG_NAME}'s, else " if student else ""  # test.py's defaults come from the run and references
    refs = "the references', else " if student else ""
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_teacher_model", default=None,
                   help=f"hub id or local folder of the SDXL pipeline (default: {run}{SDXL_BASE})")
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
    g.add_argument("--compile", nargs="?", const="on", default="auto", type=plan.choice, choices=plan.CHOICES,
                   help="torch.compile the UNet (batch dimension dynamic): faster sampling on a GPU after a compile "
                        "of a few minutes, same values to kernel rounding. auto: on a GPU when the UNet calls "
                        "planned repay the compile time (estimated, logged); --compile alone: on")
    g.add_argument("--compile_channels_last", action="store_true",
                   help="when compiled: the UNet in channels_last, convolutions in cuDNN's native layout, "
                        "group norms with per-channel statistics (fast.compile_unet); same values to kernel "
                        "rounding (the scripts add it)")
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
    g.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                   help="trackers of the metrics, grids and captions (accelerate's): tensorboard writes "
                        "--logging_dir/evaluation")
    return p


def check_compile_flags(args) -> None:
    """The options of the compiled UNet need a compile that can happen (--compile on or auto)."""
    for flag in plan.SAMPLING_FLAGS:
        if getattr(args, flag, False) and args.compile == "off":
            raise UserError(f"--{flag} applies to the compiled UNet: drop it, or pass --compile on or auto (COMPILE=1 "
                            "or auto)")


def resolve_size_and_grid(args, N: int, n_flag: str) -> None:
    """Before any model loads: ``args.resolution`` (flag, else the --init_noise file's size, else the
    model's own) and a grid size N that divides the model's train timesteps."""
    size, T = model_defaults(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path, args.revision,
                             args.teacher_revision)
    if args.init_noise and args.resolution is None:
        args.resolution = noise_resolution(read_noise_file(args.init_noise))
    args.resolution = args.resolution or size
    latent_shape(args.resolution)  # a multiple of 8
    check_grid_size(T, N, n_flag)


def caption_count(args, captions: list[str]) -> int:
    """How many of ``captions`` are evaluated (``--max_prompts``), with --batch_size checked."""
    if not captions:
        raise UserError("no captions to evaluate")
    if args.batch_size < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise UserError("--batch_size and --max_prompts must be positive")
    return len(captions) if args.max_prompts is None else min(args.max_prompts, len(captions))


def absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None
