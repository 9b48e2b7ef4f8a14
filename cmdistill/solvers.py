"""Teacher ODE solvers on the N-step grid (docs/method.md §4) and the solve-to-zero loops (docs/method.md §6, §8).

Every solver step has the same signature ``step(eps_fn, x, t, s, cond, sched) -> x_s``:
``eps_fn(x, t, cond)`` returns the (guided) teacher noise estimate in float32, ``t`` and ``s`` are
per-sample timestep values (LongTensor, shape [B]), ``cond`` is a dict of per-sample conditioning
tensors. The CM target, the Direct CM target and the teacher reference sampler all call these.
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import Grid, NoiseSchedule, host_to

EpsFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def index_cond(cond: dict, idx: torch.Tensor, copy=host_to) -> dict:
    """Select the rows ``idx`` (host indices, copied by ``copy``) of every per-sample conditioning tensor."""
    return {k: v[copy(idx, v.device)] for k, v in cond.items()}


def ddim_step(eps_fn: EpsFn, x, t, s, cond, sched: NoiseSchedule):
    """DDIM (docs/method.md §4): x0_hat = (x - sigma_t eps) / alpha_t; x_s = alpha_s x0_hat + sigma_s eps."""
    eps = eps_fn(x, t, cond)
    x0 = sched.x0_from_eps(x, eps, t)
    return sched.alpha(s, x) * x0 + sched.sigma(s, x) * eps


def _vp_drift(x, eps, beta, sigma):
    # Probability-flow drift of the VP SDE in time units of T: f = -beta/2 x + beta/(2 sigma) eps.
    return -0.5 * beta * x + 0.5 * (beta / sigma) * eps


def euler_step(eps_fn: EpsFn, x, t, s, cond, sched: NoiseSchedule):
    """Euler on the VP probability-flow ODE (docs/method.md §4): x_s = x + ((s - t) / T) f(x, t)."""
    eps = eps_fn(x, t, cond)
    f = _vp_drift(x, eps, sched.beta(t, x), sched.sigma(t, x))
    dt = sched.copy((torch.as_tensor(s) - torch.as_tensor(t)).float(), x.device).view(-1, *([1] * (x.ndim - 1)))
    return x + (dt / sched.T) * f


def heun_step(eps_fn: EpsFn, x, t, s, cond, sched: NoiseSchedule):
    """Heun (docs/method.md §4): Euler predictor, then the trapezoid of the drifts at t and at the predictor.

    At s = 0 the reference substitutes beta and sigma of index 0 (timestep value 1) into the
    corrector's drift to avoid dividing by sigma_0 = 0; the teacher is still evaluated at s = 0.
    """
    eps = eps_fn(x, t, cond)
    f = _vp_drift(x, eps, sched.beta(t, x), sched.sigma(t, x))
    dt = sched.copy((torch.as_tensor(s) - torch.as_tensor(t)).float(), x.device).view(-1, *([1] * (x.ndim - 1)))
    x_pred = x + (dt / sched.T) * f
    eps_s = eps_fn(x_pred, s, cond)
    s_coef = torch.where(torch.as_tensor(s).reshape(-1) == 0, 1, torch.as_tensor(s).reshape(-1))
    f_s = _vp_drift(x_pred, eps_s, sched.beta(s_coef, x), sched.sigma(s_coef, x))
    return x + 0.5 * (dt / sched.T) * (f + f_s)


SOLVERS = {"ddim": ddim_step, "euler": euler_step, "heun": heun_step}
EVALUATIONS = {"ddim": 1, "euler": 1, "heun": 2}  # eps_fn calls per step


def get_solver(name: str):
    from .errors import UserError

    try:
        return SOLVERS[name.lower()]
    except KeyError:
        raise UserError(f"unknown solver '{name}': choose one of {', '.join(SOLVERS)}") from None


def solve_to_zero(step, eps_fn: EpsFn, x: torch.Tensor, start_index: torch.Tensor, cond: dict,
                  sched: NoiseSchedule, grid: Grid, max_batch: int | None = None,
                  callback: Callable | None = None) -> torch.Tensor:
    """Solve the teacher ODE from grid index ``start_index[i]`` down to timestep 0, per sample.

    Deliberate improvement over the reference (docs/method.md §6): the reference loops from the batch's
    noisiest start to 0 over the whole batch and freezes samples that have not started yet; here
    every sample starts at once from its own timestep, so sample i costs exactly N - n_i steps and
    the active set shrinks as samples reach 0. The per-sample trajectories, hence the targets, are
    the same (``solve_to_zero_reference`` keeps the reference loop for tests and benchmarks).
    The state is float32 between steps whatever the UNet's dtype. ``max_batch`` bounds the
    number of samples passed to one solver step.
    """
    x = x.float().clone()
    n = torch.as_tensor(start_index, device="cpu").long().clone()
    while True:
        active = torch.nonzero(n < grid.N).flatten()
        if active.numel() == 0:
            return x
        chunks = [active] if not max_batch else list(active.split(max_batch))
        for idx in chunks:
            t = grid.timestep(n[idx])
            dev_idx = sched.copy(idx, x.device)
            x[dev_idx] = step(eps_fn, x[dev_idx], t, t - grid.k, index_cond(cond, idx, sched.copy), sched)
        n[active] += 1
        if callback is not None:
            callback(int(active.numel()))


def solve_to_zero_reference(step, eps_fn: EpsFn, x: torch.Tensor, start_index: torch.Tensor, cond: dict,
                            sched: NoiseSchedule, grid: Grid) -> torch.Tensor:
    """The reference's masked full-batch loop (docs/method.md §6): from min(n) to N, every step on the whole
    batch at one shared timestep, samples that have not started yet kept frozen."""
    x = x.float().clone()
    start = torch.as_tensor(start_index, device="cpu").long()
    B = x.shape[0]
    for n in range(int(start.min()), grid.N):
        t = grid.timestep(torch.full((B,), n))
        x_new = step(eps_fn, x, t, t - grid.k, cond, sched)
        started = sched.copy(start <= n, x.device).view(-1, *([1] * (x.ndim - 1)))
        x = torch.where(started, x_new, x)
    return x
