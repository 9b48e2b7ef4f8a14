#!/usr/bin/env bash
# Shared launcher of the scripts/*.sh recipes: runs "$@" (a Python entry point and its flags)
# through `accelerate launch` on all visible GPUs, or on NUM_GPUS of them; plain python on a CPU.
set -euo pipefail
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
if [[ "$NUM_GPUS" -ge 2 ]]; then
  exec accelerate launch --multi_gpu --num_processes "$NUM_GPUS" ${ACCELERATE_ARGS:-} "$@"
elif [[ "$NUM_GPUS" -eq 1 ]]; then
  exec accelerate launch --num_processes 1 ${ACCELERATE_ARGS:-} "$@"
else
  echo "no GPU visible: running on the CPU (set NUM_GPUS to override)" >&2
  exec python3 "$@"
fi
