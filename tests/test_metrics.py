"""Evaluation metrics (docs/method.md §9): Frechet distance numerics, extractor preprocessing and networks,
weights resolution, reference-feature cache and compute_metrics end to end (random weights)."""

from __future__ import annotations

import math
import os
import re
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from cmdistill.errors import UserError
from cmdistill.metrics import (
    FeatureExtractor,
    MetricContext,
    clip_preprocess,
    compute_metrics,
    dinov2_preprocess,
    extract_features,
    frechet_distance,
    inception_preprocess,
    load_feature_extractor,
    register_feature_extractor,
)
from cmdistill.metrics import extractors as ext
from cmdistill.metrics import instance as inst
from cmdistill.metrics.weights import resolve_weights


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch):
    for k in ("CMDISTILL_METRICS_WEIGHTS", "CMDISTILL_METRICS_RANDOM_WEIGHTS", "CMDISTILL_METRICS_OFFLINE",
              "CMDISTILL_METRICS_CLIP_PRECISION"):
        monkeypatch.delenv(k, raising=False)
    yield
    ext.clear_loaded_extractors()  # networks built under a test's environment stay with it


def _rand_image(rng, w, h) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write_pngs(rng, folder, n, size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        _rand_image(rng, *size).save(p)
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------------------------
# Frechet distance

def _independent_tr_sqrt(s1, s2):
    # tr sqrtm(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: eigenvalues only
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()


def _independent_fd(mu1, s1, mu2, s2):
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _independent_tr_sqrt(s1, s2))


def _exact_moment_samples(rng, n, mu, cov):
    """Samples whose sample mean and unbiased covariance are exactly mu and cov."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z @ np.linalg.cholesky(cov).T


def test_fd_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    assert abs(frechet_distance(feats, feats)) < 1e-8 * 64
    assert abs(frechet_distance(torch.from_numpy(feats), feats.copy())) < 1e-8 * 64


def test_fd_of_gaussians_equals_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    # diagonal covariances, as statistics and as samples with exactly these moments
    assert frechet_distance((mu1, np.diag(s1)), (mu2, np.diag(s2))) == pytest.approx(closed, rel=1e-9)
    a = _exact_moment_samples(rng, 50, mu1, np.diag(s1))
    b = _exact_moment_samples(rng, 70, mu2, np.diag(s2))
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-8)
    # commuting (same eigenvectors, not diagonal)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    c1, c2 = (q * s1) @ q.T, (q * s2) @ q.T
    assert frechet_distance((mu1, c1), (mu2, c2)) == pytest.approx(closed, rel=1e-8)
    # plain Monte Carlo, loosely
    a = rng.normal(mu1, np.sqrt(s1), size=(40000, d))
    b = rng.normal(mu2, np.sqrt(s2), size=(40000, d))
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.03)


def test_fd_agrees_with_independent_float64_computation():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(32, 32))
    a = (rng.normal(size=(200, 32)) @ mix).astype(np.float32)
    b = (rng.normal(size=(150, 32)) @ mix * 1.3 + 0.5).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mu1, s1 = a64.mean(0), np.cov(a64, rowvar=False)
    mu2, s2 = b64.mean(0), np.cov(b64, rowvar=False)
    ref = _independent_fd(mu1, s1, mu2, s2)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(ref, rel=1e-7)  # statistics accepted
    from pytorch_fid.fid_score import calculate_frechet_distance  # the same formula, another code base

    assert frechet_distance(a, b) == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_singular_product_retries_with_eps_identity():
    # PSD covariances whose product has no finite principal square root in scipy
    s1 = np.array([[1.0, 0, 1], [0, 0, 0], [1, 0, 1]])
    s2 = np.array([[5.0, -4, 2], [-4, 5, -1], [2, -1, 1]])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0, 0])
    with np.errstate(all="ignore"):
        assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()
    eps = 1e-6 * np.eye(3)
    # dgm-eval: traces of the given covariances, sqrtm of the product of the offset ones
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * _independent_tr_sqrt(s1 + eps, s2 + eps)
    got = frechet_distance((mu1, s1), (mu2, s2))
    assert np.isfinite(got)
    assert got == pytest.approx(expected, abs=1e-8)
    assert got == pytest.approx(1.0 + 2 + 11 - 2 * math.sqrt(10), abs=1e-2)  # eigenvalues of S1 S2: 10, 0, 0


def test_fd_large_imaginary_part_raises():
    with pytest.raises(ValueError, match="Imaginary"):
        frechet_distance((np.zeros(2), np.diag([-1.0, 1.0])), (np.zeros(2), np.eye(2)))


# ----------------------------------------------------------------------------------------------
# Preprocessing (docs/method.md §9), each against an independent PIL / numpy computation

def _np_bilinear(x, out_h, out_w):
    """PyTorch bilinear, align_corners=False, no antialias: source = (dst + 0.5) * in / out - 0.5."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, ly = taps(x.shape[1], out_h)
    x0, x1, lx = taps(x.shape[2], out_w)
    rows = lambda yi: x[:, yi][:, :, x0] * (1 - lx) + x[:, yi][:, :, x1] * lx  # noqa: E731
    return rows(y0) * (1 - ly)[:, None] + rows(y1) * ly[:, None]


@pytest.mark.parametrize("size", [(333, 250), (640, 512)])
def test_inception_preprocess(size):
    img = _rand_image(np.random.default_rng(3), *size)
    x = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0
    expected = 2 * _np_bilinear(x, 299, 299) - 1
    got = inception_preprocess(img)
    assert got.shape == (3, 299, 299) and got.dtype == torch.float32
    # PyTorch computes the source coordinates in float32: up to ~1e-4 at 640 px
    np.testing.assert_allclose(got.numpy(), expected, atol=3e-4)


def test_dinov2_preprocess():
    img = _rand_image(np.random.default_rng(4), 300, 200)
    x = np.asarray(img.resize((224, 224), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = ((x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    got = dinov2_preprocess(img)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(300, 200), (480, 640)])
def test_clip_preprocess(size):
    img = _rand_image(np.random.default_rng(5), *size)
    w, h = img.size  # shortest side to 224 (torchvision's int()), bicubic, then centre crop
    nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    r = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    x = np.asarray(r, dtype=np.float64)[top:top + 224, left:left + 224] / 255.0
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    expected = ((x - mean) / std).transpose(2, 0, 1)
    got = clip_preprocess(img)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Networks (random weights through the real loading code)

def test_inception_matches_pytorch_fid_network(tmp_path, monkeypatch):
    # the registered extractor (random weights) through the DataLoader pass, against pytorch-fid's
    # InceptionV3 holding the same weights (its .pth layout, loaded strictly)
    from pytorch_fid import inception as pfid

    monkeypatch.setenv("CMDISTILL_METRICS_RANDOM_WEIGHTS", "full")
    monkeypatch.setenv("CMDISTILL_METRICS_WORKERS", "2")
    with pytest.warns(UserWarning, match="RANDOM"):
        ex = load_feature_extractor("inception")
    assert ex.identity == "random-full-seed0" and ex.dim == 2048
    rng = np.random.default_rng(6)
    paths = []
    for i, size in enumerate([(64, 48), (400, 320)]):  # up- and downsampled to 299
        paths.append(str(tmp_path / f"{i}.png"))
        _rand_image(rng, *size).save(paths[-1])
    got = extract_features(paths, {"inception": ex}, batch_size=2)["inception"]

    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: ex.model.net.state_dict())
    theirs = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.inference_mode():  # pytorch-fid resizes and rescales inside; [0, 1] images one at a time
        exp = torch.cat([theirs(torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255).permute(2, 0, 1)[None])[0]
                         for p in paths]).flatten(1).numpy()
    assert got.shape == (2, 2048) and got.dtype == np.float32 and got.std(0).mean() > 0
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)


def _dinov2_original_checkpoint(dim, depth, grid=37, patch=14, device=None):
    """A state dict laid out as facebookresearch/dinov2's ``dinov2_vit*14_pretrain.pth``."""
    r = lambda *s: 0.1 * torch.randn(*s, device=device)  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": 1 + r(dim),
                   b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": 1 + r(dim)})
    sd.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim)})
    return sd


def _dinov2_reference_forward(sd, x, heads, depth, patch=14):
    """DinoVisionTransformer.forward (eval) written out: x_norm_clstoken."""
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    pos = sd["pos_embed"]
    m, w0 = int(math.sqrt(pos.shape[1] - 1)), x.shape[-1] // patch
    pp = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
                       scale_factor=((w0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic")
    t = t + torch.cat([pos[:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    B, L, _ = t.shape
    for i in range(depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(t, (dim,), g("norm1.weight"), g("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, g("attn.qkv.weight"), g("attn.qkv.bias")).reshape(
            B, L, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = F.linear((a @ v).transpose(1, 2).reshape(B, L, dim), g("attn.proj.weight"), g("attn.proj.bias"))
        t = t + g("ls1.gamma") * o
        h = F.layer_norm(t, (dim,), g("norm2.weight"), g("norm2.bias"), eps=1e-6)
        h = F.gelu(F.linear(h, g("mlp.fc1.weight"), g("mlp.fc1.bias")))
        h = F.linear(h, g("mlp.fc2.weight"), g("mlp.fc2.bias"))
        t = t + g("ls2.gamma") * h
    return F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def test_dinov2_cls_after_norm_matches_original_model():
    tiny = ext.DINOV2_ARCHS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sd = _dinov2_original_checkpoint(tiny["embed_dim"], tiny["depth"])
    model = ext.DINOv2CLS(sd, arch="tiny").eval()
    rng = np.random.default_rng(7)
    x = torch.stack([dinov2_preprocess(_rand_image(rng, 50, 70)) for _ in range(3)])
    with torch.inference_mode():
        got = model(x)
        exp = _dinov2_reference_forward(sd, x, tiny["num_heads"], tiny["depth"])
        # timm's own position-embedding resampling (antialiased) would give other numbers
        other = ext.DINOv2CLS(None, arch="tiny").eval()
        from timm.models.vision_transformer import checkpoint_filter_fn

        other.vit.load_state_dict(checkpoint_filter_fn(dict(sd), other.vit))
        timm_default = other(x)
        # a checkpoint saved with FSDP block chunks ("blocks.<chunk>.<i>.") loads the same
        chunked = ext.DINOv2CLS({re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in sd.items()},
                                arch="tiny").eval()
        torch.testing.assert_close(chunked(x), got)
    assert got.shape == (3, tiny["embed_dim"])
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
    assert (timm_default - exp).abs().max() > 1e-3


def test_full_size_architectures_load_original_layouts():
    # ViT-L/14 DINOv2 takes the original checkpoint layout strictly and gives 1024-d features;
    # CLIP is OpenAI's ViT-L/14 (QuickGELU, 768-d embeddings). Built on the meta device: no memory.
    with torch.device("meta"):
        sd = _dinov2_original_checkpoint(1024, 24, device="meta")
        dino = ext.DINOv2CLS(sd)
        assert tuple(dino(torch.empty(2, 3, 224, 224)).shape) == (2, 1024)
        clip = ext.CLIPEncoder(None)
    assert dino.vit.pos_embed.shape == (1, 1 + 16 * 16, 1024) and len(dino.vit.blocks) == 24
    v = clip.clip.visual
    assert v.output_dim == 768 and v.conv1.out_channels == 1024 and v.conv1.kernel_size == (14, 14)
    assert len(v.transformer.resblocks) == 24 and type(v.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert sum(p.numel() for p in clip.parameters()) == 427_616_513


@pytest.fixture(scope="module")
def tiny_clip():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ext.CLIPEncoder(None, arch="tiny").eval()


def _script_state_dict(sd, path):
    """Save a state dict as a TorchScript archive, like OpenAI's ViT-L-14.pt."""
    root = nn.Module()
    for k, v in sd.items():
        *mods, leaf = k.split(".")
        m = root
        for name in mods:
            if not hasattr(m, name):
                m.add_module(name, nn.Module())
            m = getattr(m, name)
        m.register_buffer(leaf, v.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def test_clip_weight_files_load(tiny_clip, tmp_path):
    half = {k: v.half() for k, v in tiny_clip.clip.state_dict().items()}  # OpenAI's weights are fp16
    extra = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    torch.save({"module." + k: v for k, v in half.items()} | extra, tmp_path / "plain.pt")
    _script_state_dict(half | extra, tmp_path / "ViT-L-14.pt")  # OpenAI's release is TorchScript
    x = clip_preprocess(_rand_image(np.random.default_rng(8), 64, 64))[None]
    with torch.inference_mode():
        expected = ext.CLIPEncoder({k: v.float() for k, v in half.items()}, arch="tiny")(x)
        for name in ("plain.pt", "ViT-L-14.pt"):
            got = ext.CLIPEncoder(ext.read_clip_state_dict(tmp_path / name), arch="tiny")(x)
            torch.testing.assert_close(got, expected)
    assert expected.shape == (1, 768)


def test_clip_fp16_flag_reproduces_reference_precision(monkeypatch):
    # $CMDISTILL_METRICS_CLIP_PRECISION=fp16: the reference's clip.load on GPU (fp16 weights, fp32 LayerNorm)
    monkeypatch.setenv("CMDISTILL_METRICS_RANDOM_WEIGHTS", "tiny")
    x = clip_preprocess(_rand_image(np.random.default_rng(14), 64, 64))[None]
    out = {}
    for precision in ("fp32", "fp16"):
        monkeypatch.setenv("CMDISTILL_METRICS_CLIP_PRECISION", precision)
        with pytest.warns(UserWarning, match="RANDOM"):
            ex = load_feature_extractor("clip")
        with torch.inference_mode():
            out[precision] = (ex.model(x), ex.model.encode_text(["a cat"]), ex)
    ex16 = out["fp16"][2]
    assert ex16.model.clip.visual.conv1.weight.dtype == torch.float16
    assert type(ex16.model.clip.ln_final).__name__ == "LayerNormFp32"
    assert ex16.identity != out["fp32"][2].identity
    for i in (0, 1):
        assert out["fp16"][i].dtype == torch.float32
        torch.testing.assert_close(out["fp16"][i], out["fp32"][i], rtol=0, atol=2e-2)


def test_clip_score_and_aesthetic_score(tiny_clip, tmp_path, monkeypatch):
    import open_clip

    rng = np.random.default_rng(9)
    imgs = [_rand_image(rng, 60, 80) for _ in range(3)]
    caps = ["a photo of a cat", "an astronaut riding a horse", "x " * 100]  # the last is truncated to 77
    x = torch.stack([clip_preprocess(im) for im in imgs])
    with torch.inference_mode():
        img_emb = tiny_clip.clip.encode_image(x).float()
        txt_emb = tiny_clip.clip.encode_text(open_clip.tokenize(caps)).float()
    # aesthetic MLP weights in the original file layout, found through weights_dir
    w = {"layers.0": (1024, 768), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64),
         "layers.7": (1, 16)}
    g = torch.Generator().manual_seed(0)
    msd = {}
    for k, (o, i) in w.items():
        msd[k + ".weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        msd[k + ".bias"] = torch.randn(o, generator=g) * 0.1
    torch.save(msd, tmp_path / inst.AESTHETIC_FILE)
    mlp = inst.load_aesthetic_mlp(weights_dir=str(tmp_path))
    ctx = MetricContext(["a", "b", "c"], caps, {"clip": img_emb.numpy()},
                        {"clip": FeatureExtractor("clip", tiny_clip, clip_preprocess, 768, "t", "p")},
                        {"aesthetic": mlp}, torch.device("cpu"))

    e_img = img_emb.double().numpy()
    e_img /= np.linalg.norm(e_img, axis=1, keepdims=True)
    e_txt = txt_emb.double().numpy()
    e_txt /= np.linalg.norm(e_txt, axis=1, keepdims=True)
    assert inst.clip_score(ctx) == pytest.approx((e_img * e_txt).sum(1).mean(), abs=1e-6)
    h = e_img
    for k in w:  # linear layers, no activations (dropout is identity in eval)
        h = h @ msd[k + ".weight"].double().numpy().T + msd[k + ".bias"].double().numpy()
    assert inst.aesthetic_score(ctx) == pytest.approx(h.mean(), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Weights resolution

@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inst, "_REPO_ROOT", tmp_path)
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "weights"


LOADERS = {
    "inception": (ext.INCEPTION_FILE, lambda wd: load_feature_extractor("inception", weights_dir=wd)),
    "dinov2": (ext.DINOV2_FILE, lambda wd: load_feature_extractor("dinov2", weights_dir=wd)),
    "clip": (ext.CLIP_FILE, lambda wd: load_feature_extractor("clip", weights_dir=wd)),
    "aesthetic": (inst.AESTHETIC_FILE, lambda wd: inst.load_aesthetic_mlp(weights_dir=wd)),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_offline_missing_weights_is_one_line_error(name, no_weights_anywhere, monkeypatch):
    fname, load = LOADERS[name]
    monkeypatch.setenv("CMDISTILL_METRICS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load(str(no_weights_anywhere))
    msg = str(e.value)
    assert "\n" not in msg and fname in msg and "--metrics_weights_dir" in msg and "http" in msg


def test_failed_download_is_one_line_error(no_weights_anywhere, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "CMDISTILL_METRICS_OFFLINE"):  # CI runs offline; here a download is tried
        monkeypatch.delenv(var, raising=False)
    def fail(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    monkeypatch.setattr(ext, "_download_clip", fail)
    for name in ("inception", "clip"):
        fname, load = LOADERS[name]
        with pytest.raises(UserError) as e:
            load(None)
        msg = str(e.value)
        assert "\n" not in msg and fname in msg and "download failed" in msg


def test_weights_found_in_dir_env_and_hub_cache(no_weights_anywhere, monkeypatch, tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "a.pth").write_bytes(b"x")
    assert resolve_weights("a.pth", url="http://x", weights_dir=str(d)) == d / "a.pth"
    monkeypatch.setenv("CMDISTILL_METRICS_WEIGHTS", str(d))
    assert resolve_weights("a.pth", url="http://x") == d / "a.pth"
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "b.pth").write_bytes(b"y")
    assert resolve_weights("b.pth", url="http://x") == hub / "b.pth"


# ----------------------------------------------------------------------------------------------
# compute_metrics

class _MeanColour(nn.Module):
    """Toy encoder: per-channel mean and std of a 16x16 image (6-d); counts images seen."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


@pytest.fixture
def toy_encoder():
    net = _MeanColour()
    state = {"identity": "toy-v1"}

    def factory(*, device, weights_dir):
        return FeatureExtractor("toy", net, lambda im: torch.from_numpy(
            np.asarray(im.resize((16, 16)), np.float32).transpose(2, 0, 1) / 255), 6, state["identity"], "toy-v1")

    register_feature_extractor("toy", factory)
    yield net, state, factory
    ext._FACTORIES.pop("toy", None)


def test_reference_cache_reused_and_invalidated(toy_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("CMDISTILL_METRICS_WORKERS", "0")
    net, state, factory = toy_encoder
    rng = np.random.default_rng(10)
    gen = _write_pngs(rng, tmp_path / "gen", 5)
    ref = _write_pngs(rng, tmp_path / "ref", 7)
    cache = tmp_path / "cache"
    kw = dict(dgm_models=("toy",), instance_metrics=("none",), cache_dir=str(cache), batch_size=3)

    r1 = compute_metrics(gen, ref, [], **kw)
    assert set(r1) == {"fd_toy"} and net.seen == 12
    load = lambda ps: np.stack([net.forward(torch.from_numpy(  # noqa: E731
        np.asarray(Image.open(p).convert("RGB").resize((16, 16)), np.float32).transpose(2, 0, 1)[None] / 255))[0]
        .numpy() for p in ps])
    assert r1["fd_toy"] == pytest.approx(frechet_distance(load(ref), load(gen)), rel=1e-4)
    net.seen = 0

    assert compute_metrics(gen, ref, [], **kw) == r1 and net.seen == 5  # reference features from the cache
    assert len(list(cache.glob("ref_toy_*.npz"))) == 1

    _rand_image(rng, 48, 30).save(ref[0])  # a reference image changes
    r3 = compute_metrics(gen, ref, [], **kw)
    assert net.seen == 5 + 12 and r3["fd_toy"] != r1["fd_toy"]

    st = os.stat(ref[1])  # only its modification time changes
    os.utime(ref[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    compute_metrics(gen, ref, [], **kw)
    assert net.seen == 5 + 12 + 12

    state["identity"] = "toy-v2"  # other weights
    register_feature_extractor("toy", factory)
    compute_metrics(gen, ref, [], **kw)
    assert net.seen == 5 + 12 + 12 + 12
    assert compute_metrics(gen, ref, [], **kw) and net.seen == 5 + 12 + 12 + 12 + 5


def test_compute_metrics_end_to_end_random_weights(tmp_path, monkeypatch, toy_encoder):
    # default arguments: FID (Inception replaced by the toy encoder: one scipy sqrtm of a 2048 x 2048
    # matrix takes minutes on 2 cores), FD-DINOv2, CLIP
    # score and aesthetic score, with tiny random-weight DINOv2 / CLIP / aesthetic MLP
    monkeypatch.setenv("CMDISTILL_METRICS_RANDOM_WEIGHTS", "tiny")
    monkeypatch.setitem(ext._FACTORIES, "inception", toy_encoder[2])
    rng = np.random.default_rng(11)
    gen = _write_pngs(rng, tmp_path / "gen", 4, size=(48, 40))
    ref = _write_pngs(rng, tmp_path / "ref", 5, size=(40, 48))
    caps = ["a red square", "a cat on a mat", "SDXL test caption", ""]
    with pytest.warns(UserWarning, match="RANDOM"):
        out = compute_metrics(gen, ref, caps, batch_size=2, cache_dir=str(tmp_path / "cache"))
    assert set(out) == {"fid", "fd_dinov2", "clip_score", "aesthetic_score"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
    assert out["fid"] > 0 and out["fd_dinov2"] > 0 and -1 <= out["clip_score"] <= 1
    assert len(list((tmp_path / "cache").glob("ref_*.npz"))) == 2

    same = compute_metrics(gen, gen, caps, dgm_models=("dinov2",), instance_metrics=("none",), batch_size=2)
    assert set(same) == {"fd_dinov2"} and abs(same["fd_dinov2"]) < 1e-4
    only = compute_metrics(gen, None, caps, dgm_metrics=("none",), instance_metrics=("clip_score",))
    assert only == {"clip_score": pytest.approx(out["clip_score"], abs=1e-6)}


def test_compute_metrics_input_errors(tmp_path):
    gen = _write_pngs(np.random.default_rng(12), tmp_path, 2)
    with pytest.raises(UserError, match="reference"):
        compute_metrics(gen, None, ["a", "b"], instance_metrics=())
    with pytest.raises(UserError, match="unknown feature extractor"):
        compute_metrics(gen, gen, ["a", "b"], dgm_models=("nope",), instance_metrics=())
    with pytest.raises(UserError, match="unknown instance metric"):
        compute_metrics(gen, gen, ["a", "b"], dgm_metrics=(), instance_metrics=("nope",))
    with pytest.raises(UserError, match="captions"):
        compute_metrics(gen, None, ["a"], dgm_metrics=(), instance_metrics=("clip_score",))
    with pytest.raises(UserError, match="not found"):
        compute_metrics(gen + [str(tmp_path / "missing.png")], None, ["a"] * 3, dgm_metrics=(),
                        instance_metrics=("clip_score",))


def test_given_features_score_instance_metrics_and_files_the_fd(toy_encoder, tmp_path, monkeypatch):
    """``gen_features`` (the in-memory images' features) feed the instance metrics only; the FD with the
    same extractor still reads the files."""
    monkeypatch.setenv("CMDISTILL_METRICS_WORKERS", "0")
    net, _, _ = toy_encoder
    seen = {}
    inst.register_instance_metric("toy_mean", lambda ctx: seen.setdefault("f", ctx.features["toy"]).mean(),
                                  requires=("toy",))
    try:
        rng = np.random.default_rng(13)
        gen, ref = _write_pngs(rng, tmp_path / "gen", 4), _write_pngs(rng, tmp_path / "ref", 5)
        given = np.full((4, 6), 7.0, np.float32)
        out = compute_metrics(gen, ref, ["a"] * 4, dgm_models=("toy",), instance_metrics=("toy_mean",),
                              gen_features={"toy": given})
        assert out["toy_mean"] == pytest.approx(7.0) and seen["f"] is not None
        files = compute_metrics(gen, ref, ["a"] * 4, dgm_models=("toy",), instance_metrics=("none",))
        assert out["fd_toy"] == pytest.approx(files["fd_toy"], rel=1e-6)
        with pytest.raises(UserError, match="3 stored toy features for 4 generated images"):
            compute_metrics(gen, ref, ["a"] * 4, dgm_models=("toy",), instance_metrics=("toy_mean",),
                            gen_features={"toy": given[:3]})
    finally:
        inst._METRICS.pop("toy_mean", None)


def test_image_that_does_not_decode_is_one_line_error(toy_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("CMDISTILL_METRICS_WORKERS", "0")
    rng = np.random.default_rng(14)
    gen = _write_pngs(rng, tmp_path / "gen", 3)
    bad = tmp_path / "gen" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header reads, the pixels do not
    with pytest.raises(UserError, match=r"001\.png' does not decode"):
        compute_metrics(gen, gen[:1] * 2, [], dgm_models=("toy",), instance_metrics=("none",))
