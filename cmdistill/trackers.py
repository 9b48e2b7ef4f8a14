"""The ``--report_to`` trackers of training and evaluation (accelerate's), checked before any model loads."""

from __future__ import annotations

REPORT_TO = ["tensorboard", "wandb", "all", "none"]


def check_trackers(report_to: str) -> None:
    """``--report_to``: a one-line error, before any model loads, for a tracker that is not installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    from .errors import UserError

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if report_to in available and not available[report_to]:
        other = next((k for k, v in available.items() if v and k != report_to), "none")
        raise UserError(f"--report_to {report_to}: {report_to} is not installed (pip install {report_to}), or pass "
                        f"--report_to {other}")
