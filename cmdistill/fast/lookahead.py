"""Teacher work issued ahead of the step that needs it (``--teacher_lookahead K``): the teacher is frozen, so the
targets of the next K batches do not depend on this step's student update (docs/method.md §11).

* Direct CM: ``TrajectoryPool`` solves the trajectories of consecutive batches together, filling the room that a
  batch's shrinking active set leaves; ``PooledTargets`` is its target source for ``cmdistill.step``.
* CM: ``LookaheadCMTargets`` issues each batch's teacher step when the batch is prepared, on the current stream,
  so that the CPU gets ahead of the GPU; the student's part of the target runs at the step itself.

Both give the targets of ``objectives.OBJECTIVES`` (the same solver steps; tests/test_speed.py). ``target_source``
chooses a run's target source once, at setup: one of these, or one of ``cmdistill.step``'s.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..objectives import OBJECTIVES, DistillContext, cm_target_from, cm_teacher_step
from ..schedule import Grid, NoiseSchedule
from ..solvers import EpsFn, index_cond
from ..step import ObjectiveTargets
from .copies import to_device


def target_source(objective: str, ctx: DistillContext, *, lookahead: int = 0, capacity: int = 1,
                  autocast: Callable = contextlib.nullcontext):
    """The target source of a run, chosen once: the objective with its teacher work issued ``lookahead`` batches
    ahead (Direct CM: a trajectory pool of ``capacity`` samples per call), or the objective."""
    if lookahead and objective == "direct_cm":
        return PooledTargets(ctx, capacity, lookahead)
    if lookahead:
        return LookaheadCMTargets(ctx, lookahead, autocast)
    return ObjectiveTargets(OBJECTIVES[objective], ctx)


class PooledTargets:
    """Target source (``cmdistill.step``): Direct CM targets through a ``TrajectoryPool`` of ``capacity``."""

    def __init__(self, ctx: DistillContext, capacity: int, ahead: int, callback: Callable | None = None):
        self.pool = TrajectoryPool(ctx.step, ctx.teacher_eps, ctx.sched, ctx.grid, capacity, callback)
        self.ahead = ahead

    def submit(self, prep: dict) -> None:
        self.pool.submit(prep["key"], prep["x_t"], prep["start"], prep["cond"])

    @torch.no_grad()
    def __call__(self, prep: dict):
        return prep["x_t"], prep["t"], prep["cond"], self.pool.result(prep["key"])


class LookaheadCMTargets:
    """Target source (``cmdistill.step``): CM targets whose teacher step was issued when the batch was prepared
    (under ``autocast``), the student's consistency function at the step itself."""

    def __init__(self, ctx: DistillContext, ahead: int, autocast: Callable):
        self.ctx, self.ahead, self.autocast = ctx, ahead, autocast

    def submit(self, prep: dict) -> None:
        with self.autocast():
            prep["teacher_step"] = cm_teacher_step(self.ctx, prep["x_t"], prep["start"], prep["cond"])

    def __call__(self, prep: dict):
        x_s, s = prep.pop("teacher_step")
        return prep["x_t"], prep["t"], prep["cond"], cm_target_from(self.ctx, x_s, s, prep["cond"])


class TrajectoryPool:
    """Direct CM targets of consecutive batches solved together (``--teacher_lookahead``, docs/method.md §11).

    ``solve_to_zero`` runs one batch's trajectories; sample i needs N - n_i steps, so the batch needs as
    many teacher calls as its longest trajectory (~95 of N = 100 at batch 16) while its samples need only
    ~808 sample-steps: half the calls run on a shrinking active set, below the card's full batch. The
    teacher is frozen, so the trajectories of the next batches do not depend on this step's student:
    here the batches are ``submit``-ted ahead and every call takes the oldest batch's active samples plus,
    in the room left up to ``capacity``, samples of the following batches (longest remaining first), each
    at its own timestep. ``result(key)`` runs calls until that batch is done. Each sample goes through the
    same solver steps as in ``solve_to_zero``, so the targets are the same up to the rounding that the
    batch's composition brings (tests/test_math.py); in the steady state every call is full (~50.5 calls of
    16 per batch instead of ~95 calls of 8.5 on average).
    """

    def __init__(self, step, eps_fn: EpsFn, sched: NoiseSchedule, grid: Grid, capacity: int,
                 callback: Callable | None = None):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.step, self.eps_fn, self.sched, self.grid = step, eps_fn, sched, grid
        self.capacity, self.callback = capacity, callback
        self.batches: dict = {}  # key -> [x (float32), n (CPU long), cond], in submission order

    def __len__(self) -> int:
        return len(self.batches)

    def submit(self, key, x: torch.Tensor, start_index: torch.Tensor, cond: dict) -> None:
        if key in self.batches:
            raise KeyError(f"batch {key!r} is already in the pool")
        n = torch.as_tensor(start_index, device="cpu").long().clone()
        self.batches[key] = [x.float().clone(), n, dict(cond)]

    def result(self, key) -> torch.Tensor:
        """Solve until batch ``key`` (the oldest in the pool) has reached 0; returns its x_0 and drops it."""
        if next(iter(self.batches), None) != key:
            raise KeyError(f"batch {key!r} is not the oldest batch in the pool")
        head = self.batches[key]
        while bool((head[1] < self.grid.N).any()):
            self._call()
        return self.batches.pop(key)[0]

    def _call(self) -> None:
        """One solver step on up to ``capacity`` samples: the oldest batch's first, then the others' in
        submission order, longest remaining trajectory first."""
        N, room, parts = self.grid.N, self.capacity, []
        for entry in self.batches.values():
            active = torch.nonzero(entry[1] < N).flatten()
            if active.numel() == 0:
                continue
            active = active[torch.argsort(entry[1][active], stable=True)][:room]  # smallest n: most steps left
            parts.append((entry, active, to_device(active, entry[0].device)))
            room -= active.numel()
            if room == 0:
                break
        x = torch.cat([e[0][dev_idx] for e, _, dev_idx in parts])
        n = torch.cat([e[1][idx] for e, idx, _ in parts])
        picked = [index_cond(e[2], idx, to_device) for e, idx, _ in parts]
        cond = {k: torch.cat([c[k] for c in picked]) for k in picked[0]}
        t = self.grid.timestep(n)
        x = self.step(self.eps_fn, x, t, t - self.grid.k, cond, self.sched)
        offset = 0
        for e, idx, dev_idx in parts:
            e[0][dev_idx] = x[offset:offset + idx.numel()]
            e[1][idx] += 1
            offset += idx.numel()
        if self.callback is not None:
            self.callback(offset)
