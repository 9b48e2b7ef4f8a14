"""The UNet as an epsilon function, and the teacher's classifier-free guidance (docs/method.md §3).

``cond`` dicts hold per-sample SDXL conditioning: ``prompt_embeds`` [B, 77, 2048],
``text_embeds`` (pooled, [B, 1280]) and ``time_ids`` [B, 6].
"""

from __future__ import annotations

import torch

from .schedule import host_to


class UNetEps:
    """``eps_fn(x, t, cond)`` for an SDXL UNet: casts the float32 state to the UNet's dtype and the
    prediction back to float32. ``t`` holds timestep values, passed to the UNet as they are (docs/method.md §2).
    ``unet`` is any callable with the UNet's signature. ``copy(t, device)`` copies the host timesteps to the UNet's
    device (``schedule.host_to`` by default; a caller may inject another copy function)."""

    def __init__(self, unet, dtype: torch.dtype | None = None, copy=host_to):
        self.unet = unet
        self.dtype = dtype
        self.copy = copy

    def __call__(self, x: torch.Tensor, t, cond: dict) -> torch.Tensor:
        dtype = self.dtype or cond["prompt_embeds"].dtype
        t = self.copy(torch.as_tensor(t).reshape(-1), x.device)
        if t.numel() == 1:
            t = t.expand(x.shape[0]).contiguous()
        x, emb = x.to(dtype), cond["prompt_embeds"].to(dtype)
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return self.unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0].float()


def unconditional(cond: dict) -> dict:
    """docs/method.md §3: the unconditional branch has ZERO prompt and pooled embeddings and the same time_ids
    (SDXL's ``force_zeros_for_empty_prompt``), not an encoded empty prompt."""
    return {"prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
            "text_embeds": torch.zeros_like(cond["text_embeds"]),
            "time_ids": cond["time_ids"]}


class GuidedEps:
    """Imagen-form CFG (docs/method.md §3): eps = eps_u + w (eps_c - eps_u).

    ``batched=False`` runs the conditional and unconditional passes separately (the reference);
    ``batched=True`` runs them as one call of batch 2B (the same values up to kernel rounding).
    w = 1 needs no unconditional pass and w = 0 no conditional one.
    """

    def __init__(self, eps_fn, w: float, batched: bool = False):
        self.eps_fn, self.w, self.batched = eps_fn, float(w), batched

    @staticmethod
    def passes(w: float) -> int:
        """Batches of ``eps_fn`` work per call at guidance scale ``w`` (one pass at w = 0 or 1, else two)."""
        return 1 if float(w) in (0.0, 1.0) else 2

    def __call__(self, x: torch.Tensor, t, cond: dict) -> torch.Tensor:
        if self.w == 1.0:
            return self.eps_fn(x, t, cond)
        if self.w == 0.0:
            return self.eps_fn(x, t, unconditional(cond))
        uncond = unconditional(cond)
        if self.batched:
            t2 = torch.as_tensor(t).reshape(-1)
            t2 = t2.expand(x.shape[0]) if t2.numel() == 1 else t2
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            eps_c, eps_u = self.eps_fn(torch.cat([x, x]), torch.cat([t2, t2]), both).chunk(2)
        else:
            eps_c = self.eps_fn(x, t, cond)
            eps_u = self.eps_fn(x, t, uncond)
        return eps_u + self.w * (eps_c - eps_u)
