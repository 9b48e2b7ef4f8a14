"""The two distillation objectives (docs/method.md §6), one signature: ``target(ctx, x_t, start_index, cond)``.

The training loop computes ``pred = f_theta(x_t, t_n)`` and ``loss = distance(pred, target)`` and
never branches on which objective it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import consistency_fn
from .schedule import Grid, NoiseSchedule
from .solvers import solve_to_zero


@dataclass
class DistillContext:
    """What an objective may use: the guided teacher, the student under no_grad, solver and grid."""

    teacher_eps: Callable          # guided teacher eps_fn (adapter disabled, no grad)
    student_eps_nograd: Callable   # student eps_fn under no_grad (the CM target network, docs/method.md §6)
    step: Callable                 # solver step (solvers.SOLVERS)
    sched: NoiseSchedule
    grid: Grid
    timestep_scaling: float = 10.0
    max_batch: int | None = None


@torch.no_grad()
def cm_target(ctx: DistillContext, x_t: torch.Tensor, start_index: torch.Tensor, cond: dict) -> torch.Tensor:
    """CM: one teacher step t_n -> t_n - k, then the student's own consistency function there
    (no EMA, no separate target network; f(x, 0) = x at the last interval)."""
    return cm_target_from(ctx, *cm_teacher_step(ctx, x_t, start_index, cond), cond)


@torch.no_grad()
def cm_teacher_step(ctx: DistillContext, x_t: torch.Tensor, start_index: torch.Tensor, cond: dict):
    """The teacher's part of the CM target: (x_s, s) one solver step below t_n. The teacher is frozen, so this
    does not depend on the student's preceding update and may run before it."""
    t = ctx.grid.timestep(start_index)
    s = t - ctx.grid.k
    return ctx.step(ctx.teacher_eps, x_t.float(), t, s, cond, ctx.sched), s


@torch.no_grad()
def cm_target_from(ctx: DistillContext, x_s: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
    """The student's part of the CM target: its consistency function at (x_s, s), no grad."""
    return consistency_fn(ctx.student_eps_nograd, x_s, s, cond, ctx.sched, ctx.timestep_scaling)


@torch.no_grad()
def direct_cm_target(ctx: DistillContext, x_t: torch.Tensor, start_index: torch.Tensor, cond: dict) -> torch.Tensor:
    """Direct CM: the teacher solves from t_n all the way to 0; the target is the solver's final x."""
    return solve_to_zero(ctx.step, ctx.teacher_eps, x_t, start_index, cond, ctx.sched, ctx.grid,
                         max_batch=ctx.max_batch)


OBJECTIVES = {"cm": cm_target, "direct_cm": direct_cm_target}


def distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """Mean squared error (paper) or pseudo-Huber sqrt(d^2 + c^2) - c, averaged (docs/method.md §6)."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return torch.mean((pred - target) ** 2)
    if loss_type == "huber":
        return torch.mean(torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    from .errors import UserError

    raise UserError(f"--loss_type {loss_type!r}: choose 'l2' or 'huber'")
