"""The optimizer and the batch arithmetic: AdamW (bitsandbytes' 8-bit AdamW as the paper, probed on the device
first), the per-device batch from the global batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import UserError, one_line
from .run_folder import CONFIG_NAME

logger = logging.getLogger("cmdistill")



OPTIMIZER_8BIT = "bitsandbytes.optim.AdamW8bit"
DEFAULT_TRAIN_BATCH_SIZE = 16  # per device, when --global_batch_size is not given (the paper: 16 on one GPU)


def adamw8bit_unavailable(device: torch.device) -> str | None:
    """Why bitsandbytes' AdamW8bit cannot run on ``device``, or None when a probe step there gave AdamW's first
    update (one parameter on the 8-bit blockwise path, one small enough for the 32-bit path)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or a build that does not load here
        return f"bitsandbytes does not import ({one_line(e, 120)})"
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
