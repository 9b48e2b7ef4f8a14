"""The toy sweep's time estimate (``cmdistill.toy.sweep``): seconds of one worker per program of a cell, for the
sweep's ``--time_limit_s`` and ``--dry_run``, calibrated by the cells that finished.

The costs: per training step, a student forward/backward with the optimizer step (``student``) and the teacher's
guided steps (``teacher_step`` each: one for CM, the solve to t = 0 for Direct CM, N/2 on average); per caption, a
sampling step (``sample``) and a decoded, saved and scored image (``image``); per program, its start in a warm
worker (``start``); the precompute once. CPU: fitted to the sweep's cells at budget 150 on the 2-core development
machine, one torch thread each (the measured seconds of every program of a cell are in its ``cell.json`` under
``docs/toy_study/cells``, the cells of docs/toy_study.md). CUDA: fitted to the cells that ran on an H100 with eight
workers sharing it (benchmarks/RESULTS.md, "The toy sweep on a GPU"): these 8x8-latent networks are bound by Python
and kernel launches, so one process gains far less over a CPU core than the GPU's size suggests; most of the gain is
the many workers side by side. The finished cells of a sweep scale the estimate of the rest (``calibration``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COSTS = {"cpu": {"student": 0.21, "teacher_step": 0.073, "sample": 0.00185, "image": 0.009, "start": 6.0,
                 "precompute": 35.0},
         "cuda": {"student": 0.15, "teacher_step": 0.033, "sample": 0.0002, "image": 0.001, "start": 10.0,
                  "precompute": 20.0}}


def train_estimate(cost: dict, cell) -> float:
    """Training of ``cell`` (its objective, budget and N)."""
    teacher = 1 if cell.objective == "cm" else cell.N / 2
    return cost["start"] + cell.budget * (cost["student"] + teacher * cost["teacher_step"])


def eval_estimate(cost: dict, a) -> float:
    """``test.py`` of a cell: ``a.num_prompts`` captions at each of ``a.num_inference_steps``."""
    return cost["start"] + a.num_prompts * (sum(a.num_inference_steps) * cost["sample"]
                                            + len(a.num_inference_steps) * cost["image"])


def teacher_estimate(cost: dict, a, N: int) -> float:
    """``test_teacher.py`` on the N-grid (guided: two passes a step)."""
    return cost["start"] + a.num_prompts * (2 * N * cost["sample"] + cost["image"])


def calibration(results: str | Path, kind: str) -> tuple[float, int]:
    """(measured / estimated seconds, count) of the finished cells in ``results`` (--results) that ran on ``kind``
    (a worker's seconds, as long as the workers running beside it made them), or (1, 0)."""
    measured = estimated = 0.0
    count = 0
    for path in (Path(results) / "cells").glob("*/cell.json"):
        try:
            info = json.loads(path.read_text())
            cell, secs = argparse.Namespace(**info["spec"]), info["seconds"]
            recipe = argparse.Namespace(**info["recipe"])
            if not str(info.get("device", "")).startswith(kind) or len(secs) < 2:  # a cell trained here and scored
                continue
            estimate = train_estimate(COSTS[kind], cell) + eval_estimate(COSTS[kind], recipe)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        measured += sum(secs.values())
        estimated += estimate
        count += 1
    return (measured / estimated, count) if estimated else (1.0, 0)
