#!/usr/bin/env bash
# CM distillation of SDXL with the paper's recipe (SPEC §7): 1024 px, batch 16 per GPU, lr 1e-4 constant,
# fp16, gradient checkpointing, 250 steps, checkpoints every 50, seed 24, DDIM teacher, N = 100, w = 9.
# Every path and setting is an environment variable; extra flags are passed through, e.g.
#   SOLVER=heun OUTPUT_DIR=outputs/cm_heun bash scripts/train_cm.sh --max_train_steps 500
# A rerun resumes from the latest checkpoint in OUTPUT_DIR. COMPILE=1 runs the teacher's passes through
# torch.compile and compiles every UNet block for the student (--compile_teacher --compile_blocks: ~3.5 minutes
# of compiling on the first step; then, on an H200, a CM step 1.22x and a student step 1.43x faster than
# without), and for CM runs the target pass on weight copies with the LoRA update folded in (--merged_target:
# ~4.8 GB more GPU memory; on an H100 the CM step 1.848 vs 1.918 s; MERGED_TARGET=0 leaves it out, e.g. for
# --lora_dropout), and compiles the teacher in channels_last with inductor's freezing (--teacher_channels_last
# --teacher_freezing: on an H100 the teacher forward 0.221 instead of 0.236-0.239 s, a few minutes more compiling;
# CHANNELS_LAST=0 / FREEZING=0 leave them out, e.g. FREEZING=0 for --compile_mode): benchmarks/RESULTS.md. Add
# --checkpointing_budget_gib auto (or a number of GiB) to keep activations where the card has room. Direct CM
# solves the next two batches' teacher trajectories in the room of each step's teacher calls
# (--teacher_lookahead 2, the default; same targets).
set -euo pipefail
# Less fragmentation: with it the paper recipe fits in 24 GiB of GPU memory (benchmarks/RESULTS.md).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
cd "$(dirname "$0")/.."
VAE_PATH=${VAE_PATH-madebyollin/sdxl-vae-fp16-fix}   # empty: the teacher's own VAE
SCRIPT=${SCRIPT:-train_cm.py}
SOLVER=${SOLVER:-ddim}
N=${N:-100}
W=${W:-9.0}
NAME=$(basename "$SCRIPT" .py | sed 's/^train_//')
python3 -m cmdistill.launch "$SCRIPT" \
  --pretrained_teacher_model "${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}" \
  ${VAE_PATH:+--pretrained_vae_model_name_or_path "$VAE_PATH"} \
  --train_data_dir "${TRAIN_DATA_DIR:-data/preprocessed_11k}" \
  --output_dir "${OUTPUT_DIR:-runs/${NAME}}" \
  --resolution "${RESOLUTION:-1024}" \
  --train_batch_size "${BATCH_SIZE:-16}" \
  --max_train_steps "${MAX_STEPS:-250}" \
  --checkpointing_steps "${CHECKPOINT_STEPS:-50}" \
  --validation_steps "${VALIDATION_STEPS:-50}" \
  --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 \
  --adam_weight_decay 1e-2 --max_grad_norm 1.0 --use_8bit_adam \
  --mixed_precision "${MIXED_PRECISION:-fp16}" --gradient_checkpointing \
  --seed "${SEED:-24}" \
  --solver "$SOLVER" --num_discr_timesteps "$N" --w "$W" \
  --loss_type "${LOSS_TYPE:-l2}" \
  --lora_rank 64 --lora_alpha 64 \
  --dataloader_num_workers "${NUM_WORKERS:-4}" \
  --resume_from_checkpoint latest \
  $([ "${COMPILE:-0}" != 0 ] && echo --compile_teacher --compile_blocks) \
  $([ "${COMPILE:-0}" != 0 ] && [ "$NAME" = cm ] && [ "${MERGED_TARGET:-1}" != 0 ] && echo --merged_target) \
  $([ "${COMPILE:-0}" != 0 ] && [ "${CHANNELS_LAST:-1}" != 0 ] && echo --teacher_channels_last) \
  $([ "${COMPILE:-0}" != 0 ] && [ "${FREEZING:-1}" != 0 ] && echo --teacher_freezing) \
  "$@"
