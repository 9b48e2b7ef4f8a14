"""Run a script on every visible GPU: ``python -m cmdistill.evaluation.launch SCRIPT [ARGS...]``.

One process per GPU through ``accelerate launch`` (explicit flags, so no ``accelerate config`` is
needed); ``NUM_GPUS`` overrides the count. With one GPU or none it is plain ``python``. On a machine
without CUDA, ``NUM_GPUS=k`` (k > 1) starts k CPU processes (gloo), which exercises the sharding.
"""

from __future__ import annotations

import os
import sys


def launch_command(script: str, args: list[str], num_gpus: int | None = None) -> list[str]:
    if num_gpus is None:
        env = os.environ.get("NUM_GPUS", "").strip()
        if env:
            num_gpus = int(env)
        else:
            import torch

            num_gpus = torch.cuda.device_count()
    if num_gpus <= 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_gpus),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m cmdistill.evaluation.launch SCRIPT [ARGS...]")
    cmd = launch_command(argv[0], argv[1:])
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
