#!/usr/bin/env python
"""A full-size SDXL pipeline folder with random weights, and a folder of random training images, so that the
training scripts run at the paper's size on a GPU where no weights or data can be downloaded.

    python benchmarks/random_sdxl.py --out /tmp/sdxl --data /tmp/data --images 64
    python train_cm.py --pretrained_teacher_model /tmp/sdxl --train_data_dir /tmp/data --resolution 1024 ...

The folder is what ``StableDiffusionXLPipeline.save_pretrained`` writes (the networks that ``benchmarks/bench.py``
times: 2,567,463,684 UNet parameters, the SDXL VAE, CLIP ViT-L and OpenCLIP bigG text encoders,
the real CLIP tokenizer), so the scripts load it through the path they take for the real model. Speed and memory
are those of SDXL; the pictures are noise. ``--tiny`` writes the tiny test pipeline instead (for the CPU test).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cmdistill import tiny  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# SDXL base 1.0 (the configs of stabilityai/stable-diffusion-xl-base-1.0), random weights.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025,
)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", **_CLIP)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu", **_CLIP)
# Parameter counts of the real SDXL components (tests/test_bench.py checks them on the meta device).
SDXL_UNET_PARAMS, SDXL_VAE_PARAMS, CLIP_L_PARAMS, CLIP_BIGG_PARAMS = 2_567_463_684, 83_653_863, 123_060_480, 694_659_840


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def full_size_components(device: str = "meta") -> dict:
    """The SDXL networks, full size, random weights, created directly on ``device`` (fp32), and the schedule."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE)
        te1, te2 = CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    n = count_params(unet)
    assert n == SDXL_UNET_PARAMS, f"SDXL UNet config gives {n:,} parameters, expected {SDXL_UNET_PARAMS:,}"
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
