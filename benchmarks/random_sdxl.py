#!/usr/bin/env python
"""A full-size SDXL pipeline folder with random weights, and a folder of random training images, so that the
training scripts run at the paper's size on a GPU where no weights or data can be downloaded.

    python benchmarks/random_sdxl.py --out /tmp/sdxl --data /tmp/data --images 64
    python train_cm.py --pretrained_teacher_model /tmp/sdxl --train_data_dir /tmp/data --resolution 1024 ...

The folder is what ``StableDiffusionXLPipeline.save_pretrained`` writes (the same networks as
``benchmarks/bench.py``: 2,567,463,684 UNet parameters, the SDXL VAE, CLIP ViT-L and OpenCLIP bigG text encoders,
the real CLIP tokenizer), so the scripts load it through the path they take for the real model. Speed and memory
are those of SDXL; the pictures are noise. ``--tiny`` writes the tiny test pipeline instead (for the CPU test).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cmdistill import tiny  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def full_size_components(device: str) -> dict:
    spec = importlib.util.spec_from_file_location("cmdistill_bench", HERE / "bench.py")
    bench = sys.modules.setdefault("cmdistill_bench", importlib.util.module_from_spec(spec))
    if not hasattr(bench, "build_sdxl_modules"):
        spec.loader.exec_module(bench)
    unet, vae, te1, te2 = bench.build_sdxl_modules(device)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, scheduler=tiny.sdxl_scheduler())


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random RGB pictures of ``size`` px with numbered captions and the ``metadata.csv`` the loader reads."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")
            w.writerow([f"{i:05d}.jpg", f"a random picture, number {i}"])
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights' dtype on disk (default fp16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the random weights are drawn (a GPU is much faster)")
    p.add_argument("--data", default=None, help="also write a training image folder here")
    p.add_argument("--images", type=int, default=64, help="pictures in --data (default 64)")
    p.add_argument("--size", type=int, default=1024, help="their size in px (default 1024)")
    p.add_argument("--tiny", action="store_true", help="the tiny test pipeline (seconds, CPU)")
    a = p.parse_args(argv)
    parts = tiny.tiny_sdxl_components() if a.tiny else full_size_components(a.device)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to("cpu", DTYPES[a.dtype])
    tiny.save_pipeline(a.out, parts)
    print(f"wrote {a.out}")
    if a.data:
        write_images(Path(a.data), a.images, a.size)
        print(f"wrote {a.images} pictures of {a.size} px to {a.data}")


if __name__ == "__main__":
    main()
