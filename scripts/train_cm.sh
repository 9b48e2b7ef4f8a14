#!/usr/bin/env bash
# CM distillation of SDXL with the paper's recipe: 1024 px, random crop, global batch 16 (over all GPUs),
# 8-bit AdamW, lr 1e-4 constant, fp16, gradient checkpointing, 250 steps, checkpoints every 50, seed 24, DDIM
# teacher, N = 100, w = 9. Every path and setting is an environment variable; extra flags are passed through, e.g.
#   SOLVER=heun OUTPUT_DIR=outputs/cm_heun bash scripts/train_cm.sh --max_train_steps 500
# It runs one process per visible GPU (NUM_GPUS=k to choose; NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP,
# MAIN_PROCESS_PORT for several machines: cmdistill/launch.py); GLOBAL_BATCH (default 16, the paper's) is split
# over them, so a bigger global batch is an explicit GLOBAL_BATCH=... . OPTIMIZER_FALLBACK=adamw trains with
# torch's AdamW where bitsandbytes' AdamW8bit cannot run (default: a one-line error).
# A rerun resumes from the latest checkpoint in OUTPUT_DIR. COMPILE=auto (the default) compiles on a GPU when
# the planned steps repay the compile time (the estimate is logged), COMPILE=1 always, COMPILE=0 never (then add
# single compile flags by hand, e.g. --compile_blocks; see --compile in `python train_cm.py --help`). Compiled
# graphs stay in a cache folder that later runs reuse (TORCHINDUCTOR_CACHE_DIR, else ~/.cache/cmdistill/
# torch_compile); timings in benchmarks/RESULTS.md. Add
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
source scripts/compile_choice.sh
if [ -n "${BATCH_SIZE:-}" ]; then
  echo "error: BATCH_SIZE (per GPU) is replaced by GLOBAL_BATCH (all GPUs together, default 16): set GLOBAL_BATCH" >&2
  exit 2
fi
python3 -m cmdistill.launch "$SCRIPT" \
  --pretrained_teacher_model "${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}" \
  ${VAE_PATH:+--pretrained_vae_model_name_or_path "$VAE_PATH"} \
  --train_data_dir "${TRAIN_DATA_DIR:-data/preprocessed_11k}" \
  --output_dir "${OUTPUT_DIR:-runs/${NAME}}" \
  --resolution "${RESOLUTION:-1024}" \
  --global_batch_size "${GLOBAL_BATCH:-16}" \
  --max_train_steps "${MAX_STEPS:-250}" \
  --checkpointing_steps "${CHECKPOINT_STEPS:-50}" \
  --validation_steps "${VALIDATION_STEPS:-50}" \
  --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 \
  --adam_weight_decay 1e-2 --max_grad_norm 1.0 --use_8bit_adam --optimizer_fallback "${OPTIMIZER_FALLBACK:-none}" \
  --mixed_precision "${MIXED_PRECISION:-fp16}" --gradient_checkpointing \
  --seed "${SEED:-24}" \
  --solver "$SOLVER" --num_discr_timesteps "$N" --w "$W" \
  --loss_type "${LOSS_TYPE:-l2}" \
  --lora_rank 64 --lora_alpha 64 \
  --dataloader_num_workers "${NUM_WORKERS:-4}" \
  --resume_from_checkpoint latest \
  --compile "$COMPILE" \
  "$@"
