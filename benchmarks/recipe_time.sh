#!/usr/bin/env bash
# Whole-recipe wall time on one GPU: the paper's own training script against ours, on the random full-size SDXL of
# random_sdxl.py (no download). Each stage prints "TIME <stage> <seconds>" and appends the run's per-step log to
# $LOGS; stages run in the order given, e.g.
#
#   PAPER_REPO=/path/to/direct-cms bash benchmarks/recipe_time.sh setup precompute ours_cold ours_warm paper
#
# PAPER_REPO is a checkout of the paper's repository (layer6ai-labs/direct-cms), used to time its scripts only.
# Stages: setup (model and IMAGES random pictures), precompute (scripts/precompute.sh), ours_cold / ours_warm (train_cm.sh for
# STEPS steps with an empty / the filled compile cache, COMPILE and the flags OURS_FLAGS as given), ours_dcm (the same
# for train_direct_cm.py), ours_full (the recipe's 250 steps; resumes), paper (the paper's train_cm.py for
# PAPER_STEPS steps, validation off: its metrics need weights from the hub), teacher_paper / teacher_ours (teacher
# references for the first CAPTIONS of the paper's training captions: its test_teacher.py with its metric modules
# replaced by stand-ins that score nothing, and scripts/test_teacher.sh with COMPILE and no metrics; generation and
# image files only). Steps are taken from each run's own log, image rates from the image files' times;
# benchmarks/RESULTS.md holds what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/recipe_time}
LOGS=${LOGS:-$WORK/logs}
STEPS=${STEPS:-5}
PAPER_STEPS=${PAPER_STEPS:-12}
IMAGES=${IMAGES:-256}  # 16 steps an epoch at batch 16: the paper's loader restarts its workers at each epoch
COMPILE=${COMPILE:-1}
CAPTIONS=${CAPTIONS:-32}
mkdir -p "$WORK" "$LOGS"
export MODEL_NAME=$WORK/sdxl VAE_PATH= TRAIN_DATA_DIR=$WORK/data PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

stage() {  # stage NAME TIMEOUT_S COMMAND...: run and time one stage
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s%N)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "TIME $name $(( ($(date +%s%N) - t0) / 1000000 )) ms rc=$rc"
  tail -n 3 "$LOGS/$name.log"
}

ours() {  # ours NAME TIMEOUT_S [flags]: scripts/train_cm.sh in $WORK/NAME
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" env OUTPUT_DIR="$WORK/$name" MAX_STEPS="${MAX_STEPS:-$STEPS}" VALIDATION_STEPS=0 \
    COMPILE="$COMPILE" bash scripts/train_cm.sh ${OURS_FLAGS:-} "$@"
  [ -f "$WORK/$name/train_log.jsonl" ] && cp "$WORK/$name/train_log.jsonl" "$LOGS/$name.steps.jsonl"
}

images() {  # images DIR B: the steady image rate from the files' times, after the first batch of B images
  python - "$1" "$2" <<'EOF'
import sys
from pathlib import Path
t, b = sorted(f.stat().st_mtime for f in Path(sys.argv[1]).rglob("*.jpg")), int(sys.argv[2])
rate = (len(t) - b) / (t[-1] - t[b - 1]) if len(t) > b and t[-1] > t[b - 1] else float("nan")
print(f"IMAGES {sys.argv[1]}: {len(t)} files, {rate:.4f} img/s after the first {b}")
EOF
}

for s in "$@"; do
  case $s in
    setup) stage setup 300 python benchmarks/random_sdxl.py --out "$MODEL_NAME" --data "$TRAIN_DATA_DIR" --images "$IMAGES" ;;
    precompute) stage precompute 300 bash scripts/precompute.sh ;;
    ours_cold) rm -rf "${TORCHINDUCTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cmdistill/torch_compile}"; ours ours_cold "${COLD_LIMIT:-300}" ;;
    ours_warm) ours ours_warm "${WARM_LIMIT:-150}" ;;
    ours_full) MAX_STEPS=250 ours ours_full "${FULL_LIMIT:-590}" ;;
    ours_dcm) SCRIPT=train_direct_cm.py ours ours_dcm "${DCM_LIMIT:-300}" ;;
    paper)  # its instance_metrics.py imports OpenAI's clip at the top; validation is off, so a stand-in will do
      mkdir -p "$WORK/stand_in" && echo 'def load(*a, **k): raise RuntimeError("OpenAI CLIP weights: not here")' \
        >"$WORK/stand_in/clip.py"
      stage paper "${PAPER_LIMIT:-200}" env PYTHONPATH="$WORK/stand_in:${PYTHONPATH:-}" bash -c "cd '$PAPER_REPO' && python train_cm.py \
        --pretrained_teacher_model='$MODEL_NAME' --output_dir='$WORK/paper' --mixed_precision=fp16 \
        --train_data_dir='$TRAIN_DATA_DIR' --resolution=1024 --dataloader_num_workers=8 --train_batch_size=16 \
        --vae_encode_batch_size=16 --gradient_accumulation_steps=1 --gradient_checkpointing --use_8bit_adam \
        --adam_weight_decay=1e-2 --lora_rank=64 --lora_alpha=64 --learning_rate=1e-4 --lr_scheduler=constant \
        --lr_warmup_steps=0 --solver=ddim --num_discr_timesteps=100 --w=9.0 --max_train_steps=$PAPER_STEPS \
        --checkpointing_steps=50 --checkpoints_total_limit=2 --validation_steps=100000 --seed=24 \
        --report_to=tensorboard" ;;
    teacher_paper)  # a copy of its repository with CAPTIONS captions and metric stand-ins (the weights are not here)
      rm -rf "$WORK/paper_eval" && cp -r "$PAPER_REPO" "$WORK/paper_eval" || exit 1
      head -n "$CAPTIONS" "$PAPER_REPO/data/train_captions.txt" >"$WORK/paper_eval/data/train_captions.txt"
      rm -f "$WORK/paper_eval/data/init_noise.pt"
      printf 'class InstanceMetrics:\n    def __init__(self, *a, **k): pass\n    def compute_instance_metrics(self, *a, **k): return 0.0, 0.0\n' \
        >"$WORK/paper_eval/instance_metrics.py"
      printf 'class DGMMetrics:\n    def __init__(self, *a, **k): pass\n    def compute_dgm_metrics(self, *a, **k): return {"run00": {}}\n' \
        >"$WORK/paper_eval/dgm_metrics.py"
      stage teacher_paper "${PAPER_LIMIT:-300}" bash -c "cd '$WORK/paper_eval' && python test_teacher.py \
        --pretrained_teacher_model='$MODEL_NAME' --output_dir='$WORK/teacher_paper' --weight_dtype=fp16 \
        --num_original_inference_steps=100 --num_images_per_prompt=2 --scheduler=ddim --guidance_scale=9.0 \
        --train_data_dir='$TRAIN_DATA_DIR' --dgm_metrics=fd --dgm_metrics_batch_size=8 --seed=24"
      images "$WORK/teacher_paper" 1 ;;
    teacher_ours)  # the same captions, no metrics
      head -n "$CAPTIONS" "$PAPER_REPO/data/train_captions.txt" >"$WORK/captions.txt"
      rm -rf "$WORK/teacher_ours"
      stage teacher_ours "${TEACHER_LIMIT:-450}" env OUTPUT_DIR="$WORK/teacher_ours" COMPILE="$COMPILE" DGM_METRICS=none \
        INSTANCE_METRICS=none bash scripts/test_teacher.sh --captions_file="$WORK/captions.txt" --num_log_images=0
      images "$WORK/teacher_ours" "${BATCH_SIZE:-16}" ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
