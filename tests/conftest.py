"""Shared fixtures: offline, CPU-sized stand-ins for the SDXL teacher and the training data."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without an installed package
    sys.path.insert(0, str(ROOT))

TINY_CAPTIONS = ["a red cat on a sofa", "a blue dog, sitting", 'a "quoted" oak tree', "mountains at dawn",
                 "a bowl of fruit"]


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
