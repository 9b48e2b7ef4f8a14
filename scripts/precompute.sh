#!/usr/bin/env bash
# Encode the training set once (VAE posteriors + SDXL text embeddings) so that training steps run
# neither the VAE encoder nor the text encoders. Takes the variables of scripts/train_cm.sh that the cache
# depends on (MODEL_NAME, VAE_PATH, TRAIN_DATA_DIR, RESOLUTION, MIXED_PRECISION, SEED; NUM_GPUS, NUM_MACHINES,
# ...) and passes extra flags through (python -m cmdistill.precompute --help lists them); training finds the
# cache by itself when model, data, resolution, crop, seed and precision match.
set -euo pipefail
cd "$(dirname "$0")/.."
VAE_PATH=${VAE_PATH-madebyollin/sdxl-vae-fp16-fix}   # empty: the teacher's own VAE
python3 -m cmdistill.launch -m cmdistill.precompute \
  --pretrained_teacher_model "${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}" \
  ${VAE_PATH:+--pretrained_vae_model_name_or_path "$VAE_PATH"} \
  --train_data_dir "${TRAIN_DATA_DIR:-data/preprocessed_11k}" \
  --resolution "${RESOLUTION:-1024}" \
  --mixed_precision "${MIXED_PRECISION:-fp16}" \
  --seed "${SEED:-24}" \
  --dataloader_num_workers "${NUM_WORKERS:-4}" \
  "$@"
