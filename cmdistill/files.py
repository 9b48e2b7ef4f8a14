"""Files and folders written whole or not at all: each is written beside its place under a temporary name, then
renamed into it, so that a reader (a rerun, another process, a crash's survivor) never sees half of one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the file at a temporary path beside ``path``, which is then renamed into place. A write
    that fails removes its temporary file."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_image(image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No options: JPEG at PIL's defaults (quality 75, 4:2:0), byte for byte the paper's image.save(f"{i}.jpg").
    atomic_write(path, lambda tmp: image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG")))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync(path, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; quietly nothing where the file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems without fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Context manager: write into ``final + '.tmp'``, flush it to disk, then rename it into place: ``final`` is
    either absent, the old complete folder or the new complete folder, never a half-written one, even after a
    kill or a power loss (an old ``final`` is moved aside before the rename and removed after). A write that
    fails removes the partial ``.tmp`` folder."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                fsync(os.path.join(root, f))
            fsync(root, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    """The SHA-256 digest of a file's bytes (hex): the identity of the weights in it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
