"""Scores of one evaluated setting (docs/method.md §9) and their TensorBoard logging."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


def ode_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """docs/method.md §9 ODE solving error: MSE in scaled latent space between the student's sample and the
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


def captioned_grid(rows: list[list[Path]], captions: list[str] | None = None, size: int | None = None,
                   row_labels: list[str] | None = None, label_width: int = 0, padding: int = 2, max_lines: int = 4):
    """A PIL image: one row of images per list (e.g. teacher above student, same noise), each column's caption
    wrapped under it (PIL's default font), optional row labels on the left. ``size``: tile size in pixels (default:
    the first image's width)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    ncols = max(len(r) for r in rows)
    tiles = []
    for row in rows:
        line = []
        for path in row:
            with Image.open(path) as im:
                im = im.convert("RGB")
                size = size or im.width
                line.append(im.resize((size, size), Image.BICUBIC) if im.size != (size, size) else im.copy())
        tiles.append(line)
    size = size or 64
    bbox = font.getbbox("Ag")
    line_h, char_w = bbox[3] - bbox[1] + 3, max(1, font.getbbox("abcdefghij")[2] // 10)
    wrapped = []
    for c in (captions or [])[:ncols]:
        w = textwrap.wrap(str(c), max(4, (size - 2) // char_w)) or [""]
        if len(w) > max_lines:
            w = w[:max_lines]
            w[-1] = w[-1][: max(1, len(w[-1]) - 3)] + "..."
        wrapped.append(w)
    band = (max((len(w) for w in wrapped), default=0) * line_h + 4) if wrapped else 0
    step = size + padding
    canvas = Image.new("RGB", (label_width + padding + ncols * step, padding + len(rows) * step + band), "white")
    draw = ImageDraw.Draw(canvas)
    for r, line in enumerate(tiles):
        if row_labels and r < len(row_labels):
            draw.text((4, padding + r * step + size // 2 - line_h // 2), row_labels[r], fill="black", font=font)
        for c, im in enumerate(line):
            canvas.paste(im, (label_width + padding + c * step, padding + r * step))
    top = padding + len(rows) * step + 2
    for c, w in enumerate(wrapped):
        for i, text in enumerate(w):
            draw.text((label_width + padding + c * step + 1, top + i * line_h), text, fill="black", font=font)
    return canvas


def comparison_grid(rows: list[list[Path]], size: int = 256, captions: list[str] | None = None) -> torch.Tensor:
    """A CHW uint8 grid, one row of images per list (e.g. teacher above student, same noise), the captions under
    the columns."""
    im = captioned_grid(rows, captions, size)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()




class Trackers:
    """The evaluation's logging through accelerate's trackers (``Accelerator(log_with=...)``): scalars, the
    comparison grids (captions under the columns) and the captions as text. Main process only."""

    def __init__(self, report_to: str, log_dir: Path):
        self.acc = None
        if report_to == "none":
            return
        from accelerate import Accelerator

        self.acc = Accelerator(log_with=report_to, project_dir=str(log_dir.parent), cpu=not torch.cuda.is_available())
        self.acc.init_trackers(log_dir.name)

    def log(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        if self.acc is not None and values:
            self.acc.log(values, step=step)

    def images(self, tag: str, grid_rows: list[list[Path]], captions: list[str], step: int) -> None:
        if self.acc is None or not grid_rows or not grid_rows[0]:
            return
        grid = comparison_grid(grid_rows, captions=captions)
        text = "\n".join(f"{i}. {c}" for i, c in enumerate(captions))
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                writer = tracker.tracker
                writer.add_image(f"{tag}/comparison", grid, step)
                writer.add_text(f"{tag}/captions", text.replace("\n", "  \n"), step)
                writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.tracker.log({f"{tag}/comparison": wandb.Image(grid.permute(1, 2, 0).numpy(), caption=text)},
                                    step=step)

    def figures(self, paths: dict, step: int) -> None:
        """PNG files (the plots of ``cmdistill.plots``) as images ``plots/<name>``."""
        if self.acc is None:
            return
        from PIL import Image

        for name, path in paths.items():
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
            tag = f"plots/{Path(name).stem}"
            for tracker in self.acc.trackers:
                if tracker.name == "tensorboard":
                    tracker.tracker.add_image(tag, torch.from_numpy(arr).permute(2, 0, 1), step)
                    tracker.tracker.flush()
                elif tracker.name == "wandb":
                    import wandb

                    tracker.tracker.log({tag: wandb.Image(arr)}, step=step)

    def end(self) -> None:
        if self.acc is not None:
            for tracker in self.acc.trackers:
                tracker.finish()
