#!/usr/bin/env bash
# Teacher reference samples with the paper's settings (docs/method.md §8-§9): DDIM, N = 100, w = 9, one image per
# training caption at the model's own size (1024 px for SDXL), saved as {i}.jpg (JPEG quality 75) and scored
# against the raw real training images. Resumable: rerun to continue.
#
#   bash scripts/test_teacher.sh [more test_teacher.py flags, e.g. --max_prompts 64]
#
# Every path and setting is an environment variable (defaults below). Runs one process per visible GPU
# (NUM_GPUS=k to choose), plain python on one GPU or none. COMPILE=auto (the default) compiles the UNet on a GPU
# when the UNet calls planned repay the compile time (the estimate is printed; the full reference set does),
# COMPILE=1 always, COMPILE=0 never; compiled, it runs in channels_last with inductor's freezing
# (--compile_channels_last --compile_freezing; CHANNELS_LAST=0 / FREEZING=0 leave them out).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_NAME=${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}
VAE_PATH=${VAE_PATH-madebyollin/sdxl-vae-fp16-fix}          # empty: the teacher's own VAE
TRAIN_DATA_DIR=${TRAIN_DATA_DIR:-data/preprocessed_11k}  # scripts/get_laion_data.sh preprocessed_11k
OUTPUT_DIR=${OUTPUT_DIR:-results/teacher-ddim}
INIT_NOISE=${INIT_NOISE:-}                                  # e.g. data/init_noise.pt (scripts/make_init_noise.py)
SCHEDULER=${SCHEDULER:-ddim}
NUM_ORIGINAL_INFERENCE_STEPS=${NUM_ORIGINAL_INFERENCE_STEPS:-100}
GUIDANCE_SCALE=${GUIDANCE_SCALE:-9.0}
RESOLUTION=${RESOLUTION:-}                                  # empty: the init-noise file's size, else the model's
IMAGE_FORMAT=${IMAGE_FORMAT:-jpg}                           # jpg (the paper's) or png
WEIGHT_DTYPE=${WEIGHT_DTYPE:-fp16}
BATCH_SIZE=${BATCH_SIZE:-16}
SEED=${SEED:-24}
DGM_METRICS=${DGM_METRICS:-fd}
INSTANCE_METRICS=${INSTANCE_METRICS:-clip_score aesthetic}
METRICS_WEIGHTS_DIR=${METRICS_WEIGHTS_DIR:-}
source scripts/compile_choice.sh                            # COMPILE: auto (default), 1 or 0

# shellcheck disable=SC2086  # the metric lists are word-split on purpose
python -m cmdistill.launch test_teacher.py \
    --pretrained_teacher_model="$MODEL_NAME" \
    ${VAE_PATH:+--pretrained_vae_model_name_or_path="$VAE_PATH"} \
    --train_data_dir="$TRAIN_DATA_DIR" \
    --output_dir="$OUTPUT_DIR" \
    ${INIT_NOISE:+--init_noise="$INIT_NOISE"} \
    --scheduler="$SCHEDULER" \
    --num_original_inference_steps="$NUM_ORIGINAL_INFERENCE_STEPS" \
    --guidance_scale="$GUIDANCE_SCALE" \
    ${RESOLUTION:+--resolution="$RESOLUTION"} \
    --image_format="$IMAGE_FORMAT" \
    --weight_dtype="$WEIGHT_DTYPE" \
    --batch_size="$BATCH_SIZE" \
    --compile="$COMPILE" \
    $([ "$COMPILE" != off ] && [ "${CHANNELS_LAST:-1}" != 0 ] && echo --compile_channels_last) \
    $([ "$COMPILE" != off ] && [ "${FREEZING:-1}" != 0 ] && echo --compile_freezing) \
    --seed="$SEED" \
    --dgm_metrics $DGM_METRICS \
    --instance_metrics $INSTANCE_METRICS \
    ${METRICS_WEIGHTS_DIR:+--metrics_weights_dir="$METRICS_WEIGHTS_DIR"} \
    "$@"
