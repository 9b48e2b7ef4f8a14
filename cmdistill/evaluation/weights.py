"""Which LoRA weights of a training run ``test.py`` evaluates: ``--lora_weights`` (one set) or ``--checkpoints``
(several, over training), each with its training step, checked before any model loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..models import LORA_WEIGHT_NAME
from ..run_folder import CONFIG_NAME
from .inputs import read_json


def resolve_lora(output_dir: Path, choice: str) -> tuple[Path, str]:
    """(folder holding pytorch_lora_weights.safetensors, its name) for --lora_weights."""
    if not output_dir.is_dir():
        raise UserError(f"--output_dir '{output_dir}' does not exist (the training run's folder with the LoRA)")
    ckpts = sorted((p for p in output_dir.glob("checkpoint-*")
                    if re.fullmatch(r"checkpoint-\d+", p.name) and (p / LORA_WEIGHT_NAME).is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    final = (output_dir / LORA_WEIGHT_NAME).is_file()
    if choice in ("auto", "final") and final:
        return output_dir, "final"
    if choice in ("auto", "latest") and ckpts:
        return ckpts[-1], ckpts[-1].name
    if choice not in ("auto", "final", "latest"):
        path = Path(choice) if Path(choice).is_dir() else output_dir / choice
        if (path / LORA_WEIGHT_NAME).is_file():
            return path, path.name
        raise UserError(f"--lora_weights '{choice}': no {LORA_WEIGHT_NAME} in '{path}'")
    what = {"auto": f"{LORA_WEIGHT_NAME} or checkpoint-*/{LORA_WEIGHT_NAME}", "final": LORA_WEIGHT_NAME,
            "latest": f"checkpoint-*/{LORA_WEIGHT_NAME}"}[choice]
    raise UserError(f"no LoRA weights in '{output_dir}' (looked for {what}): train first, or pass --lora_weights")


def final_step(output_dir: Path) -> int | None:
    """The training step of a run's final weights: the last step of train_log.jsonl, else the configuration's
    max_train_steps."""
    log = output_dir / "train_log.jsonl"
    if log.is_file():
        for line in reversed(log.read_text().splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    step = read_json(output_dir / CONFIG_NAME).get("max_train_steps")
    return int(step) if isinstance(step, (int, float)) else None


def weights_step(output_dir: Path, weights: str) -> int | None:
    """The training step of the weights named ``weights`` (a checkpoint-<step> folder, or "final")."""
    m = re.fullmatch(r"checkpoint-(\d+)", weights)
    return int(m[1]) if m else final_step(output_dir) if weights == "final" else None


def select_checkpoints(output_dir: Path, spec: str) -> list[tuple[Path, str, int | None]]:
    """(folder with the LoRA, its name, its training step) of ``--checkpoints`` all | latest | N,M, in training
    order; the final weights stand for the run's last step (a checkpoint of the same step is the same)."""
    if not output_dir.is_dir():
        raise UserError(f"--output_dir '{output_dir}' does not exist (the training run's folder with the LoRA)")
    found = {int(p.name.split("-")[1]): (p, p.name) for p in output_dir.glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / LORA_WEIGHT_NAME).is_file()}
    final = final_step(output_dir) if (output_dir / LORA_WEIGHT_NAME).is_file() else None
    if (output_dir / LORA_WEIGHT_NAME).is_file():
        found[final if final is not None else max(found, default=0) + 1] = (output_dir, "final")
    if not found:
        raise UserError(f"no LoRA weights in '{output_dir}' (looked for {LORA_WEIGHT_NAME} and "
                        f"checkpoint-*/{LORA_WEIGHT_NAME}): train first")
    if spec == "all":
        steps = sorted(found)
    elif spec == "latest":
        steps = [max(found)]
    else:
        try:
            steps = [int(x) for x in spec.replace(" ", ",").split(",") if x]
        except ValueError:
            raise UserError(f"--checkpoints '{spec}': give all, latest or training steps like 500,1000") from None
        missing = [s for s in steps if s not in found]
        if missing or not steps:
            raise UserError(f"--checkpoints {spec}: no weights of step {', '.join(map(str, missing))} in "
                            f"'{output_dir}' (there are: {', '.join(map(str, sorted(found)))})")
    steps = list(dict.fromkeys(steps))
    return [(found[s][0], found[s][1], s if found[s][1] != "final" or final is not None else None) for s in steps]


def check_lora_file(path: Path) -> None:
    """A LoRA file that loads and holds finite weights, checked before any model loads."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise UserError(f"LoRA file '{path}' cannot be read ({type(e).__name__}): it is truncated or not a "
                        "safetensors file; pick another --lora_weights (e.g. a checkpoint-* folder)") from None
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"LoRA file '{path}' holds non-finite weights (NaN/Inf in {bad}): the training diverged; "
                        "evaluate an earlier checkpoint with --lora_weights checkpoint-<step>")
