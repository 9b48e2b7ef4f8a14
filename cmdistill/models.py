"""Loading the SDXL teacher, the LoRA student, SDXL text conditioning (SPEC §1).

One UNet lives in memory: with its LoRA adapter disabled it *is* the teacher (``base_view``: the same
weights seen without the adapter layers).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import types
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import to_device
from .errors import UserError

DEFAULT_LORA_TARGETS = ("to_q to_k to_v to_out.0 proj_in proj_out ff.net.0.proj ff.net.2 conv1 conv2 "
                        "conv_shortcut downsamplers.0.conv upsamplers.0.conv time_emb_proj").split()
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _hint(path: str) -> str:
    if os.path.isdir(path) or path.startswith(("/", "./", "../", "~")):
        return f"check that '{path}' is a diffusers folder (saved with save_pretrained)"
    return (f"'{path}' is not a local folder and could not be fetched from the hub (offline?): download it "
            f"where you have network (`hf download {path}`) and set HF_HOME, or pass a local folder")


def resolve_model_path(path: str, revision: str | None = None, cache_dir: str | None = None,
                       flag: str = "--pretrained_teacher_model") -> str:
    """A local folder as is; a hub id from the local cache when it is there; otherwise check quickly
    that the hub is reachable, so that an offline machine gets one clear line instead of minutes
    of retries."""
    if os.path.isdir(os.path.expanduser(path)) or path.startswith(("/", "./", "../", "~")):
        if not os.path.exists(os.path.expanduser(path)):
            raise UserError(f"{flag}: folder '{path}' does not exist")
        return os.path.expanduser(path)
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{flag}: {_hint(path)} (HF_HUB_OFFLINE is set)")
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        raise UserError(f"{flag}: {_hint(path)}") from None
    return path


def from_pretrained(cls, path: str, subfolder: str | None = None, flag: str = "--pretrained_teacher_model",
                    **kwargs):
    """``cls.from_pretrained`` with a one-line error naming the fix when the weights are missing."""
    if path.startswith(("/", "./", "../")) and not os.path.exists(path):
        raise UserError(f"{flag}: folder '{path}' does not exist")
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        what = f"{path}" + (f" (subfolder '{subfolder}')" if subfolder else "")
        raise UserError(f"{flag}: cannot load {cls.__name__} from {what}: {_hint(path)} "
                        f"[{type(e).__name__}: {str(e).splitlines()[0][:160]}]") from None


@dataclass
class Teacher:
    tokenizers: list
    text_encoders: list
    vae: object
    unet: object
    scheduler: object


def load_teacher(model: str, vae_path: str | None = None, revision: str | None = None,
                 teacher_revision: str | None = None, cache_dir: str | None = None, load_unet: bool = True) -> Teacher:
    """Load the SDXL components from a hub id or a local pipeline folder (SPEC §1)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = resolve_model_path(model, teacher_revision, cache_dir)
    if vae_path:
        vae_path = resolve_model_path(vae_path, revision, cache_dir, flag="--pretrained_vae_model_name_or_path")
    kw = dict(revision=teacher_revision, cache_dir=cache_dir)
    tok1 = from_pretrained(CLIPTokenizer, model, "tokenizer", **kw)
    tok2 = from_pretrained(CLIPTokenizer, model, "tokenizer_2", **kw)
    te1 = from_pretrained(CLIPTextModel, model, "text_encoder", **kw)
    te2 = from_pretrained(CLIPTextModelWithProjection, model, "text_encoder_2", **kw)
    if vae_path:
        vae = from_pretrained(AutoencoderKL, vae_path, None, flag="--pretrained_vae_model_name_or_path",
                              revision=revision, cache_dir=cache_dir)
    else:
        vae = from_pretrained(AutoencoderKL, model, "vae", **kw)
    unet = from_pretrained(UNet2DConditionModel, model, "unet", **kw) if load_unet else None
    sched = from_pretrained(DDPMScheduler, model, "scheduler", **kw)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserError(f"--pretrained_teacher_model {model}: the UNet is not SDXL-conditioned "
                        "(addition_embed_type must be 'text_time')")
    for m in (te1, te2, vae, unet):
        if m is None:
            continue
        m.requires_grad_(False)
        m.eval()
    return Teacher([tok1, tok2], [te1, te2], vae, unet, sched)


@torch.no_grad()
def encode_prompts(captions: list[str], tokenizers, text_encoders) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning (SPEC §1): penultimate hidden states of both encoders concatenated,
    and the pooled (projected) output of the second encoder."""
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_sizes, crop_top_lefts, target_size) -> torch.Tensor:
    """SDXL micro-conditioning (SPEC §1): original (h, w) + crop top-left (y, x) + target (h, w)."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, dtype=torch.float32)


def add_lora(unet, rank: int = 64, alpha: float = 64, dropout: float = 0.0, targets=DEFAULT_LORA_TARGETS):
    """Attach the student's LoRA adapter (SPEC §1). B is initialised to zero, so the student starts
    as the teacher."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))
    return unet


def set_lora_input_casting(unet, enabled: bool) -> int:
    """PEFT copies the input of every LoRA layer to the adapter's dtype before the adapter runs (with
    fp32 adapters on bf16/fp16 weights: every activation is copied to fp32, in the forward, in the
    recomputation and in the backward). Under autocast the adapter's matmul or convolution runs in
    the autocast dtype either way, so with ``lora_dropout = 0`` switching the copy off gives the same
    values with less memory traffic (tests/test_speed.py). Only for models run under autocast.
    Returns the number of LoRA layers changed."""
    layers = tuner_layers(unet)
    for m in layers:
        m.cast_input_dtype_enabled = enabled
    return len(layers)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def uses_cudagraphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` replays CUDA graphs (whose outputs the next replay overwrites)."""
    return mode in ("reduce-overhead", "max-autotune")


def compile_unet(unet, backend: str = "inductor", mode: str | None = None, freezing: bool = False,
                 channels_last: bool = False):
    """``torch.compile`` of the UNet. For no-grad calls (teacher passes, samplers) use it through
    ``UNetEps(compiled, dynamic_batch=True)``: the batch dimension is compiled symbolic once, so the
    shrinking active sets of the Direct CM loop do not recompile for every size. The student's pass
    with grad (LoRA, gradient checkpointing, DDP) compiles as it is. The first call compiles (minutes
    for SDXL); the result agrees with eager mode to kernel rounding (tests/test_speed.py).
    ``mode`` (inductor only): e.g. "reduce-overhead" replays a CUDA graph per batch size, which removes
    the per-kernel launch cost of small calls; call it through ``UNetEps(..., fresh_output=True)``.
    ``freezing`` (inductor, default mode, no-grad calls only): inductor's freezing, which makes the weights
    constants of the compiled graph, read at the first call (no parameter inputs to fetch per call; weights laid
    out ahead): only for weights that never change afterwards (the teacher's).
    ``channels_last`` (inductor, no-grad calls): compiles ``channelwise_norms(unet)`` with inductor's layout pass
    forced on (it is skipped for a symbolic batch): the convolutions' inputs, outputs and weights in
    channels_last, which cuDNN's kernels use natively (in NCHW it converts every convolution's input, weight and
    output: ~4% of an SDXL forward), and the group norms in the form that compiles well in that layout
    (``ChannelwiseGroupNorm``; other backends get that view only). The same function; on an H100
    the teacher forward 0.227 s instead of 0.236-0.239 s, 0.221 s with ``freezing`` (benchmarks/RESULTS.md)."""
    if freezing and (backend != "inductor" or mode not in (None, "default")):
        raise UserError("freezing applies to torch.compile's default mode with the inductor backend: drop "
                        "--compile_mode, or the freezing flag")
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


class ChannelwiseGroupNorm(torch.nn.Module):
    """``torch.nn.GroupNorm`` (sharing ``norm``'s weight and bias) with its statistics taken per channel first, then
    combined per group: mean_g = mean of the channel means, var_g = mean of (var_c + (mean_c - mean_g)^2) (exact).
    The same function in the form a channels_last UNet compiles well (``compile_unet(..., channels_last=True)``):
    the reductions run over each channel's H x W (rows in NCHW, neighbouring channels side by side in NHWC) instead
    of over each group's (C/G, H, W), which NHWC memory holds with a stride of C; measured on an H100, SDXL's
    blocks in channels_last are faster than in NCHW with these norms and slower or mixed with inductor's own
    (benchmarks/RESULTS.md). Computed in float32 (float64 for a float64 input); the output dtype is
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


def compile_blocks(unet, enabled: bool = True, backend: str = "inductor", mode: str | None = None) -> int:
    """Regional compilation: ``torch.compile`` of each ResNet and transformer block of ``unet`` in place
    (``nn.Module.compile``), or (``enabled=False``) back to eager. Every pass through the UNet uses the
    compiled blocks: the student's forward and backward (LoRA and checkpointing included: a checkpointed
    block recomputes through its compiled forward), the CM target pass, an eager teacher. Blocks of one class
    share their compiled code (the weights are graph inputs), so the compile takes a fraction of a
    whole-model compile with grad. Same values to kernel rounding (tests/test_speed.py). ``mode``
    (inductor only), e.g. "max-autotune-no-cudagraphs": kernels tuned per block shape. Returns the number of
    blocks."""
    blocks = [m for m in unet.modules() if type(m).__name__ in BLOCK_TYPES]
    if enabled:
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
            m.compile(**_compile_kwargs(backend, mode))
        else:
            m._compiled_call_impl = None
    return len(blocks)


def tuner_layers(unet) -> list:
    """The UNet's PEFT adapter layers (LoRA-wrapped convolutions and linears)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


_TUNER_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def adapters_disabled(unet):
    """Run the shared UNet as the teacher: every adapter layer forwards its base layer only.

    PEFT's ``disable_adapters()`` / ``enable_adapters()`` also flip ``requires_grad`` of every adapter
    parameter, a Python walk over ~800 layers that cost 0.05-0.1 s per teacher call on SDXL (measured;
    more than half of a small Direct CM call). Here only each layer's disable flag is set, from a list built
    once per UNet and set of adapters: the same forward, in microseconds. The flags are restored on exit."""
    key = tuple(getattr(unet, "peft_config", {}))  # the adapters' names: a change rebuilds the list
    cached = _TUNER_LAYERS.get(unet)
    if cached is None or cached[0] != key:
        cached = _TUNER_LAYERS[unet] = (key, tuner_layers(unet))
    layers = cached[1]
    if not layers:
        unet.disable_adapters()  # no adapter at all: the library's own error
    # A plain bool attribute: written to the instance dict directly (what nn.Module.__setattr__ ends in, without
    # its isinstance checks: ~1 us per layer, 1.6 ms per enter + exit on SDXL's ~800 layers).
    before = [m.__dict__.get("_disable_adapters", m._disable_adapters) for m in layers]
    for m in layers:
        m.__dict__["_disable_adapters"] = True
    try:
        yield unet
    finally:
        for m, b in zip(layers, before):
            m.__dict__["_disable_adapters"] = b


def base_view(unet):
    """The UNet without its adapters, for the teacher's passes: a module tree in which every PEFT adapter layer
    is replaced by the layer it wraps, sharing every parameter and buffer with ``unet`` (no weight is
    copied; a change to the weights, in place or by ``.to()``, shows in both). Its forward is the
    adapter-disabled forward of ``unet`` (``adapters_disabled``), with no switch to flip per call and none of
    the adapter layers' modules and tensors for ``torch.compile`` to guard on at every call (SDXL: ~1,600
    fewer tensors; the compiled teacher's entry, ~10 ms before its first kernel on an H200, is mostly guards).

    Modules with no adapter below them are shared as they are; the others are shallow copies with their own
    child list (their parameter, buffer and hook dicts are the original's), their instance methods (e.g.
    accelerate's mixed-precision ``forward``) bound to the copy, and without the original's
    ``nn.Module.compile``d call (``compile_blocks(view)`` compiles the view's own). A forward wrapped by other
    means (offload hooks) is refused with a one-line error. Shared modules switch ``train()`` / ``eval()`` for
    both trees, the copies keep the mode they had when the view was built: the same values for SDXL's UNet,
    whose dropout has p = 0."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return _tree_view(unet, lambda m: m.get_base_layer() if isinstance(m, BaseTunerLayer) else None)


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


def _tree_view(unet, replace):
    """``unet``'s module tree with every module ``m`` for which ``replace(m)`` returns a module replaced by it
    (``replace`` returns None for the modules to keep; their children are visited)."""

    def view(m):
        r = replace(m)
        if r is not None:
            return r
        children = {name: None if c is None else view(c) for name, c in m._modules.items()}
        if all(children[name] is c for name, c in m._modules.items()):
            return m
        v = _module_copy(m)
        v.__dict__["_modules"] = children
        return v

    return view(unet)


def _module_copy(m):
    """A shallow copy of module ``m`` for a view (``_tree_view``): the same dicts of children, parameters,
    buffers and hooks (the caller replaces what differs), its instance methods bound to the copy, without the
    original's ``nn.Module.compile``d call. A forward wrapped by other means is refused."""
    v = copy.copy(m)
    v.__dict__["_compiled_call_impl"] = None
    for name, attr in list(v.__dict__.items()):  # e.g. accelerate's autocast forward, bound to the original
        if isinstance(attr, types.MethodType) and attr.__self__ is m:
            v.__dict__[name] = types.MethodType(attr.__func__, v)
    forward = v.__dict__.get("forward")
    if forward is not None and not (isinstance(forward, types.MethodType) and forward.__self__ is v):
        # e.g. accelerate's device-map / offload hooks (a partial over the original module): the copy would
        # run the original's forward, adapters on.
        raise UserError(f"the UNet's {type(m).__name__} has a wrapped forward ({type(forward).__name__}, e.g. "
                        "offload or device-map hooks) that a view of it cannot follow: load the UNet on one "
                        "device, without device_map / cpu offload")
    return v


class MergedAdapters:
    """The student for its no-grad passes (the CM target, ``--merged_target``): a module tree like ``base_view``
    in which each adapter layer is replaced by a copy of the layer it wraps with a weight of its own (a view
    into one buffer per batch of same-shaped layers), W + scale * B A (PEFT's ``get_delta_weight``), refreshed
    from the current adapter weights by ``refresh()`` (``refreshing(eps_fn, step)`` calls it before a pass
    whenever the optimizer step has changed). Other parameters, buffers and modules are shared. Build it
    after the UNet's last move or cast (a ``tree.to(...)`` afterwards re-plans the buffers at the next refresh).

    The forward is the adapters-on forward with the update folded into the weights: the same function, each
    merged weight rounded once to the frozen weights' dtype (bf16: the rounding of the inputs of every
    matmul under autocast anyway), and a pass with the teacher's cost instead of the base matmuls plus two
    rank-r matmuls per layer. Costs one more copy of the adapted layers' weights (SDXL, LoRA on the default
    targets: ~4.8 GB in bf16). ``tree`` can be compiled like the teacher (``compile_unet``)."""

    CHUNK_BYTES = 512 * 2**20  # the fp32 deltas that refresh() holds at once, per batch of layers

    def __init__(self, unet):
        self.layers = []
        self.refreshed_at = None  # the step given to the last refresh() (None: not tied to a step)

        def merged(layer):
            if any(layer.use_dora.get(a, False) for a in layer.active_adapters):
                raise UserError("--merged_target: DoRA adapters cannot be folded into a weight copy; "
                                "leave --merged_target off")
            base = layer.get_base_layer()
            copy_ = _module_copy(base)
            copy_.__dict__["_parameters"] = dict(base._parameters)
            self.layers.append((layer, copy_))
            return copy_

        from peft.tuners.tuners_utils import BaseTunerLayer

        self.tree = _tree_view(unet, lambda m: merged(m) if isinstance(m, BaseTunerLayer) else None)
        self.batches = self._plan()
        self.refresh()

    @staticmethod
    def _batch_key(layer):
        """What layers merged in one batch share (None: merged on its own): one active adapter, whose update is
        B A with B (out, r) and A (r, fan-in) as matrices (linear layers; convolutions with a 1x1 B, ungrouped)."""
        if len(layer.active_adapters) != 1:
            return None
        a = layer.active_adapters[0]
        if a not in layer.lora_A or getattr(layer, "fan_in_fan_out", False):
            return None
        base, A, B = layer.get_base_layer(), layer.lora_A[a].weight, layer.lora_B[a].weight
        if isinstance(base, torch.nn.Conv2d) and (base.groups != 1 or B.shape[2:] != (1, 1)):
            return None
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) or A.dtype != B.dtype:
            return None
        return a, tuple(base.weight.shape), A.shape[0], A.device, A.dtype, base.weight.dtype

    def _plan(self):
        """The merged weights as views into one buffer per batch of same-shaped layers (so that refresh() merges
        a batch with a few large kernels instead of a few small ones per layer; SDXL: ~800 layers in ~40
        batches); the others as tensors of their own. Returns [(adapter, [(layer, merged)...], buffer)]."""
        groups = {}
        for layer, m in self.layers:
            key = self._batch_key(layer)
            groups.setdefault(key, []).append((layer, m))
        batches = []
        for key, members in groups.items():
            if key is None:
                for _, m in members:
                    w = m.weight
                    m.weight = torch.nn.Parameter(torch.empty_like(w), requires_grad=False)
                continue
            adapter, shape = key[0], key[1]
            fan_in = math.prod(shape[1:])
            per_layer = max(1, self.CHUNK_BYTES // (4 * shape[0] * fan_in))
            for i in range(0, len(members), per_layer):
                chunk = members[i:i + per_layer]
                w = chunk[0][1].weight
                buffer = torch.empty((len(chunk), shape[0], fan_in), dtype=w.dtype, device=w.device)
                for j, (_, m) in enumerate(chunk):
                    m.weight = torch.nn.Parameter(buffer[j].view(shape), requires_grad=False)
                batches.append((adapter, chunk, buffer))
        return batches

    def refreshing(self, eps_fn, step=lambda: None):
        """``eps_fn`` (a call of ``tree``) after ``refresh()``, which runs only when ``step()`` differs from the
        step of the last refresh: the trainer passes its optimizer step, so the micro-steps of gradient
        accumulation do not repeat it; with ``step()`` None, before every call."""
        def call(x, t, cond):
            now = step()
            if now is None or now != self.refreshed_at:
                self.refresh(now)
            return eps_fn(x, t, cond)

        return call

    @torch.no_grad()
    def refresh(self, step=None):
        """Each merged weight from the frozen weight and the current adapter weights of the active adapters (an
        adapter layer switched off by its flag contributes its frozen weight alone). Outside autocast: the sum
        is taken in the adapters' precision (fp32) and rounded once to the weight's dtype."""
        self.refreshed_at = step
        if any(chunk[0][1].weight.data_ptr() != buffer.data_ptr() for _, chunk, buffer in self.batches):
            self.batches = self._plan()  # the tree was moved or cast since: its weights left the buffers
        device = self.layers[0][1].weight.device.type if self.layers else "cpu"
        with torch.autocast(device, enabled=False):
            batched = set()
            for adapter, chunk, buffer in self.batches:
                if not all(layer.active_adapters == [adapter] and not layer.disable_adapters for layer, _ in chunk):
                    continue  # the adapters were switched since: layer by layer below
                n, out, fan_in = buffer.shape
                A = torch.stack([layer.lora_A[adapter].weight.reshape(-1, fan_in) for layer, _ in chunk])
                B = torch.stack([layer.lora_B[adapter].weight.reshape(out, -1) for layer, _ in chunk])
                precision = torch.promote_types(A.dtype, torch.float32)  # (fp32 adapters: as they are)
                delta = torch.bmm(B.to(precision), A.to(precision))  # (B A) * scaling as get_delta_weight
                scaling = [layer.scaling[adapter] for layer, _ in chunk]
                delta.mul_(scaling[0] if len(set(scaling)) == 1 else
                           to_device(torch.tensor(scaling, dtype=delta.dtype), delta.device).view(n, 1, 1))
                torch.stack([layer.get_base_layer().weight.reshape(out, fan_in) for layer, _ in chunk], out=buffer)
                buffer.copy_(delta.add_(buffer))  # W + delta summed in that precision, then rounded once
                batched.update(id(m) for _, m in chunk)
            for layer, merged in self.layers:
                if id(merged) in batched:
                    continue
                w = layer.get_base_layer().weight
                if layer.disable_adapters:
                    merged.weight.copy_(w)
                    continue
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                merged.weight.copy_(w + delta)  # in the delta's precision (fp32 adapters), then rounded once


def lora_state_dict(unet) -> dict:
    # PEFT-format keys (lora_A / lora_B): diffusers' loader maps every one of them back. (The older
    # "lora.down/up" naming from convert_state_dict_to_diffusers loses the attention projections
    # when read back by load_lora_weights in diffusers 0.42.)
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def lora_metadata(unet, adapter: str = "default") -> dict:
    """The adapter's ``LoraConfig`` (rank, alpha, target modules, ...) as a dict: what diffusers stores in a
    LoRA file so that ``load_lora_weights`` rebuilds the adapter with the trained alpha (without it, diffusers
    assumes alpha = rank)."""
    return unet.peft_config[adapter].to_dict()


def save_lora(unet, directory: str | Path) -> None:
    """Write the LoRA in the diffusers format that ``StableDiffusionXLPipeline.load_lora_weights`` reads, with
    the adapter metadata (``lora_metadata``) in the safetensors header."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(str(directory), unet_lora_layers=lora_state_dict(unet),
                                                safe_serialization=True,
                                                unet_lora_adapter_metadata=lora_metadata(unet))


def read_lora_metadata(directory: str | Path) -> dict | None:
    """The UNet adapter's ``LoraConfig`` fields stored by :func:`save_lora` in ``directory``'s LoRA file; None
    for a file written without them."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(Path(directory) / LORA_WEIGHT_NAME), "pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    return {k[len("unet."):]: v for k, v in json.loads(raw).items() if k.startswith("unet.")} or None


def load_lora_into(unet, directory: str | Path) -> None:
    """Load LoRA weights written by :func:`save_lora` into a UNet that already has the adapter."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    directory = Path(directory)
    if not (directory / LORA_WEIGHT_NAME).is_file():
        raise UserError(f"no LoRA weights ({LORA_WEIGHT_NAME}) in '{directory}': train first, or point "
                        "to a checkpoint-* folder or the training --output_dir")
    meta = read_lora_metadata(directory)
    mine = unet.peft_config["default"]
    if meta is not None and (meta.get("r"), float(meta.get("lora_alpha"))) != (mine.r, float(mine.lora_alpha)):
        raise UserError(f"the LoRA in '{directory}' has rank {meta.get('r')} and alpha {meta.get('lora_alpha')}, "
                        f"not {mine.r} and {mine.lora_alpha}: pass --lora_rank {meta.get('r')} --lora_alpha "
                        f"{meta.get('lora_alpha')}")
    sd, _ = StableDiffusionXLPipeline.lora_state_dict(str(directory))
    sd = {k.replace("unet.", "", 1): v for k, v in sd.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(sd), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"LoRA weights in '{directory}' do not fit this UNet "
                        f"(e.g. {result.unexpected_keys[0]}): wrong --lora_target_modules or teacher?")
    require_finite_lora(unet, directory / LORA_WEIGHT_NAME)


def lora_is_finite(weights) -> bool:
    """Whether every LoRA weight is finite: ``weights`` is a model with adapters (its ``lora_`` parameters) or a
    dict / iterable of tensors (e.g. a loaded LoRA file)."""
    if isinstance(weights, torch.nn.Module):
        tensors = [p for n, p in weights.named_parameters() if "lora_" in n]
    else:
        tensors = list(weights.values()) if isinstance(weights, dict) else list(weights)
    flags: dict = {}  # one reduction and one host sync per device, not one per tensor
    for t in tensors:
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def require_finite_lora(unet, source) -> None:
    """A one-line error naming ``source`` when the LoRA weights loaded into ``unet`` are not all finite."""
    if not lora_is_finite(unet):
        raise UserError(f"the LoRA weights in {source} are not finite (NaN or inf: the run diverged): use an "
                        "earlier checkpoint-* folder of that run")


def _fsync(path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems without fsync on directories
        pass
    finally:
        os.close(fd)


PEFT_SUBFOLDER = "peft"


def write_peft_adapter(lora_dir: str | Path, dest: str | Path | None = None,
                       base_model: str | None = None) -> Path:
    """Write the LoRA of ``lora_dir`` (a :func:`save_lora` folder: a run's --output_dir or a checkpoint) as a
    PEFT adapter, ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names, in ``dest``
    (default ``lora_dir/peft``): ``PeftModel.from_pretrained(unet, dest)`` loads it. The same tensors as the
    diffusers file, whose header supplies the config; ``base_model`` goes to ``base_model_name_or_path``."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    lora_dir = Path(lora_dir)
    meta = read_lora_metadata(lora_dir)
    if meta is None:
        raise UserError(f"{lora_dir / LORA_WEIGHT_NAME} carries no adapter metadata (written before it was "
                        "recorded): its alpha is unknown, so it cannot be exported for PEFT")
    config = LoraConfig(**meta)
    config.base_model_name_or_path, config.inference_mode = base_model, True
    sd, _ = StableDiffusionXLPipeline.lora_state_dict(str(lora_dir))
    # A PeftModel wraps the UNet as base_model.model; its files omit the adapter name.
    weights = {"base_model.model." + k[len("unet."):]: v.contiguous() for k, v in sd.items() if k.startswith("unet.")}
    dest = Path(dest) if dest is not None else lora_dir / PEFT_SUBFOLDER
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dest))
    save_file(weights, str(dest / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return dest


def atomic_dir(final: str | Path):
    """Context manager: write into ``final + '.tmp'``, flush it to disk, then rename it into place: ``final`` is
    either absent, the old complete folder or the new complete folder, never a half-written one, even after a
    kill or a power loss (an old ``final`` is moved aside before the rename and removed after). A write that
    fails removes the partial ``.tmp`` folder."""

    @contextlib.contextmanager
    def cm():
        final_p = Path(final)
        tmp = final_p.with_name(final_p.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            for root, _, files in os.walk(tmp):
                for f in files:
                    _fsync(os.path.join(root, f))
                _fsync(root, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final_p.with_name(final_p.name + ".old")
        if final_p.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_p, old)
        os.replace(tmp, final_p)
        _fsync(final_p.parent, directory=True)
        shutil.rmtree(old, ignore_errors=True)

    return cm()
