"""Scores of one evaluated setting (SPEC §9) and their TensorBoard logging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


def ode_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """SPEC §9 ODE solving error: MSE in scaled latent space between the student's sample and the
    teacher's ODE solution from the same noise, per caption (row), averaged over captions."""
    d = (student.double() - teacher.double()).flatten(1)
    return float((d**2).mean(1).mean())


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def pixel_errors(gen_paths, ref_paths) -> dict:
    """Pixel-space MSE (images in [0, 1]) and PSNR (dB, per image, capped at 100), averaged over pairs."""
    mse = np.array([np.mean((_pixels(g) - _pixels(r)) ** 2) for g, r in zip(gen_paths, ref_paths)])
    psnr = np.minimum(100.0, 10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
    return {"pixel_mse": float(mse.mean()), "psnr": float(psnr.mean())}


def metric_names(names) -> list[str]:
    return [n for n in names if n.lower() != "none"]


def quality_metrics(args, gen_paths, ref_paths, captions, device, cache_dir) -> dict:
    """FID, FD-DINOv2, CLIP and aesthetic scores from ``cmdistill.metrics`` (imported only when asked)."""
    dgm, instance = metric_names(args.dgm_metrics), metric_names(args.instance_metrics)
    if not dgm and not instance:
        return {}
    try:
        from ..metrics import compute_metrics
    except ImportError as e:
        raise UserError(f"metrics need cmdistill.metrics ({e}); pass --dgm_metrics none --instance_metrics none "
                        "to skip them") from None
    return compute_metrics([str(p) for p in gen_paths], [str(p) for p in ref_paths] if ref_paths else None,
                           list(captions), dgm_metrics=dgm, dgm_models=args.dgm_models, instance_metrics=instance,
                           batch_size=args.dgm_metrics_batch_size, device=device,
                           weights_dir=args.metrics_weights_dir, cache_dir=str(cache_dir) if cache_dir else None)


def comparison_grid(rows: list[list[Path]], size: int = 256) -> torch.Tensor:
    """A CHW uint8 grid, one row of images per list (e.g. teacher above student, same noise)."""
    from PIL import Image
    from torchvision.utils import make_grid

    tiles = []
    for row in rows:
        for p in row:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            tiles.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
    return make_grid(torch.stack(tiles), nrow=len(rows[0]), padding=2)


def log_tensorboard(log_dir: Path, group: str, step: int, metrics: dict, grid_rows: list[list[Path]] | None,
                    grid_tag: str) -> None:
    """Scalars ``{group}/{metric}`` at ``step`` (the number of sampling steps) and a comparison grid."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None:
                writer.add_scalar(f"{group}/{k}", v, step)
        if grid_rows and grid_rows[0]:
            writer.add_image(f"{group}/{grid_tag}", comparison_grid(grid_rows), step)
