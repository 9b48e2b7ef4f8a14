"""One training step: the loss of one prepared batch given a target source (docs/method.md §6, §7).

``distill_loss`` computes ``distance(f_theta(x, t), target)`` and never branches on the objective: the target
source, chosen once at setup, says where the targets come from:

* ``ObjectiveTargets``: the objective of ``objectives.OBJECTIVES`` (CM or Direct CM) on the batch itself;
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

from .objectives import DistillContext, distance
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
