"""Feature extractors for the Frechet distances and CLIP metrics (docs/method.md §9), as a registry by name.

A factory ``factory(*, device, weights_dir) -> FeatureExtractor`` is registered under a name with
:func:`register_feature_extractor`; ``FD`` with extractor ``X`` is reported as ``fd_X`` (``fid``
for ``inception``). Built in:

- ``inception``: the pytorch-fid FID Inception-v3 (TF-ported ``pt_inception-2015-12-05``), 2048-d
  pool features; image -> [0, 1] tensor -> 299x299 bilinear (F.interpolate, no antialias) -> [-1, 1],
  exactly dgm-eval's ``InceptionEncoder``.
- ``dinov2``: DINOv2 ViT-L/14 (timm architecture, original ``dinov2_vitl14_pretrain.pth``), CLS
  token after the final norm, 1024-d; PIL bicubic resize to 224x224, ImageNet mean/std, exactly
  dgm-eval's ``DINOv2Encoder`` (torch.hub DINOv2, whose position embeddings we resample the same way).
- ``clip``: OpenAI CLIP ViT-L/14 through open_clip, 768-d image embeddings (unnormalised) with
  open_clip's preprocessing; also encodes captions (used by the CLIP score and aesthetic metrics).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from ..errors import UserError
from .weights import random_weights_mode, resolve_weights, weights_identity


@dataclass
class FeatureExtractor:
    """A network mapping a preprocessed batch ``[B, 3, H, W]`` to features ``[B, dim]``."""

    name: str
    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]  # one RGB PIL image -> [3, H, W]
    dim: int
    identity: str  # weights identity, part of the reference-feature cache key
    preprocess_id: str  # description of ``preprocess``, part of the cache key
    extras: dict = field(default_factory=dict)  # anything an instance metric needs besides the features


ExtractorFactory = Callable[..., FeatureExtractor]
_FACTORIES: dict[str, ExtractorFactory] = {}
_LOADED: dict[tuple, FeatureExtractor] = {}


def register_feature_extractor(name: str, factory: ExtractorFactory) -> None:
    """Register ``factory(*, device, weights_dir) -> FeatureExtractor`` under ``name`` (replaces any)."""
    _FACTORIES[name] = factory
    for k in [k for k in _LOADED if k[0] == name]:
        del _LOADED[k]


# Registration functions of further extractors / instance metrics, by the names they add. Called, not
# merely imported, so that a registry reset (tests do that) does not lose them.
PLUGINS = {"toy": ("cmdistill.toy.encoders", "register_with_metrics"),
           "toy_caption_acc": ("cmdistill.toy.encoders", "register_with_metrics")}


def load_plugin(name: str) -> None:
    """Register ``name`` through its plugin, if one is known (e.g. the toy world's encoder)."""
    if name in PLUGINS:
        import importlib

        module, function = PLUGINS[name]
        getattr(importlib.import_module(module), function)()


def feature_extractor_names() -> list[str]:
    return sorted(_FACTORIES)


def load_feature_extractor(name: str, *, device="cpu", weights_dir: str | None = None) -> FeatureExtractor:
    """Build (once per name, device, weights location and random-weights mode) a registered extractor."""
    if name not in _FACTORIES:
        load_plugin(name)
    if name not in _FACTORIES:
        raise UserError(f"unknown feature extractor {name!r}; registered: {', '.join(feature_extractor_names())}")
    key = (name, str(torch.device(device)), weights_dir, random_weights_mode(), id(_FACTORIES[name]),
           *(os.environ.get(k) for k in ("CMDISTILL_METRICS_WEIGHTS", "CMDISTILL_METRICS_CLIP_PRECISION")))
    if key not in _LOADED:
        ex = _FACTORIES[name](device=torch.device(device), weights_dir=weights_dir)
        ex.model.eval().requires_grad_(False)
        _LOADED[key] = ex
    return _LOADED[key]


def clear_loaded_extractors() -> None:
    """Free the networks kept by :func:`load_feature_extractor`."""
    _LOADED.clear()


@contextlib.contextmanager
def random_weights(seed: int = 0):
    """Build a network with seeded random weights (smoke tests), leaving the global RNG untouched."""
    warnings.warn("metric networks use RANDOM weights ($CMDISTILL_METRICS_RANDOM_WEIGHTS): numbers are meaningless",
                  stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------
# Inception-v3 (pytorch-fid / dgm-eval)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_PREPROCESS_ID = ("inception/v1: RGB, to_tensor, F.interpolate 299x299 bilinear align_corners=False "
                           "antialias=False, 2x-1")


def inception_preprocess(img: Image.Image) -> torch.Tensor:
    """dgm-eval ``InceptionEncoder.transform`` followed by pytorch-fid's ``2 x - 1``."""
    x = TF.to_tensor(img.convert("RGB"))
    x = F.interpolate(x.unsqueeze(0), size=(299, 299), mode="bilinear", align_corners=False).squeeze(0)
    return 2 * x - 1


class FIDInceptionPool(nn.Module):
    """pytorch-fid ``InceptionV3([3])`` without its resize/normalise: input in [-1, 1] -> [B, 2048]."""

    def __init__(self, state_dict: dict | None = None):
        super().__init__()
        from pytorch_fid import inception as pfid

        # pytorch_fid.inception.fid_inception_v3, minus its unconditional download
        net = pfid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pfid.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfid.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfid.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfid.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfid.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfid.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfid.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfid.FIDInceptionE_1(1280)
        net.Mixed_7c = pfid.FIDInceptionE_2(2048)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        else:  # random weights (tests): He init keeps activations O(1) through the 94 convolutions
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.net = net  # state dict keys as in the .pth (its unused 1008-way fc included)

    def forward(self, x):
        n = self.net  # pytorch-fid InceptionV3 blocks 0-3
        x = F.max_pool2d(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for m in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                  n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = m(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _inception_factory(*, device, weights_dir=None) -> FeatureExtractor:
    if random_weights_mode():
        with random_weights():
            model, identity = FIDInceptionPool(None), "random-full-seed0"
    else:
        path = resolve_weights(INCEPTION_FILE, url=INCEPTION_URL, weights_dir=weights_dir)
        model = FIDInceptionPool(torch.load(path, map_location="cpu", weights_only=True))
        identity = weights_identity(path)
    return FeatureExtractor("inception", model.to(device), inception_preprocess, 2048, identity,
                            INCEPTION_PREPROCESS_ID)


# ----------------------------------------------------------------------------------------------
# DINOv2 ViT-L/14 (dgm-eval: torch.hub facebookresearch/dinov2 'dinov2_vitl14')

DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILE
DINOV2_ARCHS = {  # timm.create_model kwargs
    "full": dict(model_name="vit_large_patch14_dinov2"),
    "tiny": dict(model_name="vit_large_patch14_dinov2", embed_dim=64, depth=2, num_heads=2),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_PREPROCESS_ID = "dinov2/v1: RGB, PIL resize 224x224 bicubic, to_tensor, normalize ImageNet mean/std"

_dinov2_transform = T.Compose([
    T.Resize((224, 224), T.InterpolationMode.BICUBIC),
    T.ToTensor(),
    T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])


def dinov2_preprocess(img: Image.Image) -> torch.Tensor:
    """dgm-eval ``DINOv2Encoder.transform`` (torchvision on a PIL image, i.e. PIL's bicubic)."""
    return _dinov2_transform(img.convert("RGB"))


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for a fixed input grid.

    The checkpoint's 37x37 grid (518 px) is resampled bicubically with ``scale_factor =
    (grid + 0.1) / 37`` and no antialiasing, as the original model does at every forward. timm's
    own checkpoint filter resamples with antialiasing (different numbers), so we do it here first.
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    assert m * m == n, "expected a square grid of position embeddings plus one class token"
    if (m, m) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((grid[0] + 0.1) / m, (grid[1] + 0.1) / m), mode="bicubic",
                          antialias=False)
    assert tuple(patch.shape[-2:]) == tuple(grid)
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1].float(), patch], dim=1).to(pos_embed.dtype)


class DINOv2CLS(nn.Module):
    """timm ViT holding DINOv2 weights; returns the CLS token after the final norm (``x_norm_clstoken``)."""

    def __init__(self, state_dict: dict | None = None, arch: str = "full", img_size: int = 224):
        super().__init__()
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        kw = dict(DINOV2_ARCHS[arch])
        self.vit = timm.create_model(kw.pop("model_name"), pretrained=False, img_size=img_size, num_classes=0, **kw)
        if state_dict is not None:
            # flatten FSDP block chunks ("blocks.<chunk>.<i>.") if a checkpoint was saved with them
            sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state_dict.items()}
            sd["pos_embed"] = dinov2_pos_embed(sd["pos_embed"], tuple(self.vit.patch_embed.grid_size))
            self.vit.load_state_dict(checkpoint_filter_fn(sd, self.vit), strict=True)
        else:  # random weights (tests): layer scales of 1 so that the image reaches the CLS token
            for name, p in self.vit.named_parameters():
                if name.endswith(".gamma"):
                    nn.init.ones_(p)

    def forward(self, x):
        return self.vit.forward_features(x)[:, 0]


def _dinov2_factory(*, device, weights_dir=None) -> FeatureExtractor:
    mode = random_weights_mode()
    if mode:
        with random_weights():
            model, identity = DINOv2CLS(None, arch=mode), f"random-{mode}-seed0"
    else:
        path = resolve_weights(DINOV2_FILE, url=DINOV2_URL, weights_dir=weights_dir)
        model = DINOv2CLS(torch.load(path, map_location="cpu", weights_only=True))
        identity = weights_identity(path)
    return FeatureExtractor("dinov2", model.to(device), dinov2_preprocess, model.vit.num_features, identity,
                            DINOV2_PREPROCESS_ID)


# ----------------------------------------------------------------------------------------------
# OpenAI CLIP ViT-L/14 through open_clip (the reference used the `clip` package's ViT-L/14)

CLIP_MODEL = "ViT-L-14-quickgelu"  # OpenAI's ViT-L/14 uses QuickGELU
CLIP_FILE = "ViT-L-14.pt"  # OpenAI's release (TorchScript), what clip.load("ViT-L/14") downloads
CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
CLIP_HF_HUB = "timm/vit_large_patch14_clip_224.openai"  # open_clip's 'openai' tag downloads this
CLIP_TINY = dict(  # same code path, embed_dim kept at 768 for the aesthetic MLP
    embed_dim=768,
    vision_cfg=dict(image_size=224, layers=2, width=64, patch_size=14, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)
CLIP_PREPROCESS_ID = ("clip/v1: open_clip image_transform(224, eval): resize shortest side 224 bicubic, "
                      "center crop 224, RGB, to_tensor, normalize OpenAI mean/std")


def _clip_transform():
    import open_clip

    return open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                     std=open_clip.OPENAI_DATASET_STD, resize_mode="shortest",
                                     interpolation="bicubic")


_clip_tf = None


def clip_preprocess(img: Image.Image) -> torch.Tensor:
    """open_clip's evaluation transform for OpenAI ViT-L/14 (= OpenAI CLIP's ``_transform(224)``)."""
    global _clip_tf
    if _clip_tf is None:
        _clip_tf = _clip_transform()
    return _clip_tf(img.convert("RGB"))


def read_clip_state_dict(path: Path) -> dict:
    """OpenAI TorchScript ``ViT-L-14.pt``, open_clip ``.bin``/``.pt`` or ``.safetensors`` -> state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()  # TorchScript archive (OpenAI)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    for k in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(k, None)
    return sd


def clip_precision() -> str:
    """``$CMDISTILL_METRICS_CLIP_PRECISION``: ``fp32`` (default) or ``fp16``.

    Deliberate difference: the reference's ``clip.load("ViT-L/14")`` runs CLIP in fp16 on a GPU
    (fp16 linear/conv weights, fp32 LayerNorm); we default to fp32. ``fp16`` reproduces the
    reference (open_clip's ``precision='fp16'`` applies the same conversion).
    """
    v = os.environ.get("CMDISTILL_METRICS_CLIP_PRECISION", "fp32").strip().lower() or "fp32"
    if v not in ("fp32", "fp16"):
        raise UserError(f"$CMDISTILL_METRICS_CLIP_PRECISION={v!r}: expected 'fp32' or 'fp16'")
    return v


class CLIPEncoder(nn.Module):
    """open_clip CLIP: ``forward`` = image embeddings (float32), ``encode_text`` = caption embeddings."""

    def __init__(self, state_dict: dict | None = None, arch: str = "full", precision: str = "fp32"):
        super().__init__()
        import open_clip

        kw = CLIP_TINY if arch == "tiny" else {}
        self.clip = open_clip.create_model(CLIP_MODEL, pretrained=None, precision=precision,
                                           device=torch.get_default_device(), **kw)
        if state_dict is not None:
            self.clip.load_state_dict(state_dict, strict=True)
        self.tokenizer = open_clip.get_tokenizer(CLIP_MODEL)  # truncates to 77 tokens, EOT last

    def forward(self, x):
        # OpenAI CLIP's encode_image: image.type(self.dtype)
        return self.clip.encode_image(x.to(self.clip.visual.conv1.weight.dtype)).float()

    @torch.inference_mode()
    def encode_text(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        device = next(self.parameters()).device
        out = [self.clip.encode_text(self.tokenizer(captions[i:i + batch_size]).to(device)).float()
               for i in range(0, len(captions), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.clip.text_projection.shape[-1], device=device)


def _download_clip(_target_dir: Path) -> Path:
    from open_clip.pretrained import download_pretrained_from_hf

    return Path(download_pretrained_from_hf(CLIP_HF_HUB))


def _clip_factory(*, device, weights_dir=None) -> FeatureExtractor:
    mode, precision = random_weights_mode(), clip_precision()
    if mode:
        with random_weights():
            model, identity = CLIPEncoder(None, arch=mode, precision=precision), f"random-{mode}-seed0"
    else:
        path = resolve_weights(CLIP_FILE, url=CLIP_URL, weights_dir=weights_dir, extra_dirs=["~/.cache/clip"],
                               download=_download_clip)
        model = CLIPEncoder(read_clip_state_dict(path), precision=precision)
        identity = weights_identity(path)
    return FeatureExtractor("clip", model.to(device), clip_preprocess, model.clip.visual.output_dim,
                            f"{identity}:{precision}", CLIP_PREPROCESS_ID)


register_feature_extractor("inception", _inception_factory)
register_feature_extractor("dinov2", _dinov2_factory)
register_feature_extractor("clip", _clip_factory)
