"""Command-line flags of the training scripts, compatible with the paper's launch lines (SPEC §7)."""

from __future__ import annotations

import argparse

from .models import COMPILE_MODES, DEFAULT_LORA_TARGETS


def _comma_list(s: str) -> list[str]:
    return [x.strip() for x in s.replace(" ", ",").split(",") if x.strip()]


def _budget(s: str):
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is neither a number of GiB nor 'auto'") from None


def training_parser(objective: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"Distill an SDXL teacher into a LoRA student with the {objective} objective "
                    "(Vouitsis et al., arXiv 2411.08954).")
    a = p.add_argument
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_teacher_model", default="stabilityai/stable-diffusion-xl-base-1.0",
                   help="hub id or local SDXL pipeline folder")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a VAE to use instead of the teacher's (paper: madebyollin/sdxl-vae-fp16-fix)")
    g.add_argument("--teacher_revision", default=None)
    g.add_argument("--revision", default=None)
    g.add_argument("--cache_dir", default=None)
    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", default=f"runs/{objective}")
    g.add_argument("--seed", type=int, default=24, help="paper: 24")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--tracker_project_name", default=f"{objective}-distill")
    g.add_argument("--checkpointing_steps", type=int, default=50, help="paper: every 50 steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-* folder, or 'latest'")
    g.add_argument("--allow_config_change", type=_comma_list, default=[],
                   help="settings that may differ from the resumed run's (comma-separated, e.g. max_train_steps,w); "
                        "without it a resume with another value is refused (cmdistill.train.COMPARED_SETTINGS)")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_model_id", default=None)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None)
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="image folder with metadata.csv (file_name,text)")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--interpolation_type", default="bilinear")
    g.add_argument("--center_crop", action="store_true", help="default: random crop (paper)")
    g.add_argument("--random_flip", action="store_true", help="default: no flip (paper)")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--precomputed_dir", default="data/precomputed",
                   help="where scripts/precompute.sh writes VAE latents + text embeddings; used when valid")
    g.add_argument("--no_precomputed", action="store_true", help="ignore precomputed latents and embeddings")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=16, help="per device (paper: 16 on one GPU)")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (paper: 250); overrides epochs")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="lr *= accumulation x batch x processes")
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--checkpointing_budget_gib", type=_budget, default=None,
                   help="selective checkpointing (implies --gradient_checkpointing): keep the activations of the "
                        "blocks dearest to recompute, up to this many GiB (estimated per block by a meta-device "
                        "dry run, which runs ~1.2-1.4x low under bf16 autocast); same gradients, less recomputation. "
                        "At batch 16, 1024 px: 20 -> peak 48.6 GiB, 40 -> 70.2 GiB (45.2 GiB with --compile_blocks). "
                        "'auto': sized after the first step from the card's memory left (0 when none is), and "
                        "once more after the second from the measured cost of what the first plan kept")
    g = p.add_argument_group("distillation (SPEC §2-§6)")
    g.add_argument("--w", type=float, default=9.0, help="teacher guidance, Imagen form (paper: 9.0)")
    g.add_argument("--solver", default="ddim", choices=["ddim", "euler", "heun"])
    g.add_argument("--num_discr_timesteps", type=int, default=100, help="N, must divide 1000 (paper: 100)")
    g.add_argument("--loss_type", default="l2", choices=["l2", "huber"])
    g.add_argument("--huber_c", type=float, default=0.001)
    g.add_argument("--timestep_scaling_factor", type=float, default=10.0)
    g.add_argument("--lora_rank", type=int, default=64)
    g.add_argument("--lora_alpha", type=float, default=64)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--lora_target_modules", type=_comma_list, default=list(DEFAULT_LORA_TARGETS),
                   help="comma-separated module names")
    g.add_argument("--vae_encode_batch_size", type=int, default=8)
    g.add_argument("--teacher_max_batch", type=int, default=None,
                   help="most samples per teacher call in the Direct CM loop (memory bound)")
    g.add_argument("--compile_teacher", action="store_true",
                   help="torch.compile the teacher's passes (batch dimension dynamic): faster teacher forwards "
                        "after a compile of a few minutes on first use; same values to kernel rounding")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the teacher (--compile_teacher): reduce-overhead replays a CUDA "
                        "graph per batch size, for the small calls at the end of the Direct CM loop (measured on "
                        "an H200: no gain over default, benchmarks/RESULTS.md)")
    g.add_argument("--teacher_freezing", action="store_true",
                   help="with --compile_teacher: inductor's freezing for the teacher (its frozen weights become "
                        "constants of the compiled graph): on an H100 the teacher forward 0.233 vs 0.239 s "
                        "(0.221 vs 0.227 s with --teacher_channels_last, two calls), 1.5-2.5 min more compiling; no "
                        "measurable extra memory, ~0.6 GiB (copies of the convolution weights) with "
                        "--teacher_channels_last; same values to kernel rounding (COMPILE=1 adds it)")
    g.add_argument("--teacher_channels_last", action="store_true",
                   help="with --compile_teacher: the compiled teacher (and --merged_target's compiled pass) in "
                        "channels_last, convolutions in cuDNN's native layout, group norms with per-channel "
                        "statistics (models.compile_unet): on an H100 the teacher forward 0.227 vs 0.236-0.239 s; "
                        "same values to kernel rounding (COMPILE=1 adds it)")
    g.add_argument("--compile_student", action="store_true",
                   help="torch.compile the student's forward and backward as one graph (LoRA and checkpointing "
                        "included); same values to kernel rounding; its compile took over 6 minutes for SDXL: "
                        "--compile_blocks is the measured alternative")
    g.add_argument("--compile_blocks", action="store_true",
                   help="torch.compile each ResNet and transformer block of the UNet (regional compilation): the "
                        "student's forward, backward and recomputation, and the CM target pass, run compiled "
                        "blocks (~2 minutes to compile on the first step); same values to kernel rounding. "
                        "Measured on an H200: student step 1.43x, CM step 1.22x faster")
    g.add_argument("--merged_target", action="store_true",
                   help="CM: the target pass (the student, no grad) runs on a copy of the adapted layers' weights "
                        "with the LoRA update folded in, refreshed after every optimizer step, at the teacher's cost per "
                        "forward instead of the base matmuls plus two rank-r matmuls per layer (with "
                        "--compile_teacher compiled whole, default mode); the same function, each merged weight "
                        "rounded once to bf16; ~4.8 GB more GPU memory for SDXL; not with --lora_dropout")
    g.add_argument("--trajectory_pairs", type=int, default=1,
                   help="Direct CM opt-in, not the paper's objective: each teacher trajectory also gives K-1 "
                        "training pairs at random later points of the same trajectory (same target), so the "
                        "student batch is K x --train_batch_size for the teacher cost of --train_batch_size")
    g.add_argument("--teacher_lookahead", type=int, default=None,
                   help="Direct CM: prepare the next K batches ahead and solve their teacher trajectories in the "
                        "room that this batch's shrinking active set leaves in each teacher call, so that the calls "
                        "run full (~50 instead of ~95 per step at batch 16, N = 100); same targets up to rounding. "
                        "Default 2 (every call full) for train_direct_cm.py. CM: the next K batches' teacher steps "
                        "are issued ahead (same targets: the teacher is frozen), on the current CUDA stream by "
                        "default (--teacher_lookahead_stream); default 0")
    g.add_argument("--teacher_lookahead_stream", choices=["same", "side"], default="same",
                   help="CM with --teacher_lookahead: 'same' issues the next batch's teacher step at the start of "
                        "the step on the current stream (the GPU runs it first while the CPU moves on, so the "
                        "CPU is ahead when the student's backward launches its many small kernels); 'side' on a "
                        "second stream that shares the GPU with the step (costs one teacher pass of memory)")
    g.add_argument("--cfg_batched", action="store_true",
                   help="always run the conditional and unconditional teacher passes as one batch of 2B (default: "
                        "as one batch only for calls of at most half the batch, where the GPU would idle)")
    g.add_argument("--cfg_separate", action="store_true",
                   help="always run the conditional and unconditional teacher passes separately (the reference)")
    g.add_argument("--reference_loop", action="store_true",
                   help="Direct CM: the reference's masked full-batch loop instead of per-sample steps")
    g = p.add_argument_group("validation")
    g.add_argument("--validation_steps", type=int, default=200)
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 4])
    g.add_argument("--num_images_per_prompt", type=int, default=1)
    return p
