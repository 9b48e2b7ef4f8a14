"""Command-line flags of the training scripts (compatible with the paper's launch lines: same names and
meanings) and of ``python -m cmdistill.precompute``. Every flag has help text and shows its default."""

from __future__ import annotations

import argparse

import copy
import importlib.util

from .errors import UserError
from .fast import plan
from .fast.compile import COMPILE_MODES
from .models import DEFAULT_LORA_TARGETS, SDXL_BASE
from .solvers import SOLVERS
from .trackers import REPORT_TO

OBJECTIVE_NAMES = {"cm": "CM", "direct_cm": "Direct CM"}
OPTIMIZER_FALLBACKS = ("none", "adamw")


class HelpFormatter(argparse.HelpFormatter):
    """The help of the training, precompute and evaluation programs: each flag's default after its help text, unless
    the text states it (``default:``); a list space-separated, as it is typed."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default:" in text:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        return text + f" (default: {default})".replace("%", "%%")


def _comma_list(s: str) -> list[str]:
    return [x.strip() for x in s.replace(" ", ",").split(",") if x.strip()]


def _budget(s: str):
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is neither a number of GiB nor 'auto'") from None


# --- groups shared by the training scripts and precompute (the cache key must see the same defaults) ----------
def add_model_flags(g) -> None:
    g.add_argument("--pretrained_teacher_model", default=SDXL_BASE,
                   help="hub id or local folder of the SDXL pipeline to distill")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a VAE to use instead of the teacher's (paper: madebyollin/sdxl-vae-fp16-fix); "
                        "None: the teacher's VAE, kept in fp32")
    g.add_argument("--teacher_revision", default=None, help="hub revision of the teacher's UNet")
    g.add_argument("--revision", default=None, help="hub revision of the text encoders, tokenizers and VAE")
    g.add_argument("--cache_dir", default=None, help="hub download cache for models and data sets")


def add_data_flags(g) -> None:
    g.add_argument("--train_data_dir", default=None,
                   help="image folder with metadata.csv (file_name,text), e.g. data/preprocessed_11k")
    g.add_argument("--dataset_name", default=None, help="a hub data set instead of --train_data_dir")
    g.add_argument("--dataset_config_name", default=None, help="configuration of --dataset_name")
    g.add_argument("--image_column", default="image", help="column holding the images")
    g.add_argument("--caption_column", default="text", help="column holding the captions")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N samples")
    g.add_argument("--resolution", type=int, default=1024, help="training resolution in pixels (multiple of 8)")
    g.add_argument("--interpolation_type", default="bilinear",
                   help="resize filter: a torchvision InterpolationMode name")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of the paper's random crop")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data loading worker processes")
    g.add_argument("--precomputed_dir", default="data/precomputed",
                   help="folder of the VAE latent and text embedding caches (written by scripts/precompute.sh; "
                        "training uses the one that matches its flags)")


def training_parser(objective: str) -> argparse.ArgumentParser:
    name = OBJECTIVE_NAMES.get(objective, objective)
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description=f"Distill an SDXL teacher into a LoRA student with the {name} objective (Vouitsis et al., "
                    f"arXiv 2411.08954). scripts/train_{objective}.sh runs the paper's recipe: these defaults "
                    "plus the fp16-fix VAE, fp16, gradient checkpointing, 8-bit AdamW, 250 steps.")

    g = p.add_argument_group("models")
    add_model_flags(g)

    g = p.add_argument_group("data")
    add_data_flags(g)
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips (paper: none)")
    g.add_argument("--no_precomputed", action="store_true", help="ignore a matching --precomputed_dir cache")

    g = p.add_argument_group("paper recipe: distillation")
    g.add_argument("--w", type=float, default=9.0, help="teacher guidance scale, Imagen form (paper: 9)")
    g.add_argument("--solver", default="ddim", choices=list(SOLVERS), help="teacher ODE solver")
    g.add_argument("--num_discr_timesteps", type=int, default=100,
                   help="N, discretization steps of the teacher ODE; must divide 1000 (paper: 100)")
    g.add_argument("--loss_type", default="l2", choices=["l2", "huber"], help="distance to the target")
    g.add_argument("--huber_c", type=float, default=0.001, help="Huber loss parameter (--loss_type huber)")
    g.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                   help="timestep scaling of the consistency boundary conditions")
    g.add_argument("--lora_rank", type=int, default=64, help="LoRA rank of the student")
    g.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA inputs")
    g.add_argument("--lora_target_modules", type=_comma_list, default=list(DEFAULT_LORA_TARGETS),
                   help="comma-separated names of the UNet modules that get LoRA")

    g = p.add_argument_group("paper recipe: optimisation")
    g.add_argument("--seed", type=int, default=24,
                   help="seed of timesteps, noise, crops and data order (paper: 24)")
    g.add_argument("--global_batch_size", type=int, default=None,
                   help="samples per optimizer step over all processes and accumulation steps; sets the per-device "
                        "batch to it / (processes x accumulation), which must divide (scripts: 16, the paper's) "
                        "(default: unset: --train_batch_size per device)")
    g.add_argument("--train_batch_size", type=int, default=None,
                   help="per-device batch (the paper's flag; it ran one GPU) (default: 16, or "
                        "--global_batch_size / (processes x accumulation) when that is given)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps (paper: 250); None: --num_train_epochs")
    g.add_argument("--num_train_epochs", type=int, default=100, help="epochs, when --max_train_steps is not given")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (paper: 1e-4)")
    g.add_argument("--scale_lr", action="store_true", help="multiply the learning rate by the global batch")
    g.add_argument("--lr_scheduler", default="constant", help="a diffusers schedule name (paper: constant)")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warmup optimizer steps")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' AdamW8bit (paper: on); where it cannot run: see --optimizer_fallback")
    g.add_argument("--optimizer_fallback", default="none", choices=OPTIMIZER_FALLBACKS,
                   help="with --use_8bit_adam where AdamW8bit cannot run (bitsandbytes missing or unsupported "
                        "device): 'none' stops with an error, 'adamw' trains with torch.optim.AdamW (fp32 states); "
                        "training_config.json records the optimizer that ran")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (paper: 1e-2)")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (paper: 1)")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="autocast precision, LoRA weights stay fp32 (paper: fp16); None: accelerate's setting")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute every UNet block's activations in the backward (paper: on)")

    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", default=f"runs/{objective}", help="run folder: LoRA, checkpoints, logs, config")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                   help="the trackers of the losses and validation images (accelerate's)")
    g.add_argument("--tracker_project_name", default=f"{objective}-distill", help="tracker run name")
    g.add_argument("--checkpointing_steps", type=int, default=50,
                   help="checkpoint every N optimizer steps (paper: 50); 0 = never")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep at most this many checkpoints; None: keep all")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-* folder, or 'latest'")
    g.add_argument("--allow_config_change", type=_comma_list, default=[],
                   help="settings that may differ from the resumed run's (comma-separated, e.g. max_train_steps); "
                        "without it a resume with another value is refused (cmdistill.run_folder.COMPARED_SETTINGS)")
    g.add_argument("--push_to_hub", action="store_true",
                   help="upload the final LoRA, its PEFT adapter, scheduler and model card (not checkpoints or config)")
    g.add_argument("--hub_token", default=None, help="hub token for --push_to_hub, never recorded; None: HF_TOKEN or "
                   "the stored `hf auth login`")
    g.add_argument("--hub_model_id", default=None, help="hub repository for --push_to_hub; None: the run's folder name")
    g.add_argument("--hub_public", action="store_true", help="--push_to_hub makes a public repository (default: private)")
    g.add_argument("--push_logs", action="store_true",
                   help="--push_to_hub uploads train_log.jsonl and the TensorBoard logs too")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_steps", type=int, default=200, help="sample validation images every N steps; 0 = never")
    g.add_argument("--validation_prompts", nargs="*", default=None,
                   help="validation captions; None: the first 4 training captions")
    g.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 4],
                   help="student sampling steps of the validation images")
    g.add_argument("--num_images_per_prompt", type=int, default=1, help="validation images per caption")

    g = p.add_argument_group("speed and memory (same results up to rounding unless stated)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs (rounds more)")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention where installed; otherwise PyTorch's SDPA, said in one log line")
    g.add_argument("--checkpointing_budget_gib", type=_budget, default=None,
                   help="selective checkpointing (implies --gradient_checkpointing): keep the activations of the "
                        "blocks dearest to recompute, up to this many GiB (estimated); 'auto': sized from the "
                        "card's free memory after the first steps")
    g.add_argument("--vae_encode_batch_size", type=int, default=8, help="images per VAE encoder call")
    g.add_argument("--teacher_max_batch", type=int, default=None,
                   help="most samples per teacher call in the Direct CM loop; None: the batch")
    g.add_argument("--compile", default="auto", type=plan.choice, choices=plan.CHOICES,
                   help="torch.compile the recipe's compiled set (CM: every block + the merged target; Direct CM: "
                        "the whole teacher + the student's blocks); auto: on a GPU when the planned steps repay "
                        "the compile time (estimated, logged); off: eager, or the flags below by hand")
    g.add_argument("--compile_teacher", action="store_true",
                   help="torch.compile the teacher's passes (dynamic batch); compiles on first use")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of --compile_teacher (none that replays CUDA graphs)")
    g.add_argument("--teacher_freezing", action="store_true",
                   help="with --compile_teacher: inductor's freezing (weights become graph constants)")
    g.add_argument("--teacher_channels_last", action="store_true",
                   help="with --compile_teacher: the compiled teacher in channels_last, with per-channel group norms")
    g.add_argument("--compile_blocks", action="store_true",
                   help="torch.compile each ResNet and transformer block of the UNet (regional compilation)")
    g.add_argument("--merged_target", action="store_true",
                   help="CM: the target pass on weight copies with the LoRA update folded in (one bf16 rounding "
                        "per weight; more memory; not with --lora_dropout)")
    g.add_argument("--teacher_lookahead", type=int, default=None,
                   help="prepare the next K batches ahead: Direct CM fills each teacher call with their "
                        "trajectories, CM issues their teacher steps early; None: 2 for Direct CM, 0 for CM")
    return p


def precompute_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m cmdistill.precompute``: those the cached numbers depend on, and where they go."""
    p = argparse.ArgumentParser(
        prog="python -m cmdistill.precompute", formatter_class=HelpFormatter,
        description="Encode the training set once (VAE posterior mean and std at the first epoch's crop, both SDXL "
                    "text embeddings and time ids) into --precomputed_dir. A training run with the same model, "
                    "data, resolution, crop, seed and precision flags finds the cache by itself.")
    g = p.add_argument_group("models")
    add_model_flags(g)
    g = p.add_argument_group("data")
    add_data_flags(g)
    g.add_argument("--seed", type=int, default=24, help="seed of the random crops (the training run's --seed)")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="dtype of the encoders and of the cache (the training run's --mixed_precision)")
    g.add_argument("--vae_encode_batch_size", type=int, default=8, help="images per VAE encoder call")
    return p


def validate_args(args):
    """The checks of the training flags that need no model (one line naming the flag and the fix)."""
    from .trackers import check_trackers

    check_trackers(args.report_to)
    if args.checkpointing_budget_gib not in (None, "auto") and args.checkpointing_budget_gib < 0:
        raise UserError(f"--checkpointing_budget_gib {args.checkpointing_budget_gib:g} must be >= 0 (GiB of "
                        "activations kept un-checkpointed; 0 = checkpoint every block)")
    from .optimizer import resolve_batch_size
    from .schedule import check_grid_size

    check_grid_size(1000, args.num_discr_timesteps)  # before any model loads: SDXL's T (the Trainer checks the model's)
    for flag in ("teacher_freezing", "teacher_channels_last"):
        if getattr(args, flag, False) and not args.compile_teacher:
            raise UserError(f"--{flag} applies to the compiled teacher: add --compile_teacher")
    if getattr(args, "teacher_freezing", False) and args.compile_mode not in (None, "default"):
        raise UserError(f"--teacher_freezing applies to torch.compile's default mode: drop --compile_mode "
                        f"{args.compile_mode} or --teacher_freezing")
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
    if (getattr(args, "teacher_lookahead", 0) or 0) < 0:
        raise UserError(f"--teacher_lookahead {args.teacher_lookahead}: must be >= 0 (0 = off)")
