"""The run folder (README, "What survives a fault"): its files, checkpoints written atomically and rotated, resume
planning, one run per folder (the compared settings), the step log, and the checks of the inputs before anything
loads."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch

from . import models
from .errors import UserError, one_line, writing
from .files import atomic_dir, atomic_write_text

logger = logging.getLogger("cmdistill")

STATE_NAME = "training_state.pt"
CONFIG_NAME = "training_config.json"
METRICS_NAME = "metrics.json"  # the evaluation results of a run (test.py / test_teacher.py, cmdistill.results)
LOG_NAME = "train_log.jsonl"


def write_json_atomic(path: Path, obj) -> None:
    with writing(path):
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and
             (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_checkpoint(path: Path) -> tuple[dict | None, dict]:
    """The recorded settings and the training state of a checkpoint folder, after checking that its files are
    readable and its LoRA finite (nothing is applied yet). A one-line error names the first unreadable file."""
    from safetensors.torch import load_file

    lora = path / models.LORA_WEIGHT_NAME
    try:
        weights = load_file(str(lora))
    except Exception as e:
        raise UserError(f"{lora} is unreadable ({one_line(e)})") from None
    if not models.lora_is_finite(weights):
        raise UserError(f"{lora} holds non-finite weights (NaN or inf)")
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"global_step", "samples_seen", "optimizer"} <= state.keys():
            raise ValueError("not a training state")
    except Exception as e:
        raise UserError(f"{path / STATE_NAME} is unreadable ({one_line(e)})") from None
    config = None
    if (path / CONFIG_NAME).is_file():
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path / CONFIG_NAME} is unreadable ({one_line(e)})") from None
    return config, state


def truncate_log(path: Path, step: int) -> None:
    """``train_log.jsonl`` holds each step once: a run resumed at ``step`` drops the lines of later steps (written
    by the interrupted run after its last checkpoint, and a line cut by a kill); a fresh run (step 0) starts it
    empty."""
    if not path.exists():
        return
    keep = []
    if step > 0:
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with writing(path):
        atomic_write_text(path, "".join(keep))


# --- one run per folder (README, "What survives a fault") -----------------------------------------------------
# The settings that change what is trained. A resume whose value differs from the checkpoint's is refused with one
# line naming them, unless --allow_config_change names them; LOCKED ones cannot change at all (the checkpoint's
# LoRA and optimizer state would not fit). Every other flag may change on resume: the cadence of checkpoints,
# validation and logging, the output, cache and precompute folders, data-loader workers, the number of processes
# and the split of the global batch over them and accumulation, and the speed and memory flags (compilation,
# checkpointing budget, teacher lookahead, attention kernels, tf32, --merged_target), which compute the same
# function. A new flag that changes the mathematics belongs here.
LOCKED_SETTINGS = ("objective", "lora_rank", "lora_target_modules")
COMPARED_SETTINGS = LOCKED_SETTINGS + (
    "pretrained_teacher_model", "teacher_revision", "pretrained_vae_model_name_or_path", "revision",
    "train_data_dir", "dataset_name", "dataset_config_name", "image_column", "caption_column", "max_train_samples",
    "resolution", "center_crop", "random_flip", "interpolation_type", "seed",
    "num_discr_timesteps", "w", "solver", "loss_type", "huber_c", "timestep_scaling_factor",
    "lora_alpha", "lora_dropout", "global_batch_size", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "use_8bit_adam", "max_grad_norm",
    "mixed_precision", "max_train_steps")
_PATH_SETTINGS = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path", "train_data_dir")


def _setting(key, value):
    if key in _PATH_SETTINGS and isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return list(value) if isinstance(value, (list, tuple)) else value


def changed_settings(recorded: dict, current: dict) -> dict:
    """{setting: (recorded value, current value)} for the COMPARED_SETTINGS that differ (those recorded in both)."""
    return {k: (recorded[k], current[k]) for k in COMPARED_SETTINGS
            if k in recorded and k in current and _setting(k, recorded[k]) != _setting(k, current[k])}


def check_same_run(recorded: dict, current: dict, allowed, where: str) -> None:
    """One line naming the settings in which this run differs from ``recorded`` (the run in ``where``) and the
    fix, unless each is named in ``allowed`` (--allow_config_change) and none is locked."""
    changed = changed_settings(recorded, current)
    refused = [k for k in changed if k not in allowed or k in LOCKED_SETTINGS]
    if changed and not refused:
        logger.info("resuming with changed settings (--allow_config_change): %s",
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if not refused:
        return
    what = ", ".join(f"--{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
    if any(k in LOCKED_SETTINGS for k in refused):
        fix = "these cannot change within a run: use another --output_dir"
    else:
        fix = (f"use another --output_dir for a new run, keep the run's values, or add --allow_config_change "
               f"{','.join(refused)} to change them in this run")
    raise UserError(f"{where} was trained with other settings ({what}): {fix}")


def check_run_inputs(args) -> None:
    """Ranges, the environment and the output folder, before anything loads: one line naming the flag and the
    fix (what ``validate_args`` does not check). A flag that the parser at hand lacks is not checked."""
    rules = [  # flag, is the value valid, why
        ("lora_rank", lambda v: v >= 1, "must be >= 1 (paper: 64)"),
        ("lora_alpha", lambda v: v > 0, "must be > 0 (paper: 64, the rank)"),
        ("lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1) (default 0)"),
        ("resolution", lambda v: v >= 8, "must be a positive multiple of 8 (paper: 1024)"),
        ("max_train_steps", lambda v: v >= 1, "must be >= 1 (paper: 250): a run of no step would save an untrained "
                                              "LoRA"),
        ("num_train_epochs", lambda v: v >= 1, "must be >= 1"),
        ("w", lambda v: 0 <= v < math.inf, "must be >= 0 (guidance scale, Imagen form: 1 = conditional only; "
                                           "paper: 9)"),
        ("learning_rate", lambda v: 0 < v < math.inf, "must be a positive number (paper: 1e-4)"),
        ("max_grad_norm", lambda v: v > 0, "must be > 0 (paper: 1)"),
        ("huber_c", lambda v: v > 0 or getattr(args, "loss_type", "") != "huber", "must be > 0 (default 0.001)"),
        ("checkpointing_steps", lambda v: v >= 0, "must be >= 0 (0 = no checkpoints)"),
        ("checkpoints_total_limit", lambda v: v >= 1, "must be >= 1 (leave it out to keep every checkpoint)"),
        ("validation_steps", lambda v: v >= 0, "must be >= 0 (0 = no validation)"),
        ("mixed_precision", lambda v: v != "fp16" or _has_accelerator(),
         "fp16 needs a GPU; on a CPU use --mixed_precision bf16 or no"),
    ]
    for flag, ok, why in rules:
        value = getattr(args, flag, None)
        if value is not None and not ok(value):
            raise UserError(f"--{flag} {value!r}: {why}")
    unknown = [k for k in getattr(args, "allow_config_change", None) or [] if k not in COMPARED_SETTINGS]
    if unknown:
        raise UserError(f"--allow_config_change {','.join(unknown)}: not a compared setting; the compared ones are "
                        f"{', '.join(COMPARED_SETTINGS)} (every other flag may change on resume anyway)")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder: use another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_dir {out} is not writable ({e.strerror or type(e).__name__}): make it "
                        "writable or use another --output_dir") from None


def _has_accelerator() -> bool:
    """Whether accelerate will run on a GPU (fp16 autocast has no CPU kernels for much of the UNet)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    return (torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())
            or bool(mps is not None and mps.is_available()))


def non_finite_error(step: int, what: str, output_dir: Path) -> UserError:
    """The NaN guard's one line: the run stops (every process, on the same reduced numbers) before anything of this
    step is saved; the checkpoints on disk are the last good ones."""
    ckpts = list_checkpoints(output_dir)
    kept = f"the last checkpoint, {ckpts[-1]}, is intact" if ckpts else "no checkpoint had been written"
    return UserError(f"step {step}: the {what} not finite (NaN or inf); the run stopped without saving this step "
                     f"({kept}): lower --learning_rate or --max_grad_norm and resume with --resume_from_checkpoint "
                     "latest --allow_config_change learning_rate,max_grad_norm, or start over in another --output_dir")


def save_checkpoint(output_dir: Path, step: int, state: dict, unet, config: dict, total_limit: int | None) -> Path:
    """checkpoint-<step>: written in full to a .tmp folder, flushed to disk, renamed into place, and only then are old
    checkpoints rotated out (``total_limit``, --checkpoints_total_limit): a kill or a failed write at any point leaves
    at least the complete checkpoints there were before. The main process only; the caller checks the LoRA first."""
    final = output_dir / f"checkpoint-{step}"
    intact = f"(the earlier checkpoints in {output_dir} are intact)"
    buf = io.BytesIO()  # serialised first: a full disk is then an OSError of the file's own write
    torch.save(state, buf)
    with writing(final.with_name(final.name + ".tmp"), intact), atomic_dir(final) as tmp:
        with writing(tmp / models.LORA_WEIGHT_NAME, intact):
            models.save_lora(unet, tmp)
        with writing(tmp / STATE_NAME, intact):
            (tmp / STATE_NAME).write_bytes(buf.getbuffer())
        write_json_atomic(tmp / CONFIG_NAME, config)
    logger.info("saved %s", final)
    if total_limit is not None:
        ckpts = [c for c in list_checkpoints(output_dir) if c != final]
        for old in ckpts[: max(0, len(ckpts) + 1 - total_limit)]:
            logger.info("removing old checkpoint %s", old.name)
            gone = old.with_name(old.name + ".removing")  # out of the listing at once, then deleted
            os.replace(old, gone)
            shutil.rmtree(gone, ignore_errors=True)
    return final


def append_log(path: Path, step: int, logs: dict) -> None:
    """One line of ``train_log.jsonl``."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def folder_settings(output_dir: Path, held: str) -> dict:
    """The recorded settings of the run that --output_dir holds."""
    try:
        return json.loads((output_dir / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        raise UserError(f"--output_dir {output_dir} holds a run ({held}) without a readable {CONFIG_NAME} to tell "
                        "which: use another --output_dir") from None


def plan_resume(args, out: Path, current: dict, main_process: bool = True) -> tuple[Path, dict] | None:
    """Before any model loads: what this run continues, as (checkpoint folder, its training state), or None for a
    fresh start. One run per --output_dir: a folder that holds checkpoints or a final LoRA is continued only with
    --resume_from_checkpoint and the same settings (``check_same_run`` against ``current``, this run's values);
    ``latest`` takes the newest readable checkpoint, saying in one line which unreadable one it skipped."""
    ckpts = list_checkpoints(out)
    final = (out / models.LORA_WEIGHT_NAME).is_file()
    allowed = set(getattr(args, "allow_config_change", None) or [])
    resume = args.resume_from_checkpoint
    held = ", ".join(([f"checkpoints up to {ckpts[-1].name}"] if ckpts else []) + (["a final LoRA"] if final else []))
    if not resume:
        if held:
            raise UserError(f"--output_dir {out} already holds a run ({held}): continue it with "
                            "--resume_from_checkpoint latest, or use another --output_dir")
        return None
    if resume == "latest":
        candidates = ckpts[::-1]
        if not candidates:
            if final:
                check_same_run(folder_settings(out, held), current, allowed, f"the final LoRA in --output_dir {out}")
                logger.info("--resume_from_checkpoint latest: no checkpoint in %s; training from the start "
                            "(the same settings: its final LoRA is replaced when this run ends)", out)
            else:
                logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting fresh", out)
            return None
    else:
        path = Path(resume)
        if not path.is_absolute() and not path.exists():
            path = out / resume
        if not (path / STATE_NAME).is_file():
            raise UserError(f"--resume_from_checkpoint '{resume}' is not a checkpoint folder (no {STATE_NAME}); "
                            "use 'latest' or a checkpoint-* folder of --output_dir")
        if held and path.resolve().parent != out.resolve():  # another folder's checkpoint into this run's folder
            check_same_run(folder_settings(out, held), current, allowed, f"--output_dir {out}")
        candidates = [path]
    for i, path in enumerate(candidates):
        try:
            recorded, state = read_checkpoint(path)
        except UserError as e:
            if resume != "latest":
                raise UserError(f"--resume_from_checkpoint {path}: {e}") from None
            if i + 1 == len(candidates):
                raise UserError(f"no readable checkpoint in --output_dir {out} (last tried: {e}): use another "
                                "--output_dir, or remove the broken checkpoint-* folders to start over") from None
            if main_process:
                logger.warning("%s: resuming from the previous checkpoint, %s", e, candidates[i + 1].name)
            continue
        if recorded is not None:
            check_same_run(recorded, current, allowed, f"checkpoint {path}")
        return path, state
    return None
