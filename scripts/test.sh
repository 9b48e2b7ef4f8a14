#!/usr/bin/env bash
# Student samples with the paper's settings (docs/method.md §8-§9): the LoRA of a training run, 1, 2, 4 and 8
# consistency steps on the N = 100 grid, from the teacher's noise, scored against the teacher's samples
# (FID, FD-DINO, CLIP, aesthetic, ODE solving error). The references must match the run (N, w, resolution,
# noise: test.py checks). Resumable: rerun to continue.
#
#   OUTPUT_DIR=runs/direct_cm bash scripts/test.sh [more test.py flags, e.g. --lora_weights checkpoint-100]
#
# Every path and setting is an environment variable (defaults below). Runs one process per visible GPU
# (NUM_GPUS=k to choose), plain python on one GPU or none. Print the table afterwards with
#   python -m cmdistill.results results/teacher-ddim runs/cm runs/direct_cm
# COMPILE=auto (the default) compiles the UNet on a GPU when the UNet calls planned repay the compile time (the
# estimate is printed), COMPILE=1 always, COMPILE=0 never; compiled, it runs in channels_last
# (--compile_channels_last; CHANNELS_LAST=0 leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."

OUTPUT_DIR=${OUTPUT_DIR:-runs/cm}                           # the training run (LoRA + training_config.json)
TEACHER_DIR=${TEACHER_DIR:-results/teacher-ddim/train_gen_images/100_steps/9.0_gscale}
MODEL_NAME=${MODEL_NAME:-}                                  # empty: training_config.json's teacher
VAE_PATH=${VAE_PATH:-}                                      # empty: training_config.json's VAE
INIT_NOISE=${INIT_NOISE:-}                                  # empty: the teacher folder's noise
IMAGE_FORMAT=${IMAGE_FORMAT:-jpg}                           # jpg (the paper's) or png
NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-1 2 4 8}
LORA_WEIGHTS=${LORA_WEIGHTS:-auto}
LORA_SCALE=${LORA_SCALE:-1.0}
WEIGHT_DTYPE=${WEIGHT_DTYPE:-fp16}
BATCH_SIZE=${BATCH_SIZE:-16}
DGM_METRICS=${DGM_METRICS:-fd}
INSTANCE_METRICS=${INSTANCE_METRICS:-clip_score aesthetic}
METRICS_WEIGHTS_DIR=${METRICS_WEIGHTS_DIR:-}
source scripts/compile_choice.sh                            # COMPILE: auto (default), 1 or 0

# shellcheck disable=SC2086  # the step and metric lists are word-split on purpose
python -m cmdistill.launch test.py \
    --output_dir="$OUTPUT_DIR" \
    --train_data_dir="$TEACHER_DIR" \
    ${MODEL_NAME:+--pretrained_teacher_model="$MODEL_NAME"} \
    ${VAE_PATH:+--pretrained_vae_model_name_or_path="$VAE_PATH"} \
    ${INIT_NOISE:+--init_noise="$INIT_NOISE"} \
    --num_inference_steps $NUM_INFERENCE_STEPS \
    --lora_weights="$LORA_WEIGHTS" \
    --lora_scale="$LORA_SCALE" \
    --weight_dtype="$WEIGHT_DTYPE" \
    --batch_size="$BATCH_SIZE" \
    --image_format="$IMAGE_FORMAT" \
    --compile="$COMPILE" \
    $([ "$COMPILE" != off ] && [ "${CHANNELS_LAST:-1}" != 0 ] && echo --compile_channels_last) \
    --dgm_metrics $DGM_METRICS \
    --instance_metrics $INSTANCE_METRICS \
    ${METRICS_WEIGHTS_DIR:+--metrics_weights_dir="$METRICS_WEIGHTS_DIR"} \
    "$@"
