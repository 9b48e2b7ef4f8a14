"""Selective activation checkpointing of the student UNet, sized to a memory budget.

Full gradient checkpointing (diffusers' ``enable_gradient_checkpointing``) stores only each block's input
and recomputes every ResNet and transformer block in the backward pass: about one extra forward per step.
Storing all activations does not fit (batch 16 at 1024 px needs more than 80 GB). In between, the blocks
whose recomputation costs the most per byte they would keep can be left un-checkpointed until a budget of
extra activation memory is used up (``--checkpointing_budget_gib``); the gradients are the same.

Costs come from a dry run of the same UNet on the meta device (no memory, no compute) at the training
batch and resolution: the bytes autograd saves inside each checkpointable block, and its FLOPs.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger("cmdistill")


@dataclass(frozen=True)
class BlockCost:
    name: str          # module name in the UNet (e.g. "down_blocks.2.attentions.0.transformer_blocks.3")
    saved_bytes: int   # bytes autograd keeps for its backward when the block is not checkpointed
    flops: float       # its forward FLOPs (what checkpointing recomputes)


class SelectiveCheckpointing:
    """diffusers' ``gradient_checkpointing_func``: blocks in ``keep`` run as they are (their activations
    stay in memory), every other block through ``torch.utils.checkpoint`` (non-reentrant)."""

    def __init__(self, keep=()):
        self.keep = set(keep)

    def __call__(self, module, *args):
        if module in self.keep:
            return module(*args)
        return checkpoint(module.__call__, *args, use_reentrant=False)


def block_costs(unet, batch: int, height: int, width: int, flash_attention: bool = True) -> list[BlockCost]:
    """Dry run of a copy of ``unet`` on the meta device (same config, same adapter, same dtypes) at
    ``batch`` x latent ``height`` x ``width``: per checkpointable block (in forward order), the bytes autograd
    saves inside it and its FLOPs. Adapter weights are taken at the frozen weights' dtype, as they run
    under autocast. ``flash_attention``: attention as torch runs it on a GPU and, for float32, on a CPU
    (flash SDPA keeps its output and log-sum-exp); False: SDPA's math path, which keeps the attention
    probabilities (what the meta device would otherwise trace)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    frozen = next(p for p in unet.parameters() if not p.requires_grad).dtype
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(cfg)
    for name, peft_config in getattr(unet, "peft_config", {}).items():  # the same adapter(s), dropout included
        twin.add_adapter(copy.deepcopy(peft_config), adapter_name=name)
    twin.to(frozen)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    for n, p in twin.named_parameters():
        p.requires_grad_(n in trainable)
    twin.train()
    names = {m: n for n, m in twin.named_modules()}
    costs: list[BlockCost] = []
    counter = FlopCounterMode(display=False)

    def measure(module, *args):
        seen: dict = {}  # one entry per storage (views share one); the storage is kept alive while counting

        def pack(t):
            storage = t.untyped_storage()
            seen.setdefault(storage._cdata, storage)
            return t

        before = counter.get_total_flops()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*args)
        saved = sum(st.nbytes() for st in seen.values())
        costs.append(BlockCost(names[module], int(saved), float(counter.get_total_flops() - before)))
        return out

    twin.enable_gradient_checkpointing(gradient_checkpointing_func=measure)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    kw = dict(device="meta", dtype=frozen)
    x = torch.empty(batch, cfg.in_channels, height, width, **kw)
    added = {"text_embeds": torch.empty(batch, text_dim, **kw), "time_ids": torch.empty(batch, 6, **kw)}
    emb = torch.empty(batch, 77, cfg.cross_attention_dim, **kw)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                  scale=scale)[0]

    try:
        if flash_attention:  # what a GPU's SDPA saves (output + logsumexp), not the math path's probabilities
            torch.nn.functional.scaled_dot_product_attention = flash
        with counter, torch.enable_grad():
            twin(x, torch.zeros(batch, device="meta", dtype=torch.long), encoder_hidden_states=emb,
                 added_cond_kwargs=added, return_dict=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return costs


def plan(costs: list[BlockCost], budget_bytes: float) -> list[str]:
    """The blocks to keep un-checkpointed: highest recomputed FLOPs per saved byte first, while the
    saved bytes fit in ``budget_bytes``."""
    chosen, used = [], 0
    for c in sorted(costs, key=lambda c: c.flops / max(c.saved_bytes, 1), reverse=True):
        if used + c.saved_bytes <= budget_bytes:
            chosen.append(c.name)
            used += c.saved_bytes
    return chosen


def enable(unet, budget_gib: float | None, batch: int, height: int, width: int) -> dict:
    """Gradient checkpointing of ``unet`` with ``budget_gib`` GiB of activations kept (None or 0: every
    block checkpointed, as ``enable_gradient_checkpointing()``). Returns a summary for the run config."""
    if not budget_gib:
        unet.enable_gradient_checkpointing()
        return {"kept_blocks": 0}
    costs = block_costs(unet, batch, height, width)
    keep = set(plan(costs, budget_gib * 2**30))
    modules = dict(unet.named_modules())
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=SelectiveCheckpointing(modules[n] for n in keep))
    kept = [c for c in costs if c.name in keep]
    total_flops = sum(c.flops for c in costs) or 1.0
    return {"kept_blocks": len(kept), "blocks": len(costs),
            "kept_gib": sum(c.saved_bytes for c in kept) / 2**30,
            "recompute_avoided": sum(c.flops for c in kept) / total_flops}


def describe(info: dict) -> str:
    """One line on what ``enable`` chose (a budget > 0)."""
    return (f"selective checkpointing: {info['kept_blocks']} of {info['blocks']} blocks keep their activations "
            f"({info['kept_gib']:.1f} GiB estimated), {100 * info['recompute_avoided']:.0f}% of the recomputation "
            "avoided")


# OVERSHOOT: the step's peak rises by more than the estimated bytes kept (the dry run does not count autocast's
# fp32 copies), until calibrated_budget_gib replaces it with the run's own measurement; HEADROOM: a margin of the
# card's memory is left free.
OVERSHOOT, HEADROOM = 1.4, 0.9


def auto_budget_gib(peak_bytes: int, total_bytes: int) -> float:
    """``--checkpointing_budget_gib auto``: the budget that the memory left after a fully checkpointed
    step's peak allows: (HEADROOM x card memory - peak) / OVERSHOOT, in GiB, at least 0."""
    return max(0.0, (HEADROOM * total_bytes - peak_bytes) / OVERSHOOT) / 2**30


MIN_RATIO = 0.5  # a floor on the measured cost per estimated byte (calibrated_budget_gib)


def measured_ratio(peak0: int, peak1: int, kept_estimate_gib: float) -> float | None:
    """Bytes the kept activations really took per byte the dry run estimated: the peak's rise from the fully
    checkpointed step (peak0) to the first step with the plan (peak1). None when there is nothing to measure."""
    kept = kept_estimate_gib * 2**30
    if kept <= 0 or peak1 <= peak0:
        return None
    return (peak1 - peak0) / kept


def calibrated_budget_gib(peak0: int, peak1: int, kept_estimate_gib: float, total_bytes: int) -> float | None:
    """``--checkpointing_budget_gib auto``, second sizing: the budget that fills the same headroom as
    ``auto_budget_gib`` at the measured cost per estimated byte instead of the assumed OVERSHOOT (compiled
    blocks keep less than the eager estimate, eager blocks more). None: nothing to measure."""
    ratio = measured_ratio(peak0, peak1, kept_estimate_gib)
    if ratio is None:
        return None
    return max(0.0, (HEADROOM * total_bytes - peak0) / max(ratio, MIN_RATIO)) / 2**30


def size_auto(info: dict, device, replan: Callable[[float], dict]) -> dict:
    """``--checkpointing_budget_gib auto``, called after each step until ``info`` is "calibrated"; returns the new
    plan's info (``replan(budget)`` re-plans the UNet and returns its info). After the first (fully checkpointed)
    step: keep as many activations as the memory left on the card allows, assuming they cost OVERSHOOT x the dry
    run's estimate (``auto_budget_gib``). After the second step, the first with that plan: re-size once at the cost
    per estimated byte measured from the rise of the peak (``calibrated_budget_gib``), when that keeps >10% more or
    the peak passed the headroom. Without CUDA every block stays checkpointed."""
    device = torch.device(device)
    if device.type != "cuda":
        logger.info("--checkpointing_budget_gib auto: no CUDA device, every block stays checkpointed")
        info = replan(0.0)
        info.update(auto_budget_gib=0.0, first_step_peak_gib=None, calibrated=False)
    elif "auto_budget_gib" not in info:
        total, peak = torch.cuda.get_device_properties(device).total_memory, torch.cuda.max_memory_allocated(device)
        budget = auto_budget_gib(peak, total)
        logger.info("--checkpointing_budget_gib auto: first step peaked at %.1f GiB; budget %.1f GiB",
                    peak / 2**30, budget)
        info = replan(budget)
        info.update(auto_budget_gib=budget, first_step_peak_gib=peak / 2**30)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        total, peak = torch.cuda.get_device_properties(device).total_memory, torch.cuda.max_memory_allocated(device)
        peak0, first = info["first_step_peak_gib"] * 2**30, info["auto_budget_gib"]
        ratio = measured_ratio(peak0, peak, info.get("kept_gib", 0.0))
        budget = calibrated_budget_gib(peak0, peak, info.get("kept_gib", 0.0), total)
        if budget is not None and (budget > 1.1 * first or peak > HEADROOM * total):
            logger.info("--checkpointing_budget_gib auto: the plan's step peaked at %.1f GiB, %.2f x the "
                        "estimate; budget %.1f -> %.1f GiB", peak / 2**30, ratio, first, budget)
            info = replan(budget)
            info.update(auto_budget_gib=budget, first_plan_budget_gib=first, first_step_peak_gib=peak0 / 2**30)
        info.update(calibrated=True, measured_ratio=ratio, second_step_peak_gib=peak / 2**30)
    return info


class StudentCheckpointing:
    """The student UNet's checkpointing for a run, from the flags: every block checkpointed
    (``--gradient_checkpointing``), or the blocks that are dearest to recompute per byte kept un-checkpointed within
    ``--checkpointing_budget_gib`` GiB of activations (``enable``), at the training batch and resolution (latents
    ``vae_scale_factor`` times smaller); neither flag: none. ``--checkpointing_budget_gib auto``: every block
    checkpointed for the first step, then sized from its peak and once more from the second's (``size_auto``, through
    ``after_step``). ``info``: the summary for the run config."""

    def __init__(self, unet, args, vae_scale_factor: int):
        self.unet, self.side = unet, args.resolution // vae_scale_factor
        self.batch = args.train_batch_size
        self.auto = args.checkpointing_budget_gib == "auto"
        self.info: dict = {}
        if args.gradient_checkpointing or args.checkpointing_budget_gib is not None:
            self.set(0 if self.auto else args.checkpointing_budget_gib)

    def set(self, budget_gib) -> dict:
        """Re-plan ``unet`` for ``budget_gib`` GiB of kept activations; returns (and keeps) the plan's info."""
        self.info = enable(self.unet, budget_gib, self.batch, self.side, self.side)
        if budget_gib:
            logger.info(describe(self.info))
        return self.info

    def after_step(self, device) -> bool:
        """``--checkpointing_budget_gib auto``, called after every step: re-sized after the first and the second
        step (``size_auto``) on ``device``. Returns whether ``info`` changed (the run config to write again)."""
        if not self.auto or "calibrated" in self.info:
            return False
        self.info = size_auto(self.info, device, self.set)
        return True
