# Sourced by the training and evaluation scripts: COMPILE (auto, the default; 1 or on; 0 or off) as the programs'
# --compile value (auto, on, off), or a one-line error.
case ${COMPILE:-auto} in
  1|on) COMPILE=on ;; 0|off) COMPILE=off ;; auto) COMPILE=auto ;;
  *) echo "error: COMPILE=$COMPILE: use auto (the default), 1 or 0" >&2; exit 2 ;;
esac
