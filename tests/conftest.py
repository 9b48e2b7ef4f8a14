"""Shared fixtures: offline, CPU-sized stand-ins for the SDXL teacher and the training data."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without an installed package
    sys.path.insert(0, str(ROOT))

# pytest-xdist (pyproject.toml: -n 2 --dist loadfile): each worker gets its share of the cores, for torch in the
# worker and for the programs the tests start (two OpenMP threads per process on a busy 2-core machine run these
# small networks far slower than one). An OMP_NUM_THREADS of the caller's is kept.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The slowest files first (measured on the 2-core CI machine): pytest-xdist hands whole files to the workers in
# this order (--no-loadscope-reorder), so that the long ones start at once and the short ones fill in at the end.
SLOW_FIRST = ("test_toy.py", "test_demo.py", "test_speed.py", "test_evaluation.py", "test_faults.py",
              "test_recipe.py", "test_bench.py", "test_train.py", "test_checkpointing.py", "test_precompute.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept

TINY_CAPTIONS = ["a red cat on a sofa", "a blue dog, sitting", 'a "quoted" oak tree', "mountains at dawn",
                 "a bowl of fruit"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a launcher's rendezvous: tests may run side by side, pytest-xdist)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """Folder of a random-weight SDXL-architecture pipeline (load it with ``models.load_teacher``)."""
    from cmdistill.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline")


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """An image folder like ``preprocessed_11k``: ``metadata.csv`` (file_name,text) and one small
    non-square JPEG per caption of ``TINY_CAPTIONS`` (commas and quotes included)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny_data") / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i, caption in enumerate(TINY_CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (72 + 8 * i, 80, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
            w.writerow([f"{i:03d}.jpg", caption])
    return folder


@contextlib.contextmanager
def logs():
    """The cmdistill log lines emitted inside the block (INFO and above)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("cmdistill")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
