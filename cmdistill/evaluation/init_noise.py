"""``scripts/make_init_noise.py``: the shared initial noise of the evaluation as a file (docs/method.md §8)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..args import HelpFormatter
from ..errors import UserError, exit_on_user_error
from .inputs import latent_shape, make_init_noise, model_defaults, read_captions_file, read_metadata


def init_noise_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write the shared initial noise of the evaluation (data/init_noise.pt): "
                                            "row i = the per-caption noise of caption i, the values test_teacher.py "
                                            "and test.py draw without the file.", formatter_class=HelpFormatter)
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
