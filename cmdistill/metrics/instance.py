"""Per-image metrics averaged over the generated set: CLIP score and LAION aesthetic score (docs/method.md §9).

An instance metric is ``fn(ctx: MetricContext) -> float`` registered with
:func:`register_instance_metric`; it names the feature extractors whose features of the generated
images it needs (computed in the same pass as the FD features) and an optional ``prepare(*,
device, weights_dir)`` run before any image is read, so that missing weights fail early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .weights import random_weights_mode, resolve_weights


@dataclass
class MetricContext:
    gen_paths: list[str]
    captions: list[str]
    features: dict[str, np.ndarray]  # generated-image features of the required extractors, [N, D]
    extractors: dict[str, Any]  # name -> FeatureExtractor
    resources: dict[str, Any]  # metric name -> what its ``prepare`` returned
    device: torch.device
    batch_size: int = 64
    memo: dict = field(default_factory=dict)  # shared between metrics of one call


@dataclass
class InstanceMetric:
    name: str
    fn: Callable[[MetricContext], float]
    key: str  # key in compute_metrics' result
    requires: tuple[str, ...] = ()
    prepare: Callable[..., Any] | None = None


_METRICS: dict[str, InstanceMetric] = {}


def register_instance_metric(name: str, fn: Callable[[MetricContext], float], *, key: str | None = None,
                             requires: tuple[str, ...] = (), prepare: Callable[..., Any] | None = None) -> None:
    """Register ``fn(ctx) -> float`` as instance metric ``name``, reported under ``key`` (default: name)."""
    _METRICS[name] = InstanceMetric(name, fn, key or name, tuple(requires), prepare)


def instance_metric_names() -> list[str]:
    return sorted(_METRICS)


def get_instance_metric(name: str) -> InstanceMetric:
    if name not in _METRICS:
        from .extractors import load_plugin

        load_plugin(name)
    if name not in _METRICS:
        raise UserError(f"unknown instance metric {name!r}; registered: {', '.join(instance_metric_names())}")
    return _METRICS[name]


def _normalized_clip_images(ctx: MetricContext) -> torch.Tensor:
    # F.normalize of the float32 CLIP image embeddings, as the reference's instance_metrics.py
    if "clip_image_norm" not in ctx.memo:
        ctx.memo["clip_image_norm"] = F.normalize(torch.from_numpy(ctx.features["clip"]).float(), dim=-1)
    return ctx.memo["clip_image_norm"]


def clip_score(ctx: MetricContext) -> float:
    """Mean cosine similarity (not x100) of CLIP ViT-L/14 image and caption embeddings."""
    img = _normalized_clip_images(ctx)
    txt = ctx.extractors["clip"].model.encode_text(list(ctx.captions), max(ctx.batch_size, 1))
    txt = F.normalize(txt.float().cpu(), dim=-1)
    return float((img * txt).sum(-1).double().mean())


# ----------------------------------------------------------------------------------------------
# LAION "improved aesthetic predictor"

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" + AESTHETIC_FILE
AESTHETIC_DEFAULT_DIR = "data/aesthetics_mlp_weights"  # the reference's location (cwd-relative)
_REPO_ROOT = Path(__file__).resolve().parents[2]


class AestheticMLP(nn.Module):
    """768-1024-128-64-16-1 with dropout between and no activations (``layers.{0,2,4,6,7}`` keys)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def load_aesthetic_mlp(*, device="cpu", weights_dir: str | None = None) -> AestheticMLP:
    if random_weights_mode():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mlp = AestheticMLP(768)
    else:
        mlp = AestheticMLP(768)
        path = resolve_weights(AESTHETIC_FILE, url=AESTHETIC_URL, weights_dir=weights_dir,
                               extra_dirs=[AESTHETIC_DEFAULT_DIR, _REPO_ROOT / AESTHETIC_DEFAULT_DIR])
        mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return mlp.to(device).eval().requires_grad_(False)


def aesthetic_score(ctx: MetricContext) -> float:
    """Mean LAION aesthetic MLP output on the L2-normalised CLIP ViT-L/14 image embeddings."""
    mlp = ctx.resources["aesthetic"]
    with torch.inference_mode():
        scores = mlp(_normalized_clip_images(ctx).to(ctx.device)).float().cpu()
    return float(scores.double().mean())


register_instance_metric("clip_score", clip_score, key="clip_score", requires=("clip",))
register_instance_metric("aesthetic", aesthetic_score, key="aesthetic_score", requires=("clip",),
                         prepare=load_aesthetic_mlp)
