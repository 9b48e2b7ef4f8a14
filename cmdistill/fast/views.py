"""Views of the student's UNet that share its weights: the teacher (``base_view``: the UNet without its adapter
layers) and the CM target on merged weights (``MergedAdapters``)."""

from __future__ import annotations

import copy
import math
import types

import torch

from ..errors import UserError
from .copies import to_device


def base_view(unet):
    """The UNet without its adapters, for the teacher's passes: a module tree in which every PEFT adapter layer
    is replaced by the layer it wraps, sharing every parameter and buffer with ``unet`` (no weight is
    copied; a change to the weights, in place or by ``.to()``, shows in both). Its forward is the
    adapter-disabled forward of ``unet`` (PEFT's ``disable_adapters()``), with no switch to flip per call and none of
    the adapter layers' modules and tensors for ``torch.compile`` to guard on at every call (SDXL: ~1,600
    fewer tensors; the compiled teacher's entry is mostly guards).

    Modules with no adapter below them are shared as they are; the others are shallow copies with their own
    child list (their parameter, buffer and hook dicts are the original's), their instance methods (e.g.
    accelerate's mixed-precision ``forward``) bound to the copy, and without the original's
    ``nn.Module.compile``d call (``compile_blocks(view)`` compiles the view's own). A forward wrapped by other
    means (offload hooks) is refused with a one-line error. Shared modules switch ``train()`` / ``eval()`` for
    both trees, the copies keep the mode they had when the view was built: the same values for SDXL's UNet,
    whose dropout has p = 0."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return _tree_view(unet, lambda m: m.get_base_layer() if isinstance(m, BaseTunerLayer) else None)


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
