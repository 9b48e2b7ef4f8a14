"""Files written whole or not at all: each is written beside its place under a temporary name, then renamed
into it, so that a reader (a rerun, another process, a crash's survivor) never sees half of one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_torch_save(obj, path: Path) -> None:
    tmp = _tmp(Path(path))
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_image(image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    # No options: JPEG at PIL's defaults (quality 75, 4:2:0), byte for byte the paper's image.save(f"{i}.jpg").
    image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp(Path(path))
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
