"""Compilation: ``torch.compile`` of the whole UNet (teacher, merged CM target) or of its blocks (the student),
and the channels_last form of its group norms (docs/method.md §11)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import UserError
from .views import _tree_view

# torch.compile modes that the flags offer: none that replays CUDA graphs (their outputs are overwritten by the next
# replay; measured and rejected, benchmarks/RESULTS.md).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

logger = logging.getLogger(__name__)


def compile_cache() -> Path:
    """The folder of torch.compile's on-disk caches (inductor's compiled kernels and FX graphs, AOTAutograd's
    graphs), kept between runs: ``$TORCHINDUCTOR_CACHE_DIR`` where set, else ``$XDG_CACHE_HOME/cmdistill/
    torch_compile`` (``~/.cache/...``) instead of inductor's own default under /tmp, which a reboot clears. A
    later run of the same graphs (training, ``test.py``, ``test_teacher.py``; a copy of the folder on another
    machine of the same GPU and versions) loads them instead of compiling again. Called before the first
    compile of a process; the folder can be deleted at any time."""
    if not os.environ.get(CACHE_ENV):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[CACHE_ENV] = str(base / "cmdistill" / "torch_compile")
    path = Path(os.environ[CACHE_ENV])
    if getattr(compile_cache, "_said", None) != path:
        logger.info("torch.compile cache: %s (%s)", path, "reused" if path.is_dir() and any(path.iterdir())
                    else "empty: the first compile fills it")
        compile_cache._said = path
    return path


class DynamicBatch:
    """A compiled UNet (``compile_unet``) called with the batch dimension (dim 0) of every tensor input marked
    dynamic (``torch._dynamo.maybe_mark_dynamic``): one compiled graph serves every batch size. For no-grad calls
    (teacher passes, samplers): ``UNetEps(DynamicBatch(compiled))``. The same call otherwise."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        for v in _tensors((args, kwargs)):
            if v.ndim:
                torch._dynamo.maybe_mark_dynamic(v, 0)
        return self.unet(*args, **kwargs)


def _tensors(v):
    """The tensors in ``v`` (nested tuples, lists and dicts)."""
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)


def compile_unet(unet, backend: str = "inductor", mode: str | None = None, freezing: bool = False,
                 channels_last: bool = False):
    """``torch.compile`` of the UNet. For no-grad calls (teacher passes, samplers) call it through
    ``DynamicBatch(compiled)``: the batch dimension is compiled symbolic once, so the
    shrinking active sets of the Direct CM loop do not recompile for every size. The student's pass
    with grad (LoRA, gradient checkpointing, DDP) compiles as it is. The first call compiles (minutes
    for SDXL); the result agrees with eager mode to kernel rounding (tests/test_speed.py).
    ``mode`` (inductor only): one of ``COMPILE_MODES``.
    ``freezing`` (inductor, default mode, no-grad calls only): inductor's freezing, which makes the weights
    constants of the compiled graph, read at the first call (no parameter inputs to fetch per call; weights laid
    out ahead): only for weights that never change afterwards (the teacher's).
    ``channels_last`` (inductor, no-grad calls): compiles ``channelwise_norms(unet)`` with inductor's layout pass
    forced on (it is skipped for a symbolic batch): the convolutions' inputs, outputs and weights in
    channels_last, which cuDNN's kernels use natively (in NCHW it converts every convolution's input, weight and
    output), and the group norms in the form that compiles well in that layout
    (``ChannelwiseGroupNorm``; other backends get that view only). The same function (benchmarks/RESULTS.md)."""
    if freezing and (backend != "inductor" or mode not in (None, "default")):
        raise UserError("freezing applies to torch.compile's default mode with the inductor backend: drop "
                        "--compile_mode, or the freezing flag")
    compile_cache()
    if channels_last:
        unet = channelwise_norms(unet)
    options = {**({"freezing": True} if freezing else {}),
               **({"force_layout_optimization": True} if channels_last and backend == "inductor" else {})}
    kwargs = _compile_kwargs(backend, mode)
    if options and "mode" in kwargs:  # torch.compile takes a mode or options, not both: the mode as its options
        from torch._inductor import list_mode_options

        options = {**list_mode_options(kwargs.pop("mode")), **options}
    return torch.compile(unet, **kwargs, **({"options": options} if options else {}))


def _compile_kwargs(backend: str, mode: str | None) -> dict:
    """torch.compile's arguments: ``mode`` only for inductor and only when not its default."""
    return {"backend": backend, **({"mode": mode} if mode not in (None, "default") and backend == "inductor" else {})}


def channelwise_norms(tree):
    """A view of ``tree`` (as ``base_view``: every other module and tensor shared) whose group norms are
    ``ChannelwiseGroupNorm``s: the same function, for ``compile_unet(..., channels_last=True)``."""
    def replace(m):
        if isinstance(m, ChannelwiseGroupNorm):
            return m  # a view of a view
        if type(m) is torch.nn.GroupNorm and not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__):
            return ChannelwiseGroupNorm(m)
        return None  # (a group norm with hooks or a patched forward stays as it is)

    return _tree_view(tree, replace)


class ChannelwiseGroupNorm(torch.nn.Module):
    """``torch.nn.GroupNorm`` (sharing ``norm``'s weight and bias) with its statistics taken per channel first, then
    combined per group: mean_g = mean of the channel means, var_g = mean of (var_c + (mean_c - mean_g)^2) (exact).
    The same function in the form a channels_last UNet compiles well (``compile_unet(..., channels_last=True)``):
    the reductions run over each channel's H x W (rows in NCHW, neighbouring channels side by side in NHWC) instead
    of over each group's (C/G, H, W), which NHWC memory holds with a stride of C (measured: benchmarks/RESULTS.md). Computed in float32 (float64 for a float64 input); the output dtype is
    ``F.group_norm``'s: float32 under CUDA's autocast (group_norm is on its float32 list), else the input's."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        n, c = x.shape[:2]
        g, eps = self.norm.num_groups, self.norm.eps
        xf = x if x.dtype == torch.float64 else x.float()
        if x.dim() > 2:
            var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)  # [N, C]
        else:  # [N, C]: one value per channel
            var_c, mean_c = torch.zeros_like(xf), xf
        mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
        mean_g = mean_c.mean(-1, keepdim=True)
        var_g = (var_c + (mean_c - mean_g) ** 2).mean(-1, keepdim=True)
        scale = torch.rsqrt(var_g + eps)  # [N, G, 1]
        shift = -mean_g * scale
        if self.norm.affine:
            w = self.norm.weight.to(xf.dtype).view(1, g, c // g)
            scale, shift = scale * w, shift * w + self.norm.bias.to(xf.dtype).view(1, g, c // g)
        shape = (n, c) + (1,) * (x.dim() - 2)
        y = xf * scale.expand(n, g, c // g).reshape(shape) + shift.expand(n, g, c // g).reshape(shape)
        return y if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") else y.to(x.dtype)


BLOCK_TYPES = ("ResnetBlock2D", "BasicTransformerBlock")  # the blocks gradient checkpointing wraps
RECOMPILE_LIMIT = 512  # compiled entries allowed per block class (compile_blocks)


def compile_blocks(unet, enabled: bool = True, backend: str = "inductor", mode: str | None = None,
                   static: bool = False) -> int:
    """Regional compilation: ``torch.compile`` of each ResNet and transformer block of ``unet`` in place
    (``nn.Module.compile``), or (``enabled=False``) back to eager. Every pass through the UNet uses the
    compiled blocks: the student's forward and backward (LoRA and checkpointing included: a checkpointed
    block recomputes through its compiled forward), the CM target pass, an eager teacher. Blocks of one class
    share their compiled code (the weights are graph inputs), so the compile takes a fraction of a
    whole-model compile with grad. Same values to kernel rounding (tests/test_speed.py). ``mode``
    (inductor only), e.g. "max-autotune-no-cudagraphs": kernels tuned per block shape. ``static``: every graph
    with static shapes, for a tree called at one batch size: without it dynamo compiles the second and later
    block shapes of a class with symbolic sizes (its automatic dynamic shapes), which takes longer to compile
    (benchmarks/RESULTS.md) and serves the next batch size without a recompile. Returns the number of blocks."""
    blocks = [m for m in unet.modules() if type(m).__name__ in BLOCK_TYPES]
    if enabled:
        compile_cache()
        # A class's compiled code has an entry per parameter shape (SDXL: ~12 ResNet configurations) x grad mode
        # x tree (the student's blocks, the teacher view's, the merged target's) x batch (static, then dynamic):
        # far more than dynamo's default of 8 per code object, past which blocks would silently run eager.
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
        name = "accumulated_recompile_limit" if hasattr(cfg, "accumulated_recompile_limit") else \
            "accumulated_cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 4 * RECOMPILE_LIMIT))
    for m in blocks:
        if enabled:
            m.compile(**_compile_kwargs(backend, mode), **({"dynamic": False} if static else {}))
        else:
            m._compiled_call_impl = None
    return len(blocks)
