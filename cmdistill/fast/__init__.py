"""The speed wing: everything that makes training fast without changing what it computes (docs/method.md §11).

The science modules (schedule, solvers, guidance, sampling, objectives, noise, step) import nothing from here; the
trainer asks ``build`` for its eps functions and does not know how they were made fast.

* ``compile``: ``torch.compile`` of the UNet or its blocks, channels_last group norms;
* ``casting``: PEFT's fp32 copy of every LoRA input skipped under autocast;
* ``views``: the teacher as a view of the student's UNet without its adapters, the CM target on merged weights;
* ``checkpointing``: selective activation checkpointing sized to a memory budget;
* ``copies``: host-to-device copies without a host sync (injected into the science as ``copy=``);
* ``lookahead``: teacher work of the next batches issued ahead (trajectory pool, CM lookahead), and
  ``target_source``, the choice of a run's target source;
* ``cfg``: the choice between batched and separate guidance passes;
* ``plan``: ``--compile off|on|auto``, the compiled set of each objective and whether it repays its compile time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..guidance import UNetEps
from . import checkpointing, plan
from .casting import set_lora_input_casting, skip_lora_input_casting
from .cfg import AdaptiveCFG
from .compile import (BLOCK_TYPES, COMPILE_MODES, RECOMPILE_LIMIT, ChannelwiseGroupNorm, DynamicBatch,
                      channelwise_norms, compile_blocks, compile_unet)
from .copies import to_device
from .lookahead import LookaheadCMTargets, PooledTargets, TrajectoryPool, target_source
from .views import MergedAdapters, base_view

__all__ = ["AdaptiveCFG", "BLOCK_TYPES", "COMPILE_MODES", "ChannelwiseGroupNorm", "DynamicBatch", "Fast",
           "LookaheadCMTargets", "MergedAdapters", "PooledTargets", "RECOMPILE_LIMIT", "TrajectoryPool", "base_view",
           "build", "channelwise_norms", "checkpointing", "plan", "compile_blocks", "compile_unet",
           "set_lora_input_casting", "skip_lora_input_casting", "target_source", "to_device"]


@dataclass
class Fast:
    """What ``build`` made: the eps functions of the training step and the modules behind them."""

    teacher_eps: Callable        # the guided teacher (no grad): eps_fn(x, t, cond)
    target_eps: Callable         # the student under no grad, for the CM target
    student_eps: Callable        # the student with grad (the module that the optimizer updates)
    teacher_unet: object         # the module behind teacher_eps (a view of the student's UNet, maybe compiled)
    target_unet: object          # the module behind target_eps
    merged: MergedAdapters | None = None  # --merged_target: refreshed at the first target pass of each optimizer step


def build(unet, base_unet, args, objective: str = "cm", optimizer_step: Callable[[], int] = lambda: None) -> Fast:
    """The training step's eps functions for the student ``unet`` (as the optimizer sees it, e.g. wrapped for DDP)
    and ``base_unet`` (the unwrapped module), made fast as ``args`` asks (``--compile_teacher``,
    ``--compile_blocks``, ``--teacher_freezing``, ``--teacher_channels_last``, ``--merged_target``,
    ``--teacher_max_batch``; under mixed precision without ``--lora_dropout``, no fp32 copy of the LoRA inputs).
    ``optimizer_step()`` is the trainer's optimizer step: the merged CM target is refreshed
    once per step. ``objective``: CM calls its teacher with the whole batch, Direct CM with the shrinking active
    sets of its trajectories. The same function as the plain UNet passes, to kernel rounding (tests/test_speed.py)."""
    compiled = bool(args.compile_teacher)
    # Every adapter forward of a 16-bit UNet runs under autocast: skip PEFT's copy of each input to fp32 (same values).
    skip_lora_input_casting(base_unet, args.lora_dropout)
    # The teacher: the same frozen weights seen without the adapter layers (no switch to flip per call).
    teacher_view = base_view(base_unet)
    # Regional compilation: every pass through the UNet runs compiled blocks, with static shapes where a tree is
    # only called with the batch size (the student; CM's teacher and merged target), else dynamic after a change.
    if args.compile_blocks:
        compile_blocks(base_unet, static=True)
        if not compiled:
            compile_blocks(teacher_view, static=objective == "cm")
    channels_last = getattr(args, "teacher_channels_last", False)
    teacher_unet = (compile_unet(teacher_view, mode=args.compile_mode, freezing=getattr(args, "teacher_freezing", False),
                                 channels_last=channels_last) if compiled else teacher_view)
    # --merged_target: the CM target pass on weight copies with the LoRA update folded in (refreshed once per
    # optimizer step, at its first target pass), compiled whole with --compile_teacher (default mode).
    merged = MergedAdapters(base_unet) if getattr(args, "merged_target", False) else None
    if merged is not None and args.compile_blocks and not compiled:
        compile_blocks(merged.tree, static=True)
    target_unet = (base_unet if merged is None else
                   compile_unet(merged.tree, channels_last=channels_last) if compiled else merged.tree)
    # A compiled whole UNet (teacher, merged target) is called with a symbolic batch dimension (DynamicBatch).
    target = UNetEps(DynamicBatch(target_unet) if compiled and merged is not None else target_unet, copy=to_device)
    if merged is not None:  # the adapter weights change at every optimizer step (and on resume)
        target = merged.refreshing(target, step=optimizer_step)
    # Conditional + unconditional passes as one call where the call is small (<= half the batch).
    threshold = (args.teacher_max_batch or args.train_batch_size) // 2
    teacher = AdaptiveCFG(UNetEps(DynamicBatch(teacher_unet) if compiled else teacher_unet, copy=to_device),
                          args.w, threshold)
    return Fast(teacher_eps=teacher, target_eps=target, student_eps=UNetEps(unet, copy=to_device),
                teacher_unet=teacher_unet, target_unet=target_unet, merged=merged)
