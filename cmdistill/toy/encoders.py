"""Toy metric encoders: a small CNN trained on the toy images to predict their attributes.

The toy world's stand-ins for the paper's metric networks (docs/method.md §9), named honestly as toy:
- ``toy`` feature extractor: the CNN's penultimate features (128-d); their Frechet distance
  (``fd_toy``, as the metrics registry names FD with extractor ``toy``) plays the role of FID and
  FD-DINO;
- ``toy_caption_acc`` instance metric: the fraction of the attributes a caption names that the
  CNN predicts on the image (1.0 = everything the caption asks for is there); it plays the role
  of the CLIP score.

The CNN never sees the teacher: it is trained on rendered toy images only, with blur, noise and
small shifts as augmentation so that it judges blurry generated images by their content.

Importing this module registers both with :mod:`cmdistill.metrics` (when present):
``compute_metrics(gen, ref, caps, dgm_models=("toy",), instance_metrics=("toy_caption_acc",))``
returns ``fd_toy`` and ``toy_caption_acc``. The weights (``toy_encoder.safetensors`` + ``config.json``) are looked up in
``weights_dir`` (``--metrics_weights_dir``), ``$CMDISTILL_TOY_ENCODER``, ``$CMDISTILL_METRICS_WEIGHTS``
and ``toy/world/encoder`` of the repository, in that order.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import sha256
from .data import ATTRIBUTES, label_indices, parse_caption

ENCODER_WEIGHTS = "toy_encoder.safetensors"
ENCODER_CONFIG = "config.json"
FEATURE_DIM = 128


class ToyEncoder(nn.Module):
    """Conv trunk (64 -> 8 px) -> flatten (keeps where things are) -> 128-d features -> one head per attribute."""

    def __init__(self, resolution: int = 64, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.resolution = resolution
        c = width

        def block(i, o):  # downsample first: half the cost of a full-resolution first convolution
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.trunk = nn.Sequential(block(3, c), block(c, 2 * c), block(2 * c, 2 * c))   # 64 -> 8 px
        side = resolution // 8
        self.proj = nn.Sequential(nn.Conv2d(2 * c, 16, 1), nn.SiLU(), nn.Flatten(),
                                  nn.Linear(16 * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W] in [0, 1] -> penultimate features [B, feature_dim]."""
        return self.proj(self.trunk(x * 2 - 1))

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


# ---------------------------------------------------------------------------- image handling --

def as_batch(images, resolution: int = 64) -> torch.Tensor:
    """Images in any of the forms the project passes around -> float [B, 3, res, res] in [0, 1].

    Accepts file paths, PIL images, a uint8 array / tensor [B, H, W, 3], or a float tensor
    [B, 3, H, W] in [0, 1]; resizes (bilinear) to the encoder's resolution."""
    if isinstance(images, torch.Tensor) and images.dtype.is_floating_point:
        x = images.float()
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    else:
        from PIL import Image

        arrs = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                with Image.open(im) as f:
                    im = f.convert("RGB")
            else:
                im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BILINEAR)
            arrs.append(np.asarray(im))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (random 3x3 box/identity mix), Gaussian noise, +-2 px shift: what VAE decoding does to images."""
    B = x.shape[0]
    k = torch.ones(3, 1, 3, 3) / 9
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    a = torch.rand(B, 1, 1, 1, generator=g)
    x = a * blurred + (1 - a) * x
    x = x + 0.04 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    sx, sy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    x = torch.roll(x, shifts=(sy, sx), dims=(2, 3))
    return x.clamp(0, 1)


# -------------------------------------------------------------------------------- training --

def train_encoder(images: np.ndarray, labels: list[dict], steps: int = 1500, batch_size: int = 64,
                  lr: float = 3e-3, seed: int = 0, resolution: int = 64, device="cpu", log=print) -> ToyEncoder:
    """Train the attribute classifier on uint8 toy images and their attribute dicts."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ToyEncoder(resolution).to(device)
    x_all = as_batch(images, resolution)
    y_all = {k: torch.from_numpy(v) for k, v in label_indices(labels).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    lrs = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        out = model(_augment(x_all[idx], g).to(device))
        loss = sum(F.cross_entropy(out[k], y_all[k][idx].to(device)) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lrs.step()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"  encoder step {step + 1}/{steps}  loss {loss.item():.4f}  ({time.time() - t0:.0f} s)")
    return model.eval()


def save_encoder(model: ToyEncoder, directory: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / ENCODER_WEIGHTS))
    cfg = {"resolution": model.resolution, "feature_dim": FEATURE_DIM, "attributes": {k: list(v) for k, v in
                                                                                       ATTRIBUTES.items()}}
    (directory / ENCODER_CONFIG).write_text(json.dumps({**cfg, **(extra or {})}, indent=1))
    return directory


def load_encoder(directory: str | Path) -> ToyEncoder:
    from safetensors.torch import load_file

    from ..errors import UserError

    directory = Path(directory)
    if not (directory / ENCODER_WEIGHTS).is_file():
        raise UserError(f"no toy encoder in '{directory}': build the toy world first "
                        "(python -m cmdistill.toy build --out toy/world)")
    cfg_file = directory / ENCODER_CONFIG
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {"resolution": 64}
    model = ToyEncoder(cfg["resolution"])
    model.load_state_dict(load_file(str(directory / ENCODER_WEIGHTS)))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------- metrics --

@torch.no_grad()
def encoder_outputs(model: ToyEncoder, images, batch_size: int = 256) -> tuple[np.ndarray, dict]:
    """(features [N, 128] float64, {attribute: predicted class index [N]})."""
    feats, preds = [], {k: [] for k in ATTRIBUTES}
    dev = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        f = model.features(as_batch(images[i:i + batch_size], model.resolution).to(dev))
        feats.append(f.double().cpu().numpy())
        for k, h in model.heads.items():
            preds[k].append(h(f).argmax(1).cpu().numpy())
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}


def attribute_accuracy(model: ToyEncoder, images, labels: list[dict]) -> dict:
    """Per-attribute accuracy of the classifier against ground-truth attribute dicts."""
    _, pred = encoder_outputs(model, images)
    truth = label_indices(labels)
    return {k: float((pred[k] == truth[k]).mean()) for k in ATTRIBUTES}


def caption_accuracy_from_features(encoder: ToyEncoder, features, captions: list[str]) -> np.ndarray:
    """Per image: the fraction of the attributes named in its caption that the classifier's heads
    predict from the image's penultimate ``features``."""
    dev = next(encoder.parameters()).device
    with torch.no_grad():
        f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=dev)
        pred = {k: h(f).argmax(1).cpu().numpy() for k, h in encoder.heads.items()}
    return np.array([np.mean([ATTRIBUTES[k][pred[k][i]] == v for k, v in parse_caption(c).items()])
                     for i, c in enumerate(captions)])


def caption_accuracy(model: ToyEncoder, images, captions: list[str]) -> np.ndarray:
    """Per image: the fraction of the attributes named in its caption that the classifier predicts."""
    feats, _ = encoder_outputs(model, images)
    return caption_accuracy_from_features(model, feats, captions)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """docs/method.md §9 Frechet distance: the project's dgm-eval implementation (cmdistill.metrics) when present,
    else the same formula here: float64 mean and unbiased covariance, ||mu1 - mu2||^2 + tr S1 + tr S2
    - 2 tr sqrtm(S1 S2), real part kept, retried with 1e-6 I when sqrtm is not finite."""
    try:
        from ..metrics.frechet import frechet_distance as fd
    except ImportError:
        fd = None
    if fd is not None:
        return float(fd(f1, f2))
    from scipy import linalg

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------ cmdistill.metrics registry --

REPO_ENCODER_DIR = Path(__file__).resolve().parents[2] / "toy" / "world" / "encoder"
ENV_TOY_ENCODER = "CMDISTILL_TOY_ENCODER"


def find_encoder_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The first folder holding ``toy_encoder.safetensors`` among weights_dir, $CMDISTILL_TOY_ENCODER,
    $CMDISTILL_METRICS_WEIGHTS and the repository's toy/world/encoder."""
    from ..errors import UserError

    cands = [weights_dir, os.environ.get(ENV_TOY_ENCODER), os.environ.get("CMDISTILL_METRICS_WEIGHTS"),
             REPO_ENCODER_DIR]
    dirs = [Path(d).expanduser() for d in cands if d]
    for d in dirs:
        if (d / ENCODER_WEIGHTS).is_file():
            return d
    raise UserError(f"toy encoder ({ENCODER_WEIGHTS}) not found in {', '.join(map(str, dirs))}: build the toy "
                    f"world (python -m cmdistill.toy build --out toy/world) or set ${ENV_TOY_ENCODER} to its "
                    "encoder/ folder")


class _Features(nn.Module):
    """The extractor's network: preprocessed batch -> penultimate features (the heads ride along)."""

    def __init__(self, encoder: ToyEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder.features(x)


def toy_feature_extractor(*, device="cpu", weights_dir=None):
    """Factory of the ``toy`` feature extractor for :func:`cmdistill.metrics.register_feature_extractor`."""
    from ..metrics import FeatureExtractor

    d = find_encoder_dir(weights_dir)
    enc = load_encoder(d)
    res = enc.resolution

    def preprocess(img):
        return as_batch([img], res)[0]

    # The weights by content, not by path: features stored beside samples stay valid when the folders move.
    identity = f"toy:{ENCODER_WEIGHTS}:{sha256(d / ENCODER_WEIGHTS)[:16]}"
    return FeatureExtractor("toy", _Features(enc).to(device), preprocess, FEATURE_DIM, identity,
                            f"toy/v1: RGB, PIL bilinear resize to {res}, to [0, 1]", extras={"encoder": enc})


def _toy_caption_acc_metric(ctx) -> float:
    enc = ctx.extractors["toy"].extras["encoder"]
    return float(caption_accuracy_from_features(enc, ctx.features["toy"], ctx.captions).mean())


def register_with_metrics() -> bool:
    """Register ``toy`` (features) and ``toy_caption_acc`` (instance metric); False without cmdistill.metrics."""
    try:
        from ..metrics import register_feature_extractor, register_instance_metric
    except ImportError:
        return False
    register_feature_extractor("toy", toy_feature_extractor)
    register_instance_metric("toy_caption_acc", _toy_caption_acc_metric, key="toy_caption_acc", requires=("toy",))
    return True


register_with_metrics()
