"""Finding the metric networks' weight files: local first, then the usual public source (docs/method.md §9).

Search order for a file ``name``: ``weights_dir/name`` (``--metrics_weights_dir``),
``$CMDISTILL_METRICS_WEIGHTS/name``, the file's own default locations (e.g. the torch hub cache
that pytorch-fid and torch.hub download to), then a download from its public URL. Offline (no
network, or ``CMDISTILL_METRICS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) a missing file is a one-line
:class:`~cmdistill.errors.UserError` that names the file, where to get it and where to put it.

``CMDISTILL_METRICS_RANDOM_WEIGHTS=full|tiny`` builds every metric network with random weights
(``tiny``: small variants through the same code path) -- for smoke tests only, never for numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import UserError, one_line
from ..files import atomic_write

ENV_WEIGHTS_DIR = "CMDISTILL_METRICS_WEIGHTS"
ENV_OFFLINE = "CMDISTILL_METRICS_OFFLINE"
ENV_RANDOM = "CMDISTILL_METRICS_RANDOM_WEIGHTS"


def random_weights_mode() -> str | None:
    """``None`` (real weights), ``"full"`` or ``"tiny"`` from ``$CMDISTILL_METRICS_RANDOM_WEIGHTS``."""
    v = os.environ.get(ENV_RANDOM, "").strip().lower()
    if v in ("", "0", "false", "no"):
        return None
    if v in ("1", "true", "yes", "full"):
        return "full"
    if v == "tiny":
        return "tiny"
    raise UserError(f"${ENV_RANDOM}={v!r}: expected 'full', 'tiny' or unset")


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in (ENV_OFFLINE, "HF_HUB_OFFLINE"))


def torch_hub_checkpoints() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (pytorch-fid, DINOv2's hub) keeps downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    name: str,
    *,
    url: str,
    weights_dir: str | os.PathLike | None = None,
    extra_dirs: Iterable[str | os.PathLike] = (),
    download: Callable[[Path], Path] | None = None,
) -> Path:
    """Return a local path to the weights file ``name``, downloading it from ``url`` if allowed.

    ``download(target_dir) -> path`` overrides the plain URL download (e.g. Hugging Face hub).
    """
    dirs: list[Path] = []
    if weights_dir:
        dirs.append(Path(weights_dir).expanduser())
    if os.environ.get(ENV_WEIGHTS_DIR):
        dirs.append(Path(os.environ[ENV_WEIGHTS_DIR]).expanduser())
    dirs += [Path(d).expanduser() for d in extra_dirs]
    dirs.append(torch_hub_checkpoints())
    for d in dirs:
        if (d / name).is_file():
            return d / name

    where = f"--metrics_weights_dir DIR or ${ENV_WEIGHTS_DIR}"
    if offline():
        why = "offline"
    else:
        target_dir = Path(weights_dir).expanduser() if weights_dir else torch_hub_checkpoints()
        try:
            if download is not None:
                return Path(download(target_dir))
            target_dir.mkdir(parents=True, exist_ok=True)
            target = target_dir / name
            atomic_write(target, lambda tmp: torch.hub.download_url_to_file(url, str(tmp), progress=True))
            return target
        except Exception as e:  # no network, HTTP error, ...: all become the one-line message below
            why = f"download failed: {one_line(e)}"
    raise UserError(
        f"metric weights file {name} not found ({why}); download it from {url} and put it in {where} "
        f"(searched: {', '.join(str(d) for d in dirs)})"
    )


def weights_identity(path: Path) -> str:
    """Cheap identity of a weights file for cache keys: its name and size in bytes."""
    return f"{path.name}:{path.stat().st_size}"
