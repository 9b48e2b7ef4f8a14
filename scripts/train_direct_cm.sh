#!/usr/bin/env bash
# Direct CM distillation of SDXL with the paper's recipe (docs/method.md §7); same settings and variables as
# scripts/train_cm.sh, which it runs with the Direct CM entry point.
set -euo pipefail
SCRIPT=train_direct_cm.py exec bash "$(dirname "$0")/train_cm.sh" "$@"
