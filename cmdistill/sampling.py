"""The consistency function (docs/method.md §5) and the two samplers of the evaluation (docs/method.md §8).

The teacher reference sampler IS the Direct CM target code (``solvers.solve_to_zero`` from grid
index 0); the student sampler is LCM-style multistep consistency sampling on the N-grid.
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import Grid, NoiseSchedule, boundary_scalings
from .solvers import solve_to_zero


def consistency_fn(eps_fn, x: torch.Tensor, t, cond: dict, sched: NoiseSchedule,
                   timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t), x0_hat from the student's eps as in DDIM (docs/method.md §5)."""
    x = x.float()
    eps = eps_fn(x, t, cond)
    c_skip, c_out = boundary_scalings(t, x, timestep_scaling, sigma_data, sched.copy)
    return c_skip * x + c_out * sched.x0_from_eps(x, eps, t)


def teacher_sample(step, guided_eps, x_T: torch.Tensor, cond: dict, sched: NoiseSchedule, grid: Grid,
                   max_batch: int | None = None, callback=None) -> torch.Tensor:
    """Deterministic teacher ODE sampling from pure noise at t = T down to 0 (docs/method.md §8)."""
    start = torch.zeros(x_T.shape[0], dtype=torch.long)
    return solve_to_zero(step, guided_eps, x_T, start, cond, sched, grid, max_batch=max_batch, callback=callback)


def student_sample(student_eps, x_T: torch.Tensor, cond: dict, sched: NoiseSchedule, grid: Grid, K: int,
                   fresh_noise: Callable[[int], torch.Tensor] | None = None, timestep_scaling: float = 10.0,
                   return_all: bool = False):
    """Multistep consistency sampling (docs/method.md §8), guidance scale 0.

    At each sampling timestep x0 = f(x, t); if a step follows, x = alpha_s x0 + sigma_s z with
    fresh noise z = ``fresh_noise(j)`` for the j-th renoising (per-sample deterministic noise when
    the caller derives it from caption indices). Returns the final x0 (and all x0's if asked).
    """
    timesteps = grid.sampling_timesteps(K)
    x = x_T.float()
    outs = []
    for j, t in enumerate(timesteps):
        x0 = consistency_fn(student_eps, x, torch.full((x.shape[0],), t), cond, sched, timestep_scaling)
        outs.append(x0)
        if j + 1 < len(timesteps):
            s = timesteps[j + 1]
            z = fresh_noise(j) if fresh_noise is not None else torch.randn_like(x0)
            x = sched.add_noise(x0, sched.copy(z, x0.device), torch.full((x.shape[0],), s))
    return (x0, outs) if return_all else x0
