"""Deterministic per-sample noise (docs/method.md §8.3): the noise of caption i is a pure function of (seed, i),
whatever the batch size, the number of processes or a restart."""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch


def _seed_of(*parts: int) -> int:
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``parts`` (e.g. (seed, caption index) or (seed, step, rank))."""
    return torch.Generator("cpu").manual_seed(_seed_of(*parts))


def per_sample_noise(seed: int, indices, shape: tuple[int, ...], stream: int = 0) -> torch.Tensor:
    """Stack of N(0, I) tensors of ``shape``, row j drawn from the generator of (seed, stream, indices[j]).

    ``stream`` separates independent uses (0: initial noise x_T; 1, 2, ...: the fresh noise of
    multistep sampling steps)."""
    return torch.stack([torch.randn(shape, generator=generator_for(seed, stream, int(i))) for i in indices])


class Stream(IntEnum):
    """The noise streams of the training step (``per_sample_noise(..., stream=)``, ``generator_for(seed, stream,
    position)``): each random draw of a sample has its own, apart from the sampler's streams 0, 1, 2, ..."""

    TIMESTEP = 101  # the start grid index n
    NOISE = 102     # the noise that takes the latents to t_n
    VAE = 103       # the VAE posterior sample
