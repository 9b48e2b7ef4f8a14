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

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"image file '{path}' does not decode ({type(e).__name__}: truncated or corrupt): delete it "
                        "and rerun the program that wrote it to regenerate it") from None


def pixel_errors(gen_paths, ref_paths) -> dict:
    """Pixel-space MSE (images in [0, 1]) and PSNR (dB, per image, capped at 100), averaged over pairs."""
    mse = np.array([np.mean((_pixels(g) - _pixels(r)) ** 2) for g, r in zip(gen_paths, ref_paths)])
    psnr = np.minimum(100.0, 10 * np.log10(1.0 / np.maximum(mse, 1e-10)))
    return {"pixel_mse": float(mse.mean()), "psnr": float(psnr.mean())}


def metric_names(names) -> list[str]:
    return [n for n in names if n.lower() != "none"]


def _metrics():
    try:
        from .. import metrics
    except ImportError as e:
        raise UserError(f"metrics need cmdistill.metrics ({e}); pass --dgm_metrics none --instance_metrics none "
                        "to skip them") from None
    return metrics


def instance_featurizer(args, device):
    """``images -> {extractor: {"identity", "features"}}`` for the instance metrics (CLIP and aesthetic
    scores read the in-memory image, as the paper's scripts do), or None without instance metrics.
    Loads the networks now, so that missing weights fail before the generator loads."""
    instance = metric_names(args.instance_metrics)
    if not instance:
        return None
    m = _metrics()
    names = m.instance_extractor_names(instance)
    for n in names:
        m.load_feature_extractor(n, device=device, weights_dir=args.metrics_weights_dir)
    return lambda images: m.image_features(images, names, device=device, weights_dir=args.metrics_weights_dir,
                                           batch_size=args.dgm_metrics_batch_size)


def stored_features(args, store, n: int, device) -> tuple[dict, list[str]]:
    """The stored in-memory-image features of samples 0..n-1 that the instance metrics need, and notes
    on the extractors whose features are missing for some sample (those are read from the files)."""
    instance = metric_names(args.instance_metrics)
    if not instance:
        return {}, []
    m = _metrics()
    from ..metrics.compute import extractor_identity

    stored, out, notes = store.instance_features(), {}, []
    for name in m.instance_extractor_names(instance):
        ex = m.load_feature_extractor(name, device=device, weights_dir=args.metrics_weights_dir)
        entry = stored.get(name, {})
        rows = entry.get("rows", {}) if entry.get("identity") == extractor_identity(ex) else {}
        missing = sum(i not in rows for i in range(n))
        if missing:
            notes.append(f"{name} features of {missing} of {n} samples in '{store.folder}' were not stored at generation "
                         "(generated without these instance metrics, or with other weights): read from the saved "
                         "image files instead of the in-memory images")
        else:
            out[name] = torch.stack([rows[i] for i in range(n)]).numpy()
    return out, notes


def quality_metrics(args, gen_paths, ref_paths, captions, device, cache_dir, gen_features=None) -> dict:
    """FID, FD-DINOv2, CLIP and aesthetic scores from ``cmdistill.metrics`` (imported only when asked):
    FDs from the saved files, instance metrics from ``gen_features`` (the in-memory images) where given."""
    dgm, instance = metric_names(args.dgm_metrics), metric_names(args.instance_metrics)
    if not dgm and not instance:
        return {}
    return _metrics().compute_metrics(
        [str(p) for p in gen_paths], [str(p) for p in ref_paths] if ref_paths else None, list(captions),
        dgm_metrics=dgm, dgm_models=args.dgm_models, instance_metrics=instance, batch_size=args.dgm_metrics_batch_size,
        device=device, weights_dir=args.metrics_weights_dir, cache_dir=str(cache_dir) if cache_dir else None,
        gen_features=gen_features)


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
