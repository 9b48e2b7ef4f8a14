"""The shared training loop of ``train_cm.py`` and ``train_direct_cm.py`` (SPEC §6-§7).

The loop never branches on the objective: it receives a target function from
``objectives.OBJECTIVES`` and computes ``distance(f_theta(x_t, t_n), target)``.
Randomness (timesteps, noise, VAE sampling, crops, data order) is a pure function of the seed and
each sample's position in the data stream, so a resumed run reproduces the uninterrupted one and
P processes reproduce one process with the same global batch, up to floating-point rounding (the teacher's
calls group samples differently: the trajectory pool restarts empty after a resume, and a process's batch
sets which calls batch their guidance passes).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import checkpointing, hub, models
from .args import training_parser
from .data import (MIN_IMAGE_SIDE, SDXLImageCaptions, caption_text, count_empty_captions, count_long_captions,
                   load_caption_dataset, make_dataloader)
from .devices import AheadOfTime, to_device
from .errors import UserError, writing
from .guidance import AdaptiveCFG, UNetEps
from .noise import generator_for, per_sample_noise
from .objectives import (OBJECTIVES, DistillContext, cm_target_from, cm_teacher_step, direct_cm_trajectory_pairs,
                         distance, extra_pair_indices)
from .precompute import collate_precomputed, find_cache
from .sampling import consistency_fn, student_sample
from .schedule import Grid, NoiseSchedule
from .solvers import TrajectoryPool, get_solver, solve_to_zero_reference

logger = logging.getLogger("cmdistill")
STATE_NAME = "training_state.pt"
STREAM_T, STREAM_NOISE, STREAM_VAE = 101, 102, 103  # noise streams of the training step (noise.per_sample_noise)
STREAM_PAIRS = 104  # --trajectory_pairs: the grid indices of the extra pairs
CONFIG_NAME = "training_config.json"
LOG_NAME = "train_log.jsonl"


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    with writing(path):
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and
             (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def read_checkpoint(path: Path) -> tuple[dict | None, dict]:
    """The recorded settings and the training state of a checkpoint folder, after checking that its files are
    readable and its LoRA finite (nothing is applied yet). A one-line error names the first unreadable file."""
    from safetensors.torch import load_file

    lora = path / models.LORA_WEIGHT_NAME
    try:
        weights = load_file(str(lora))
    except Exception as e:
        raise UserError(f"{lora} is unreadable ({_why(e)})") from None
    if not models.lora_is_finite(weights):
        raise UserError(f"{lora} holds non-finite weights (NaN or inf)")
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"global_step", "samples_seen", "optimizer"} <= state.keys():
            raise ValueError("not a training state")
    except Exception as e:
        raise UserError(f"{path / STATE_NAME} is unreadable ({_why(e)})") from None
    config = None
    if (path / CONFIG_NAME).is_file():
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path / CONFIG_NAME} is unreadable ({_why(e)})") from None
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


# --- one run per folder (README, "What survives a fault") -----------------------------------------------------
# The settings that change what is trained. A resume whose value differs from the checkpoint's is refused with one
# line naming them, unless --allow_config_change names them; LOCKED ones cannot change at all (the checkpoint's
# LoRA and optimizer state would not fit). Every other flag may change on resume: the cadence of checkpoints,
# validation and logging, the output, cache and precompute folders, data-loader workers, the number of processes
# and the split of the global batch over them and accumulation, and the speed and memory flags (compilation,
# checkpointing budget, teacher lookahead, guidance batching, attention kernels, tf32, --reference_loop,
# --merged_target), which compute the same function. A new flag that changes the mathematics belongs here.
LOCKED_SETTINGS = ("objective", "lora_rank", "lora_target_modules")
COMPARED_SETTINGS = LOCKED_SETTINGS + (
    "pretrained_teacher_model", "teacher_revision", "pretrained_vae_model_name_or_path", "revision",
    "train_data_dir", "dataset_name", "dataset_config_name", "image_column", "caption_column", "max_train_samples",
    "resolution", "center_crop", "random_flip", "interpolation_type", "seed",
    "num_discr_timesteps", "w", "solver", "loss_type", "huber_c", "timestep_scaling_factor", "trajectory_pairs",
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


OPTIMIZER_8BIT = "bitsandbytes.optim.AdamW8bit"
DEFAULT_TRAIN_BATCH_SIZE = 16  # per device, when --global_batch_size is not given (the paper: 16 on one GPU)


def adamw8bit_unavailable(device: torch.device) -> str | None:
    """Why bitsandbytes' AdamW8bit cannot run on ``device``, or None when a probe step there gave AdamW's first
    update (one parameter on the 8-bit blockwise path, one small enough for the 32-bit path)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or a build that does not load here
        return f"bitsandbytes does not import ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]})"
    try:
        probe = [torch.nn.Parameter(torch.zeros(4096, device=device)), torch.nn.Parameter(torch.zeros(8, device=device))]
        opt = bnb.optim.AdamW8bit(probe, lr=1e-3)
        for p in probe:
            p.grad = torch.ones_like(p)
        opt.step()
        ok = all(torch.allclose(p.detach().float().cpu(), torch.full(p.shape, -1e-3), rtol=0, atol=1e-5) for p in probe)
    except Exception as e:
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} failed a probe step on {device.type} ({type(e).__name__})"
    return None if ok else f"bitsandbytes {getattr(bnb, '__version__', '?')} gave a wrong probe step on {device.type}"


def make_optimizer(args, params):
    """AdamW over the LoRA weights: bitsandbytes' AdamW8bit with ``--use_8bit_adam`` (the paper's), torch's otherwise.
    Where AdamW8bit cannot run, a one-line error unless ``--optimizer_fallback adamw``. Records the optimizer that
    runs as ``args.optimizer`` (and a fallback's reason), which training_config.json keeps."""
    params = list(params)
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
              eps=args.adam_epsilon)
    if args.use_8bit_adam:
        why = adamw8bit_unavailable(params[0].device if params else torch.device("cpu"))
        if why is None:
            import bitsandbytes as bnb

            args.optimizer = OPTIMIZER_8BIT
            return bnb.optim.AdamW8bit(params, **kw)
        if getattr(args, "optimizer_fallback", "none") != "adamw":
            raise UserError(f"--use_8bit_adam: {why}; install the pinned bitsandbytes (pip install -r "
                            "requirements.txt), or add --optimizer_fallback adamw to train with torch.optim.AdamW")
        logger.warning("--use_8bit_adam: %s; --optimizer_fallback adamw: training with torch.optim.AdamW (fp32 "
                       "states)", why)
        args.optimizer_fallback_reason = why
    # On a GPU, one fused kernel for the update of all LoRA weights (same update, fewer passes over memory).
    fused = bool(params) and all(p.is_cuda for p in params)
    args.optimizer = "torch.optim.AdamW" + ("(fused=True)" if fused else "")
    return torch.optim.AdamW(params, **kw, fused=fused or None)


def check_resumed_optimizer(checkpoint: Path, args) -> None:
    """A checkpoint's optimizer state loads only into the optimizer that wrote it."""
    cfg = checkpoint / CONFIG_NAME
    was = json.loads(cfg.read_text()).get("optimizer") if cfg.is_file() else None
    now = getattr(args, "optimizer", None)
    if was and now and was.split("(")[0] != now.split("(")[0]:
        raise UserError(f"{checkpoint} holds the state of {was}, this run uses {now}: resume with the same optimizer "
                        "(--use_8bit_adam / --optimizer_fallback as before) or use another --output_dir")


def resolve_batch_size(args, num_processes: int) -> int:
    """Sets the per-device ``args.train_batch_size`` from ``--global_batch_size`` where given (it must divide into
    processes x accumulation steps and agree with an explicit ``--train_batch_size``), else to its default;
    returns the global batch of one optimizer step."""
    accum = args.gradient_accumulation_steps
    if accum < 1 or (args.train_batch_size is not None and args.train_batch_size < 1):
        raise UserError("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    split = num_processes * accum
    total = getattr(args, "global_batch_size", None)
    if total is not None:
        if total < 1 or total % split:
            raise UserError(f"--global_batch_size {total} does not divide into {num_processes} processes x {accum} "
                            f"accumulation steps: give a multiple of {split}, or change the number of processes "
                            "(NUM_GPUS) or --gradient_accumulation_steps")
        if args.train_batch_size is not None and args.train_batch_size != total // split:
            raise UserError(f"--train_batch_size {args.train_batch_size} (per device) x {num_processes} processes x "
                            f"{accum} accumulation steps is not --global_batch_size {total}: give only one of them")
        args.train_batch_size = total // split
    elif args.train_batch_size is None:
        args.train_batch_size = DEFAULT_TRAIN_BATCH_SIZE
    return args.train_batch_size * split


def validate_args(args):
    if args.checkpointing_budget_gib not in (None, "auto") and args.checkpointing_budget_gib < 0:
        raise UserError(f"--checkpointing_budget_gib {args.checkpointing_budget_gib:g} must be >= 0 (GiB of "
                        "activations kept un-checkpointed; 0 = checkpoint every block)")
    Grid(1000, args.num_discr_timesteps)  # raises a one-line error when N does not divide T
    for flag in ("teacher_freezing", "teacher_channels_last"):
        if getattr(args, flag, False) and not args.compile_teacher:
            raise UserError(f"--{flag} applies to the compiled teacher: add --compile_teacher (COMPILE=1)")
    if getattr(args, "teacher_freezing", False) and args.compile_mode not in (None, "default"):
        raise UserError(f"--teacher_freezing applies to torch.compile's default mode: drop --compile_mode "
                        f"{args.compile_mode} or --teacher_freezing (FREEZING=0 with COMPILE=1)")
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a multiple of 8 (the VAE downsamples 8x)")
    # The batch arithmetic before any model loads, for the number of processes the launcher started
    # (the Trainer resolves it again from the accelerator's).
    from accelerate.utils import get_int_from_env

    resolve_batch_size(copy.copy(args), get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"], 1))
    if args.use_8bit_adam and getattr(args, "optimizer_fallback", "none") == "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--use_8bit_adam: bitsandbytes is not installed; install the pinned version (pip install -r "
                        "requirements.txt), or add --optimizer_fallback adamw to train with torch.optim.AdamW")
    if not args.train_data_dir and not args.dataset_name:
        raise UserError("give --train_data_dir (an image folder with metadata.csv) or --dataset_name")
    if getattr(args, "cfg_batched", False) and getattr(args, "cfg_separate", False):
        raise UserError("--cfg_batched and --cfg_separate exclude each other: give one (default: batched for small "
                        "calls only)")
    if (getattr(args, "teacher_lookahead", 0) or 0) < 0:
        raise UserError(f"--teacher_lookahead {args.teacher_lookahead}: must be >= 0 (0 = off)")
    if getattr(args, "trajectory_pairs", 1) < 1:
        raise UserError(f"--trajectory_pairs {args.trajectory_pairs}: must be >= 1 (1 = off)")


class Trainer:
    """State and steps of one distillation run."""

    def __init__(self, args, objective: str, for_precompute: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.args, self.objective_name = args, objective
        self.objective = OBJECTIVES[objective]
        if getattr(args, "trajectory_pairs", 1) > 1 and (objective != "direct_cm" or args.reference_loop):
            raise UserError("--trajectory_pairs applies to train_direct_cm.py without --reference_loop; drop it")
        if getattr(args, "merged_target", False) and objective != "cm":
            raise UserError("--merged_target applies to train_cm.py (Direct CM has no student target pass); drop it")
        if getattr(args, "merged_target", False) and args.lora_dropout:
            raise UserError("--merged_target folds the LoRA update into the weights, without --lora_dropout's "
                            "dropout on the target pass: use one of them (COMPILE=1 in scripts/train_cm.sh adds "
                            "--merged_target unless MERGED_TARGET=0)")
        if args.teacher_lookahead is None:  # default: on wherever it applies
            plain = objective == "direct_cm" and not args.reference_loop and args.trajectory_pairs == 1
            args.teacher_lookahead = 2 if plain else 0
        if args.teacher_lookahead and not for_precompute and objective == "direct_cm" and (
                args.reference_loop or args.trajectory_pairs > 1):
            raise UserError("--teacher_lookahead applies to train_direct_cm.py without --reference_loop or "
                            "--trajectory_pairs, and to train_cm.py; drop it")
        if (args.teacher_lookahead and objective == "cm" and args.compile_teacher
                and getattr(args, "teacher_lookahead_stream", "same") == "side"
                and models.uses_cudagraphs(args.compile_mode)):
            raise UserError("--teacher_lookahead_stream side runs the teacher on a second CUDA stream, which "
                            "--compile_mode reduce-overhead (CUDA graphs) does not support: use "
                            "--teacher_lookahead_stream same")
        check_run_inputs(args)
        self.output_dir = Path(args.output_dir)
        report_to = None if args.report_to in (None, "none") else args.report_to
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=report_to, project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)))
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        # Per-device batch from --global_batch_size (or its default) for this number of processes.
        self.global_batch = resolve_batch_size(args, acc.num_processes)
        if not acc.is_main_process:
            logger.setLevel(logging.WARNING)
        set_seed(args.seed)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # The data and the run folder before any model loads: their errors come first.
        self.dataset = self.load_data()
        self.resume = None if for_precompute else self.plan_resume()

        # Models (SPEC §1): one UNet; its LoRA adapter disabled is the teacher.
        t = models.load_teacher(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path,
                                args.revision, args.teacher_revision, args.cache_dir, load_unet=not for_precompute)
        self.tokenizers, self.text_encoders, self.vae, unet = t.tokenizers, t.text_encoders, t.vae, t.unet
        if acc.is_main_process:
            count_long_captions(self.dataset.ds[args.caption_column], self.tokenizers[0])
        self.sched = NoiseSchedule.from_scheduler(t.scheduler)
        self.grid = Grid(self.sched.T, args.num_discr_timesteps)
        self.step_fn = get_solver(args.solver)
        dev = acc.device
        # The stock SDXL VAE overflows in fp16; keep it fp32 unless an fp16-safe VAE was given (as the reference).
        vae_dtype = torch.float32 if args.pretrained_vae_model_name_or_path is None else self.weight_dtype
        for m, dtype in [(self.vae, vae_dtype), (unet, self.weight_dtype)] + [(te, self.weight_dtype)
                                                                               for te in self.text_encoders]:
            if m is not None:
                m.to(dev) if dtype == torch.float32 else m.to(dev, dtype=dtype)
        if for_precompute:
            return
        if args.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401

                unet.enable_xformers_memory_efficient_attention()
            except ImportError:
                logger.info("--enable_xformers_memory_efficient_attention: xformers not installed; "
                            "using torch scaled_dot_product_attention (equivalent memory savings)")
        models.add_lora(unet, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        for p in unet.parameters():  # fp32 LoRA parameters under mixed precision (SPEC §7)
            if p.requires_grad:
                p.data = p.data.float()
        if self.weight_dtype != torch.float32 and args.lora_dropout == 0:
            # Every adapter forward runs under autocast: skip PEFT's copy of each activation to fp32 (same values).
            models.set_lora_input_casting(unet, False)
        self.checkpointing = {}
        if args.gradient_checkpointing or args.checkpointing_budget_gib is not None:
            # Every block checkpointed, or (--checkpointing_budget_gib) the blocks that are dearest to recompute
            # per byte kept un-checkpointed within that much activation memory (cmdistill.checkpointing).
            # 'auto': every block checkpointed for the first step, then sized from its peak (size_checkpointing).
            budget = 0 if args.checkpointing_budget_gib == "auto" else args.checkpointing_budget_gib
            self.set_checkpointing(unet, budget)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if args.scale_lr:
            args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        optimizer = make_optimizer(args, self.params)

        self.precomputed = find_cache(args, self.dataset, self.weight_dtype)
        # The steps read cached latents and embeddings: the text encoders and the VAE wait on the CPU until
        # validation needs them (models_on_device).
        offload = self.precomputed is not None and dev.type != "cpu"
        self.offloaded = [*self.text_encoders, self.vae] if offload else []
        for m in self.offloaded:
            m.to("cpu")
        if args.max_train_steps is None:
            args.max_train_steps = math.ceil(args.num_train_epochs * len(self.dataset) / self.global_batch)

        # The schedule counts optimizer steps, whatever the number of processes: it is stepped once per
        # optimizer step and not handed to accelerate (which would step it once per process).
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                          num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=args.max_train_steps)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.base_unet = acc.unwrap_model(self.unet)
        # The teacher: the same frozen weights seen without the adapter layers (no switch to flip per call).
        self.teacher_base = models.base_view(self.base_unet)
        if args.compile_blocks:  # regional compilation: every pass through the UNet runs compiled blocks
            models.compile_blocks(self.base_unet)
            if not args.compile_teacher:
                models.compile_blocks(self.teacher_base)
        # The teacher's passes (no grad) may run compiled, with a dynamic batch dimension.
        channels_last = getattr(args, "teacher_channels_last", False)
        self.teacher_unet = (models.compile_unet(self.teacher_base, mode=args.compile_mode,
                                                 freezing=getattr(args, "teacher_freezing", False),
                                                 channels_last=channels_last)
                             if args.compile_teacher else self.teacher_base)
        # --merged_target: the CM target pass on weight copies with the LoRA update folded in (refreshed once per
        # optimizer step, at its first target pass), compiled whole with --compile_teacher (default mode).
        self.merged = models.MergedAdapters(self.base_unet) if getattr(args, "merged_target", False) else None
        if self.merged is not None and args.compile_blocks and not args.compile_teacher:
            models.compile_blocks(self.merged.tree)
        self.target_unet = (self.base_unet if self.merged is None else
                            models.compile_unet(self.merged.tree, channels_last=channels_last)
                            if args.compile_teacher else self.merged.tree)
        # The student's pass with grad (through DDP when there are several processes) may run compiled too.
        self.student_unet = models.compile_unet(self.unet) if args.compile_student else self.unet
        self.global_step, self.samples_seen, self.skipped_images = 0, 0, 0

        if self.resume is not None:
            self.load_checkpoint(*self.resume)
        hub.check_push_args(args)
        self.config = hub.recordable_config(args)  # secrets (--hub_token, ...) never recorded or logged
        self.config.update(objective=objective, num_processes=acc.num_processes, global_batch_size=self.global_batch,
                           mixed_precision=acc.mixed_precision, vae_scale_factor=self.vae_scale_factor,
                           selective_checkpointing=self.checkpointing)
        if acc.is_main_process:
            write_json_atomic(self.output_dir / CONFIG_NAME, self.config)

    def set_checkpointing(self, unet, budget_gib):
        args = self.args
        side = args.resolution // self.vae_scale_factor
        self.checkpointing = checkpointing.enable(unet, budget_gib, args.train_batch_size * args.trajectory_pairs,
                                                  side, side)
        if budget_gib:
            logger.info(checkpointing.describe(self.checkpointing))

    def size_checkpointing(self):
        """``--checkpointing_budget_gib auto``. After the first (fully checkpointed) step of this run: keep as
        many activations as the memory left on the card allows, assuming they cost OVERSHOOT x the dry run's
        estimate (``checkpointing.auto_budget_gib``). After the second step, the first with that plan: re-size
        once at the cost per estimated byte measured from the rise of the peak
        (``checkpointing.calibrated_budget_gib``), when that keeps >10% more or the peak passed the headroom."""
        dev, info = self.accelerator.device, self.checkpointing
        if dev.type != "cuda":
            logger.info("--checkpointing_budget_gib auto: no CUDA device, every block stays checkpointed")
            self.set_checkpointing(self.base_unet, 0.0)
            self.checkpointing.update(auto_budget_gib=0.0, first_step_peak_gib=None, calibrated=False)
        elif "auto_budget_gib" not in info:
            total, peak = torch.cuda.get_device_properties(dev).total_memory, torch.cuda.max_memory_allocated(dev)
            budget = checkpointing.auto_budget_gib(peak, total)
            logger.info("--checkpointing_budget_gib auto: first step peaked at %.1f GiB; budget %.1f GiB",
                        peak / 2**30, budget)
            self.set_checkpointing(self.base_unet, budget)
            self.checkpointing.update(auto_budget_gib=budget, first_step_peak_gib=peak / 2**30)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            total, peak = torch.cuda.get_device_properties(dev).total_memory, torch.cuda.max_memory_allocated(dev)
            peak0, first = info["first_step_peak_gib"] * 2**30, info["auto_budget_gib"]
            ratio = checkpointing.measured_ratio(peak0, peak, info.get("kept_gib", 0.0))
            budget = checkpointing.calibrated_budget_gib(peak0, peak, info.get("kept_gib", 0.0), total)
            if budget is not None and (budget > 1.1 * first or peak > checkpointing.HEADROOM * total):
                logger.info("--checkpointing_budget_gib auto: the plan's step peaked at %.1f GiB, %.2f x the "
                            "estimate; budget %.1f -> %.1f GiB", peak / 2**30, ratio, first, budget)
                self.set_checkpointing(self.base_unet, budget)
                self.checkpointing.update(auto_budget_gib=budget, first_plan_budget_gib=first,
                                          first_step_peak_gib=peak0 / 2**30)
            self.checkpointing.update(calibrated=True, measured_ratio=ratio, second_step_peak_gib=peak / 2**30)
        self.config["selective_checkpointing"] = self.checkpointing
        if self.accelerator.is_main_process:
            write_json_atomic(self.output_dir / CONFIG_NAME, self.config)

    def load_data(self) -> SDXLImageCaptions:
        a = self.args
        ds = load_caption_dataset(a.train_data_dir, a.dataset_name, a.dataset_config_name, a.image_column,
                                  a.caption_column, a.cache_dir, a.max_train_samples)
        if self.accelerator.is_main_process:
            count_empty_captions(ds, a.caption_column)
        return SDXLImageCaptions(ds, a.image_column, a.caption_column, a.resolution, a.interpolation_type,
                                 a.center_crop, a.random_flip, a.seed)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self):
        """checkpoint-<step>: written in full to a .tmp folder, flushed to disk, renamed into place, and only then
        are old checkpoints rotated out (--checkpoints_total_limit): a kill or a failed write at any point leaves
        at least the complete checkpoints there were before. A non-finite LoRA is never written."""
        acc, args = self.accelerator, self.args
        if not models.lora_is_finite(self.base_unet):  # every process decides on the same weights
            self.stop_non_finite("LoRA weights are")
        if acc.is_main_process:
            final = self.output_dir / f"checkpoint-{self.global_step}"
            intact = f"(the earlier checkpoints in {self.output_dir} are intact)"
            state = {"global_step": self.global_step, "samples_seen": self.samples_seen,
                     "skipped_images": self.skipped_images,
                     "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "objective": self.objective_name}
            buf = io.BytesIO()  # serialised first: a full disk is then an OSError of the file's own write
            torch.save(state, buf)
            with writing(final.with_name(final.name + ".tmp"), intact), models.atomic_dir(final) as tmp:
                with writing(tmp / models.LORA_WEIGHT_NAME, intact):
                    models.save_lora(self.base_unet, tmp)
                with writing(tmp / STATE_NAME, intact):
                    (tmp / STATE_NAME).write_bytes(buf.getbuffer())
                write_json_atomic(tmp / CONFIG_NAME, self.config)
            logger.info("saved %s", final)
            if args.checkpoints_total_limit is not None:
                ckpts = [c for c in list_checkpoints(self.output_dir) if c != final]
                for old in ckpts[: max(0, len(ckpts) + 1 - args.checkpoints_total_limit)]:
                    logger.info("removing old checkpoint %s", old.name)
                    gone = old.with_name(old.name + ".removing")  # out of the listing at once, then deleted
                    os.replace(old, gone)
                    shutil.rmtree(gone, ignore_errors=True)
        acc.wait_for_everyone()

    def save_final_lora(self):
        """The finished run's files (``hub.save_final``: the LoRA with its metadata, peft/, scheduler/, the model
        card), never from non-finite weights."""
        if not models.lora_is_finite(self.base_unet):
            self.stop_non_finite("LoRA weights are")
        if self.accelerator.is_main_process:
            with writing(self.output_dir / models.LORA_WEIGHT_NAME):
                hub.save_final(self.base_unet, self.output_dir, self.sched.betas, self.config)
            logger.info("saved the final LoRA to %s (load with StableDiffusionXLPipeline.load_lora_weights; "
                        "README.md shows how)", self.output_dir)

    def stop_non_finite(self, what: str):
        """The NaN guard: stop the run (every process, on the same reduced numbers) before anything of this step
        is saved; the checkpoints on disk are the last good ones."""
        ckpts = list_checkpoints(self.output_dir)
        kept = f"the last checkpoint, {ckpts[-1]}, is intact" if ckpts else "no checkpoint had been written"
        raise UserError(f"step {self.global_step}: the {what} not finite (NaN or inf); the run stopped without saving "
                        f"this step ({kept}): lower --learning_rate or --max_grad_norm and resume with "
                        "--resume_from_checkpoint latest --allow_config_change learning_rate,max_grad_norm, or start "
                        "over in another --output_dir")

    def current_settings(self) -> dict:
        """This run's values of COMPARED_SETTINGS as training_config.json records them (resolved max steps, the
        learning rate after --scale_lr, accelerate's mixed precision, the global batch)."""
        a, acc = self.args, self.accelerator
        batch = a.train_batch_size * acc.num_processes * a.gradient_accumulation_steps
        steps = a.max_train_steps or math.ceil(a.num_train_epochs * len(self.dataset) / batch)
        return {**vars(a), "objective": self.objective_name, "global_batch_size": batch, "max_train_steps": steps,
                "mixed_precision": acc.mixed_precision,
                "learning_rate": a.learning_rate * batch if a.scale_lr else a.learning_rate}

    def plan_resume(self) -> tuple[Path, dict] | None:
        """Before any model loads: what this run continues, as (checkpoint folder, its training state), or None for
        a fresh start. One run per --output_dir: a folder that holds checkpoints or a final LoRA is continued only
        with --resume_from_checkpoint and the same settings (``check_same_run``); ``latest`` takes the newest
        readable checkpoint, saying in one line which unreadable one it skipped."""
        args, out = self.args, self.output_dir
        ckpts = list_checkpoints(out)
        final = (out / models.LORA_WEIGHT_NAME).is_file()
        current, allowed = self.current_settings(), set(getattr(args, "allow_config_change", None) or [])
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
                    check_same_run(self.folder_settings(held), current, allowed,
                                   f"the final LoRA in --output_dir {out}")
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
                check_same_run(self.folder_settings(held), current, allowed, f"--output_dir {out}")
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
                if self.accelerator.is_main_process:
                    logger.warning("%s: resuming from the previous checkpoint, %s", e, candidates[i + 1].name)
                continue
            if recorded is not None:
                check_same_run(recorded, current, allowed, f"checkpoint {path}")
            return path, state
        return None

    def folder_settings(self, held: str) -> dict:
        """The recorded settings of the run that --output_dir holds."""
        try:
            return json.loads((self.output_dir / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            raise UserError(f"--output_dir {self.output_dir} holds a run ({held}) without a readable {CONFIG_NAME} "
                            "to tell which: use another --output_dir") from None

    def load_checkpoint(self, path: Path, state: dict | None = None):
        logger.info("resuming from %s", path)
        if state is None:
            state = read_checkpoint(path)[1]
        models.load_lora_into(self.base_unet, path)
        if state.get("objective", self.objective_name) != self.objective_name:
            raise UserError(f"checkpoint {path} was trained with objective '{state['objective']}', "
                            f"not '{self.objective_name}': use another --output_dir")
        check_resumed_optimizer(path, self.args)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if state.get("scaler") is not None and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{path / STATE_NAME} does not fit this run's optimizer ({_why(e)}): resume with the "
                            "run's own settings, or use another --output_dir") from None
        self.global_step, self.samples_seen = state["global_step"], state["samples_seen"]
        self.skipped_images = state.get("skipped_images", 0)

    # --- one micro-batch ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def models_on_device(self):
        """The offloaded text encoders and VAE on the accelerator's device for the duration (validation)."""
        for m in self.offloaded:
            m.to(self.accelerator.device)
        try:
            yield
        finally:
            for m in self.offloaded:
                m.to("cpu")

    def conditioning(self, batch) -> dict:
        dev = self.accelerator.device
        prompt_embeds, pooled = models.encode_prompts(batch["captions"], self.tokenizers, self.text_encoders)
        ids = models.time_ids(batch["original_sizes"], batch["crop_top_lefts"], (self.args.resolution,) * 2)
        return {"prompt_embeds": to_device(prompt_embeds, dev, self.weight_dtype),
                "text_embeds": to_device(pooled, dev, self.weight_dtype),
                "time_ids": to_device(ids, dev, self.weight_dtype)}

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior (unscaled latents)."""
        pixels = pixels.to(self.accelerator.device, dtype=self.vae.dtype)
        mean, std = [], []
        for chunk in pixels.split(self.args.vae_encode_batch_size):
            dist = self.vae.encode(chunk).latent_dist
            mean.append(dist.mean)
            std.append(dist.std)
        return torch.cat(mean), torch.cat(std)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, positions) -> torch.Tensor:
        """Scaled posterior sample mean + std * z, z drawn per sample from (seed, stream position)."""
        dev = self.accelerator.device
        mean, std = to_device(mean, dev).float(), to_device(std, dev).float()
        z = to_device(per_sample_noise(self.args.seed, positions, tuple(mean.shape[1:]), stream=STREAM_VAE), dev)
        return (mean + std * z) * self.vae.config.scaling_factor

    def distill_context(self) -> DistillContext:
        compiled = self.args.compile_teacher
        eps = UNetEps(self.teacher_unet, dynamic_batch=compiled,
                      fresh_output=compiled and models.uses_cudagraphs(self.args.compile_mode))
        # Conditional + unconditional passes as one call where the call is small (<= half the batch), or always
        # (--cfg_batched), or never (--cfg_separate, the reference's way)
        a = self.args
        threshold = (a.teacher_max_batch or a.train_batch_size) // 2
        if a.cfg_separate or a.cfg_batched:
            threshold = 0 if a.cfg_separate else 10**9
        target = UNetEps(self.target_unet, dynamic_batch=compiled and self.merged is not None)
        if self.merged is not None:  # the adapter weights change at every optimizer step (and on resume)
            target = self.merged.refreshing(target, step=lambda: self.global_step)
        return DistillContext(teacher_eps=AdaptiveCFG(eps, a.w, threshold), student_eps_nograd=target,
                              step=self.step_fn, sched=self.sched, grid=self.grid,
                              timestep_scaling=self.args.timestep_scaling_factor, max_batch=self.args.teacher_max_batch)

    def prepare(self, batch) -> dict:
        """A micro-batch's inputs: x_t at each sample's start index, its timesteps and conditioning. Each
        sample's grid index and noise are drawn from (seed, stream position), so the result does not depend
        on how the global batch is split over processes."""
        acc, args = self.accelerator, self.args
        positions = batch["positions"]
        if "mean" in batch:  # precomputed (cmdistill.precompute): no VAE encoder, no text encoders
            latents = self.sample_latents(batch["mean"], batch["std"], positions)
            cond = {k: to_device(batch[k], acc.device, self.weight_dtype)
                    for k in ("prompt_embeds", "text_embeds", "time_ids")}
        else:
            latents = self.sample_latents(*self.posterior(batch["pixel_values"]), positions)
            cond = self.conditioning(batch)
        start = torch.cat([torch.randint(0, self.grid.N, (1,), generator=generator_for(args.seed, STREAM_T, p))
                           for p in positions])
        noise = to_device(per_sample_noise(args.seed, positions, tuple(latents.shape[1:]), stream=STREAM_NOISE),
                          latents.device)
        t = self.grid.timestep(start)
        return {"x_t": self.sched.add_noise(latents, noise, t), "t": t, "start": start, "cond": cond,
                "positions": positions, "skipped": batch["skipped"]}

    def loss_and_backward(self, prep: dict) -> torch.Tensor:
        """One micro-batch (``prepare``): the targets (no grad), then the student's forward and backward."""
        acc, args = self.accelerator, self.args
        x_t, t, start, cond = prep["x_t"], prep["t"], prep["start"], prep["cond"]
        ctx = self.distill_context()
        with acc.autocast():
            if args.trajectory_pairs > 1:
                x_t, t, cond, target = self.trajectory_pairs(ctx, x_t, start, t, cond, prep["positions"])
            elif args.reference_loop and self.objective_name == "direct_cm":
                with torch.no_grad():
                    target = solve_to_zero_reference(ctx.step, ctx.teacher_eps, x_t, start, cond, ctx.sched, ctx.grid)
            elif "pool_key" in prep:  # --teacher_lookahead: solved with the following batches' trajectories
                with torch.no_grad():
                    target = self.pool.result(prep["pool_key"])
            elif "teacher_step" in prep:  # CM with --teacher_lookahead: the teacher's step was issued ahead
                target = cm_target_from(ctx, *prep["teacher_step"].get(), cond)
            else:
                target = self.objective(ctx, x_t, start, cond)
            pred = consistency_fn(UNetEps(self.student_unet), x_t, t, cond, self.sched, args.timestep_scaling_factor)
        loss = distance(pred, target, args.loss_type, args.huber_c)
        acc.backward(loss)
        return loss.detach()

    def trajectory_pairs(self, ctx, x_t, start, t, cond, positions):
        """``--trajectory_pairs K`` (Direct CM): each sample's teacher trajectory gives its start pair and K-1
        pairs at later grid points (drawn from (seed, stream position)), all with the trajectory's x_0.
        Returns the K x B student inputs (x, t, cond) and their targets."""
        args, K = self.args, self.args.trajectory_pairs
        extra = torch.stack([extra_pair_indices(int(n), self.grid.N, generator_for(args.seed, STREAM_PAIRS, p), K - 1)
                             for n, p in zip(start.tolist(), positions)])
        target, states = direct_cm_trajectory_pairs(ctx, x_t, start, cond, extra)
        x_all = torch.cat([x_t.float(), states.transpose(0, 1).reshape(-1, *x_t.shape[1:])])
        t_all = torch.cat([t, self.grid.timestep(extra.t().reshape(-1))])

        def tile(v):
            return v.repeat(K, *([1] * (v.ndim - 1)))

        return x_all, t_all, {k: tile(v) for k, v in cond.items()}, tile(target)

    # --- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self):
        with self.models_on_device():
            self._validate()

    def _validate(self):
        acc, args = self.accelerator, self.args
        prompts = args.validation_prompts or [caption_text(self.dataset.ds[i][args.caption_column])
                                              for i in range(min(4, len(self.dataset)))]
        prompts = [p for p in prompts for _ in range(args.num_images_per_prompt)]
        res = args.resolution
        cond = self.conditioning({"captions": prompts, "original_sizes": [(res, res)] * len(prompts),
                                  "crop_top_lefts": [(0, 0)] * len(prompts)})
        h = res // self.vae_scale_factor
        idx = list(range(len(prompts)))
        x_T = per_sample_noise(args.seed, idx, (4, h, h)).to(acc.device)
        images = {}
        for k in args.num_inference_steps:
            with acc.autocast():
                x0 = student_sample(UNetEps(self.base_unet), x_T, cond, self.sched, self.grid, k,
                                    fresh_noise=lambda j: per_sample_noise(args.seed, idx, (4, h, h), stream=j + 1),
                                    timestep_scaling=args.timestep_scaling_factor)
            img = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
            images[k] = ((img.float().clamp(-1, 1) + 1) / 2).cpu()
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                for k, img in images.items():
                    tracker.writer.add_images(f"validation/{k}_steps", img, self.global_step, dataformats="NCHW")

    # --- the loop ----------------------------------------------------------------------------------
    def train(self):
        from tqdm.auto import tqdm

        acc, args = self.accelerator, self.args
        if acc.is_main_process:
            cfg = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in hub.redact(self.config).items()}
            acc.init_trackers(args.tracker_project_name, config=cfg)
        if self.precomputed is not None:
            loader = make_dataloader(self.precomputed, args.train_batch_size, acc.num_processes, acc.process_index,
                                     args.seed, self.samples_seen, args.dataloader_num_workers, collate_precomputed)
        else:
            loader = make_dataloader(self.dataset, args.train_batch_size, acc.num_processes, acc.process_index,
                                     args.seed, self.samples_seen, args.dataloader_num_workers)
        batches = iter(loader)
        logger.info("training %s: %d samples, %d steps of global batch %d (%d per device x %d processes x %d "
                    "accumulation)", self.objective_name, len(self.dataset), args.max_train_steps, self.global_batch,
                    args.train_batch_size, acc.num_processes, args.gradient_accumulation_steps)
        self.bar = bar = tqdm(total=args.max_train_steps, initial=self.global_step, desc=f"{self.objective_name} steps",
                              disable=not acc.is_local_main_process)
        log_path = self.output_dir / LOG_NAME
        if acc.is_main_process:
            truncate_log(log_path, self.global_step)
        self.unet.train()
        upcoming = self.upcoming(batches)
        while self.global_step < args.max_train_steps:
            t_step = time.perf_counter()
            losses, skipped, grad_norm = [], 0, None
            for _ in range(args.gradient_accumulation_steps):
                prep = next(upcoming)
                skipped += prep["skipped"]
                with acc.accumulate(self.unet):
                    loss = self.loss_and_backward(prep)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(self.params, args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            self.lr_scheduler.step()
            self.global_step += 1
            self.samples_seen += self.global_batch
            # The loss and the gradient norm reduced over processes: every process sees the same numbers (NaN guard).
            gn = grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm or 0.0))
            loss_mean, norm_mean = acc.reduce(torch.stack([torch.stack(losses).mean().float(), gn.to(acc.device)]),
                                              reduction="mean").tolist()
            self.skipped_images += int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum").item())
            logs = {"loss": loss_mean, "lr": self.lr_scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "skipped_images": self.skipped_images,
                    "step_s": time.perf_counter() - t_step}  # up to the loss's .item() above: the GPU is done
            if acc.device.type == "cuda":  # since the start, or since --checkpointing_budget_gib auto last re-planned
                logs["peak_mem_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
            acc.log(logs, step=self.global_step)
            if acc.is_main_process:
                with writing(log_path), open(log_path, "a") as f:
                    f.write(json.dumps({"step": self.global_step, **logs}) + "\n")
            for what, value in (("loss is", loss_mean), ("gradient norm is", norm_mean)):
                if not math.isfinite(value):
                    self.stop_non_finite(what)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.4g}")
            if args.checkpointing_budget_gib == "auto" and "calibrated" not in self.checkpointing:
                self.size_checkpointing()  # after the first step, and (on a GPU) once more after the second
            if args.checkpointing_steps and self.global_step % args.checkpointing_steps == 0:
                self.save_checkpoint()
            if acc.is_main_process and args.validation_steps and self.global_step % args.validation_steps == 0:
                self.validate()
        bar.close()
        acc.wait_for_everyone()
        self.save_final_lora()
        if acc.is_main_process:
            if self.skipped_images:
                logger.warning("%d unreadable images (or under %d px) were skipped", self.skipped_images,
                               MIN_IMAGE_SIDE)
            if args.push_to_hub:
                self.push_to_hub()
        acc.end_training()

    def upcoming(self, batches):
        """The prepared micro-batches of the rest of the run, in order. With ``--teacher_lookahead K`` the next
        K are prepared ahead. Direct CM: their teacher trajectories go to the pool, whose calls fill the room that
        the current batch's shrinking active set leaves (``solvers.TrajectoryPool``). CM: their teacher steps are
        issued at once (``devices.AheadOfTime``: on the current stream, where they put the CPU ahead of the GPU
        for the current step's launches, or on a second stream); the teacher is frozen: the same targets."""
        args = self.args
        total = (args.max_train_steps - self.global_step) * args.gradient_accumulation_steps
        ahead = args.teacher_lookahead
        direct = self.objective_name == "direct_cm"
        if ahead:
            ctx = self.distill_context()
            if direct:
                self.pool = TrajectoryPool(ctx.step, ctx.teacher_eps, ctx.sched, ctx.grid,
                                           args.teacher_max_batch or args.train_batch_size)
            else:  # CM: the next batches' teacher steps issued now (on this stream or a second one)
                side = AheadOfTime(self.accelerator.device,
                                   same_stream=getattr(args, "teacher_lookahead_stream", "same") == "same")
        queue: collections.deque = collections.deque()
        fetched = 0
        while fetched < total or queue:
            while fetched < total and len(queue) <= ahead:
                prep = self.prepare(next(batches))
                if ahead and direct:
                    prep["pool_key"] = fetched
                    self.pool.submit(fetched, prep["x_t"], prep["start"], prep["cond"])
                elif ahead:
                    def teacher_step(p=prep):
                        with self.accelerator.autocast():
                            return cm_teacher_step(ctx, p["x_t"], p["start"], p["cond"])

                    prep["teacher_step"] = side.issue(teacher_step, reads=[prep["x_t"], prep["cond"]])
                queue.append(prep)
                fetched += 1
            yield queue.popleft()

    def push_to_hub(self):
        args = self.args
        hub.push_run(self.output_dir, args.hub_model_id, args.hub_token, public=args.hub_public,
                     include_logs=args.push_logs, logging_dir=args.logging_dir)


def main(objective: str, argv=None):
    from .errors import exit_on_user_error

    @exit_on_user_error
    def run():
        args = training_parser(objective).parse_args(argv)
        validate_args(args)
        trainer = Trainer(args, objective)
        try:
            trainer.train()
        finally:  # an error message starts on a line of its own, after the progress bar
            if getattr(trainer, "bar", None) is not None:
                trainer.bar.close()

    run()
