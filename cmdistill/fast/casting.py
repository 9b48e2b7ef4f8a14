"""PEFT's copy of every LoRA input to the adapters' dtype, skipped where it changes nothing (docs/method.md §11)."""

from __future__ import annotations

import torch


def set_lora_input_casting(unet, enabled: bool) -> int:
    """PEFT copies the input of every LoRA layer to the adapter's dtype before the adapter runs (with
    fp32 adapters on bf16/fp16 weights: every activation is copied to fp32, in the forward, in the
    recomputation and in the backward). Under autocast the adapter's matmul or convolution runs in
    the autocast dtype either way, so with ``lora_dropout = 0`` switching the copy off gives the same
    values with less memory traffic (tests/test_speed.py). Only for models run under autocast.
    Returns the number of LoRA layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = enabled
    return len(layers)


def skip_lora_input_casting(unet, lora_dropout: float) -> bool:
    """``fast.build``: the copy switched off where it gives the same values: frozen weights in 16 bits (the
    trainer's mixed precision, so every adapter forward runs under autocast) and no LoRA dropout (which would
    act on the copy). Returns whether it was switched off."""
    frozen = next((p.dtype for p in unet.parameters() if not p.requires_grad), torch.float32)
    if frozen == torch.float32 or lora_dropout != 0:
        return False
    set_lora_input_casting(unet, False)
    return True
