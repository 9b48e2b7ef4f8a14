#!/usr/bin/env bash
# Build the toy world (data, toy metric encoder, VAE, SDXL-architecture teacher, evidence) on a CPU,
# deterministically from a seed and with nothing downloaded. Resumable: rerun to complete a build;
# stages already built with the same settings are skipped.
#
#   bash scripts/build_toy_world.sh                 # the full world in toy/world (~20-30 min, 2 cores)
#   REDUCED=1 OUT=/tmp/toy bash scripts/build_toy_world.sh   # the CI world (~1-2 min)
#   bash scripts/build_toy_world.sh --teacher_steps 8000     # any flag of `python -m cmdistill.toy build`
#
# Then load the teacher with
#   cmdistill.models.load_teacher("$OUT/teacher")   or   --pretrained_teacher_model "$OUT/teacher"
# and the training data with --train_data_dir "$OUT/data/train".
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-toy/world}
SEED=${SEED:-0}
THREADS=${THREADS:-2}            # torch CPU threads
REDUCED=${REDUCED:-0}            # 1: the small world of the tests

extra=()
if [ "$REDUCED" = "1" ]; then
    extra+=(--reduced)
fi
python -m cmdistill.toy build --out "$OUT" --seed "$SEED" --threads "$THREADS" ${extra[@]+"${extra[@]}"} "$@"
