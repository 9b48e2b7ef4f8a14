"""``compute_metrics``: FD per feature extractor against a reference set, and instance metrics (docs/method.md §9).

Images are read once per set: one DataLoader pass applies every needed extractor's preprocessing
and network to each batch. Reference-set features are cached in ``cache_dir`` (``ref_<name>_<key>.npz``
holding the float32 features, which dgm-eval then casts to float64 losslessly), keyed by the file
list (absolute paths, sizes, mtimes), the extractor name, its weights identity and preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..files import atomic_write
from ..progress import track
from .extractors import FeatureExtractor, load_feature_extractor
from .frechet import frechet_distance
from .instance import MetricContext, get_instance_metric

CACHE_VERSION = 1
DGM_METRICS = ("fd",)


def fd_key(extractor_name: str) -> str:
    """Result key of the Frechet distance with an extractor: ``fid`` for Inception, else ``fd_<name>``."""
    return "fid" if extractor_name == "inception" else f"fd_{extractor_name}"


def default_num_workers() -> int:
    if os.environ.get("CMDISTILL_METRICS_WORKERS"):
        return int(os.environ["CMDISTILL_METRICS_WORKERS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cpus)


class _ImageFiles(Dataset):
    """Image files -> ``{extractor name: preprocessed tensor}`` (PIL ``convert('RGB')`` as dgm-eval).

    A file that does not decode (truncated, corrupt) yields a black image and ``ok = False``: the
    main process then names it in a one-line error (an exception raised in a worker would reach
    the user as a traceback)."""

    def __init__(self, paths: Sequence[str], preprocessors: dict):
        self.paths, self.preprocessors = list(paths), preprocessors

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("RGB")
            ok = True
        except (OSError, ValueError, SyntaxError):
            im, ok = Image.new("RGB", (64, 64)), False
        return {"index": i, "ok": ok, **{k: f(im) for k, f in self.preprocessors.items()}}


def extract_features(paths: Sequence[str], extractors: dict[str, FeatureExtractor], *, batch_size: int = 64,
                     device="cpu", num_workers: int | None = None, desc: str = "features") -> dict[str, np.ndarray]:
    """Features ``{name: float32 [N, D]}`` of the images ``paths`` under every extractor, in one pass."""
    if not extractors:
        return {}
    device = torch.device(device)
    loader = DataLoader(_ImageFiles(paths, {k: ex.preprocess for k, ex in extractors.items()}),
                        batch_size=batch_size, shuffle=False, drop_last=False,
                        num_workers=default_num_workers() if num_workers is None else num_workers,
                        pin_memory=device.type == "cuda")
    out: dict[str, list[np.ndarray]] = {k: [] for k in extractors}
    with torch.inference_mode():
        for batch in track(loader, f"{desc} ({', '.join(extractors)})", "batch"):
            bad = batch["index"][~batch["ok"]]
            if len(bad):
                raise UserError(f"image file '{paths[int(bad[0])]}' does not decode (truncated or corrupt): delete "
                                "it and rerun the program that wrote it to regenerate it (a real image: replace it)")
            for k, ex in extractors.items():
                f = ex.model(batch[k].to(device, non_blocking=True))
                out[k].append(f.float().reshape(f.shape[0], -1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def image_features(images: Sequence[Image.Image], names: Sequence[str], *, device="cpu",
                   weights_dir: str | None = None, batch_size: int = 64) -> dict[str, dict]:
    """Features of in-memory PIL images: ``{name: {"identity": str, "features": float32 [N, D]}}``.

    The instance metrics read the image a generator produced before it is saved (the paper computes
    CLIP and aesthetic scores on the in-memory image, FD on the saved JPEG files); ``identity``
    names the weights and preprocessing, so that stored features are reused only with the same network."""
    device = torch.device(device)
    out = {}
    with torch.inference_mode():
        for n in names:
            ex = load_feature_extractor(n, device=device, weights_dir=weights_dir)
            feats = []
            for a in range(0, len(images), batch_size):
                x = torch.stack([ex.preprocess(im.convert("RGB")) for im in images[a:a + batch_size]])
                f = ex.model(x.to(device))
                feats.append(f.float().reshape(f.shape[0], -1).cpu().numpy())
            out[n] = {"identity": extractor_identity(ex), "features": np.concatenate(feats)}
    return out


def extractor_identity(ex: FeatureExtractor) -> str:
    return f"{ex.name}|{ex.identity}|{ex.preprocess_id}"


def instance_extractor_names(instance_metrics) -> list[str]:
    """The feature extractors that the instance metrics ``instance_metrics`` read."""
    return list(dict.fromkeys(r for n in _names(instance_metrics) for r in get_instance_metric(n).requires))


# ----------------------------------------------------------------------------------------------
# Reference-feature cache

def reference_cache_key(paths: Sequence[str], extractor: FeatureExtractor) -> tuple[str, str]:
    """(hex key, JSON description) of a reference set under an extractor."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    desc = json.dumps({"version": CACHE_VERSION, "extractor": extractor.name, "weights": extractor.identity,
                       "preprocess": extractor.preprocess_id, "files": files}, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest(), desc


def _cache_path(cache_dir, name: str, key: str) -> Path:
    return Path(cache_dir) / f"ref_{name}_{key[:24]}.npz"


def load_cached_reference(cache_dir, paths, extractor: FeatureExtractor) -> np.ndarray | None:
    if not cache_dir:
        return None
    key, desc = reference_cache_key(paths, extractor)
    path = _cache_path(cache_dir, extractor.name, key)
    if not path.is_file():
        return None
    with np.load(path) as z:
        if str(z["meta"]) != desc:
            return None
        return z["features"]


def save_cached_reference(cache_dir, paths, extractor: FeatureExtractor, features: np.ndarray) -> Path | None:
    if not cache_dir:
        return None
    key, desc = reference_cache_key(paths, extractor)
    path = _cache_path(cache_dir, extractor.name, key)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to it
            np.savez(f, features=features.astype(np.float32), meta=np.array(desc))

    atomic_write(path, save)
    return path


# ----------------------------------------------------------------------------------------------

def _names(x: Iterable[str] | str | None) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        x = [x]
    out = []
    for n in x:
        n = str(n).strip()
        if n and n.lower() != "none" and n not in out:
            out.append(n)
    return out


def _check_files(paths: Sequence[str], what: str) -> None:
    if not paths:
        raise UserError(f"no {what} images given")
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"{what} image not found: {p}")


def compute_metrics(gen_paths: list[str], ref_paths: list[str] | None, captions: list[str], *,
                    dgm_metrics=("fd",), dgm_models=("inception", "dinov2"),
                    instance_metrics=("clip_score", "aesthetic"), batch_size: int = 64,
                    device="cpu", weights_dir: str | None = None, cache_dir: str | None = None,
                    gen_features: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Metrics of the generated images ``gen_paths`` (docs/method.md §9).

    - ``dgm_metrics`` ("fd", or empty / ("none",)) with each extractor of ``dgm_models`` against
      ``ref_paths``: keys ``fid`` (inception), ``fd_dinov2``, ``fd_<name>``; features of the files.
    - ``instance_metrics`` on the generated images and their ``captions`` (one per image):
      ``clip_score``, ``aesthetic_score``. ``gen_features`` ``{extractor: [N, D]}``: features of the
      in-memory images (see :func:`image_features`) to use instead of reading the files.
    Reference features are cached under ``cache_dir`` (no cache when None).
    """
    dgm = _names(dgm_metrics)
    for m in dgm:
        if m not in DGM_METRICS:
            raise UserError(f"unknown dgm metric {m!r}; available: {', '.join(DGM_METRICS)}")
    models = _names(dgm_models) if dgm else []
    instance = [get_instance_metric(n) for n in _names(instance_metrics)]
    gen_paths = [str(p) for p in gen_paths]
    ref_paths = [str(p) for p in ref_paths] if ref_paths else []
    if not models and not instance:
        return {}
    _check_files(gen_paths, "generated")
    if models:
        if not ref_paths:
            raise UserError(f"FD ({', '.join(models)}) needs reference images; none given")
        _check_files(ref_paths, "reference")
    if instance and len(captions) != len(gen_paths):
        raise UserError(f"{len(captions)} captions for {len(gen_paths)} generated images")
    device = torch.device(device)

    # Load every network first, so that missing weights fail before any image is read.
    needed = list(models) + [r for m in instance for r in m.requires if r not in models]
    needed = list(dict.fromkeys(needed))
    extractors = {n: load_feature_extractor(n, device=device, weights_dir=weights_dir) for n in needed}
    resources = {m.name: m.prepare(device=device, weights_dir=weights_dir) for m in instance if m.prepare}

    ref_feats = {n: load_cached_reference(cache_dir, ref_paths, extractors[n]) for n in models}
    todo = {n: extractors[n] for n in models if ref_feats[n] is None}
    if todo:
        for n, f in extract_features(ref_paths, todo, batch_size=batch_size, device=device,
                                     desc="reference").items():
            ref_feats[n] = f
            save_cached_reference(cache_dir, ref_paths, extractors[n], f)
    given = {n: np.asarray(f) for n, f in (gen_features or {}).items() if n in extractors}
    for n, f in given.items():
        if len(f) != len(gen_paths):
            raise UserError(f"{len(f)} stored {n} features for {len(gen_paths)} generated images")
    file_names = [n for n in extractors if n in models or n not in given]
    file_feats = extract_features(gen_paths, {n: extractors[n] for n in file_names}, batch_size=batch_size,
                                  device=device, desc="generated") if file_names else {}
    gen_feats = {**file_feats, **given}  # instance metrics: the in-memory images' features where given

    results: dict[str, float] = {}
    for n in models:
        # dgm-eval: compute_FD_with_reps(reps_real, reps_gen)
        results[fd_key(n)] = frechet_distance(ref_feats[n], file_feats[n])
    ctx = MetricContext(gen_paths, list(captions), gen_feats, extractors, resources, device, batch_size)
    for m in instance:
        results[m.key] = float(m.fn(ctx))
    return results
