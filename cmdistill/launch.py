"""Run an entry point on every visible GPU, as the scripts/*.sh recipes do:

    python -m cmdistill.launch SCRIPT.py [ARGS...]      or      python -m cmdistill.launch -m MODULE [ARGS...]

One process per GPU through ``accelerate launch`` (explicit flags, so no ``accelerate config`` is
needed; multi-node users run ``accelerate launch`` with their own config instead); ``NUM_GPUS``
overrides the count, ``ACCELERATE_ARGS`` adds flags. With one GPU or none it is plain ``python``.
On a machine without CUDA, ``NUM_GPUS=k`` (k > 1) starts k CPU processes (gloo).
"""

from __future__ import annotations

import os
import shlex
import sys


def launch_command(target: list[str], args: list[str], num_gpus: int | None = None) -> list[str]:
    """``target`` is ``[script]`` or ``["-m", module]``."""
    if num_gpus is None:
        env = os.environ.get("NUM_GPUS", "").strip()
        if env:
            num_gpus = int(env)
        else:
            import torch

            num_gpus = torch.cuda.device_count()
    if num_gpus <= 1:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_gpus),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *shlex.split(os.environ.get("ACCELERATE_ARGS", "")), *target, *args]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit("usage: python -m cmdistill.launch SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    n = 2 if argv[0] == "-m" else 1
    cmd = launch_command(argv[:n], argv[n:])
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
