"""One training step: the loss of one prepared batch given a target source (docs/method.md §6, §7).

``distill_loss`` computes ``distance(f_theta(x, t), target)`` and never branches on the objective: the target
source, chosen once at setup, says where the targets come from:

* ``ObjectiveTargets``: the objective of ``objectives.OBJECTIVES`` (CM or Direct CM) on the batch itself;
* ``TrajectoryPairTargets`` (``--trajectory_pairs K``, Direct CM, opt-in): K pairs per teacher trajectory;
* any other source with the members below that gives the same targets (the trainer picks one at setup).

A source has ``ahead`` (how many batches after the current one it wants to see), ``submit(prep)`` (called when a
batch is prepared, in order) and ``source(prep) -> (x, t, cond, target)`` (the student's inputs and their targets,
under no grad for the teacher's part). A prepared batch (``prep``) is a dict: ``x_t`` (float32 latents at their
start), ``t`` (timesteps), ``start`` (grid indices), ``cond`` (SDXL conditioning), ``positions`` (stream positions),
``key`` (its number in the run).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .noise import Stream, generator_for
from .objectives import DistillContext, direct_cm_trajectory_pairs, distance, extra_pair_indices
from .sampling import consistency_fn


@dataclass(frozen=True)
class LossConfig:
    """The settings of the loss: the boundary scalings' timestep scaling and the distance."""

    timestep_scaling: float = 10.0
    loss_type: str = "l2"
    huber_c: float = 0.001


def distill_loss(prep: dict, targets, student_eps: Callable, sched, cfg: LossConfig,
                 autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """The loss of one prepared batch: the targets (no grad) from ``targets``, then the student's consistency
    function with grad (under ``autocast``) and the distance. The caller runs the backward."""
    with autocast():
        x, t, cond, target = targets(prep)
        pred = consistency_fn(student_eps, x, t, cond, sched, cfg.timestep_scaling)
    return distance(pred, target, cfg.loss_type, cfg.huber_c)


class ObjectiveTargets:
    """The objective's targets (``objectives.OBJECTIVES``) of the batch itself."""

    ahead = 0

    def __init__(self, objective: Callable, ctx: DistillContext):
        self.objective, self.ctx = objective, ctx

    def submit(self, prep: dict) -> None:
        pass

    def __call__(self, prep: dict):
        return prep["x_t"], prep["t"], prep["cond"], self.objective(self.ctx, prep["x_t"], prep["start"], prep["cond"])


class TrajectoryPairTargets:
    """``--trajectory_pairs K`` (Direct CM): each sample's teacher trajectory gives its start pair and K-1 pairs at
    later grid points (drawn from (seed, stream position)), all with the trajectory's x_0: K x B student inputs."""

    ahead = 0

    def __init__(self, ctx: DistillContext, seed: int, K: int):
        self.ctx, self.seed, self.K = ctx, seed, K

    def submit(self, prep: dict) -> None:
        pass

    def __call__(self, prep: dict):
        ctx, K, N = self.ctx, self.K, self.ctx.grid.N
        x_t, t, start, cond = prep["x_t"], prep["t"], prep["start"], prep["cond"]
        extra = torch.stack([extra_pair_indices(int(n), N, generator_for(self.seed, Stream.PAIRS, p), K - 1)
                             for n, p in zip(start.tolist(), prep["positions"])])
        target, states = direct_cm_trajectory_pairs(ctx, x_t, start, cond, extra)
        x_all = torch.cat([x_t.float(), states.transpose(0, 1).reshape(-1, *x_t.shape[1:])])
        t_all = torch.cat([t, ctx.grid.timestep(extra.t().reshape(-1))])

        def tile(v):
            return v.repeat(K, *([1] * (v.ndim - 1)))

        return x_all, t_all, {k: tile(v) for k, v in cond.items()}, tile(target)

