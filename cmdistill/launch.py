"""Run an entry point on every visible GPU, as the scripts/*.sh recipes do:

    python -m cmdistill.launch SCRIPT.py [ARGS...]      or      python -m cmdistill.launch -m MODULE [ARGS...]

One process per GPU through ``accelerate launch`` (explicit flags, so no ``accelerate config`` is
needed); ``NUM_GPUS`` overrides the count, ``ACCELERATE_ARGS`` adds flags. With one GPU or none it is
plain ``python``. On a machine without CUDA, ``NUM_GPUS=k`` (k > 1) starts k CPU processes (gloo;
``ACCELERATE_USE_CPU=1``, which accelerate needs to group CPU processes, is set for them).

Several machines: run the same command on each with ``NUM_MACHINES=M``, ``MACHINE_RANK`` (0 .. M-1),
``MAIN_PROCESS_IP`` (rank 0's address) and optionally ``MAIN_PROCESS_PORT`` (default 29500); every
machine starts ``NUM_GPUS`` processes (its visible GPUs by default, at least one).
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
    machines = int(os.environ.get("NUM_MACHINES", "").strip() or 1)
    if machines > 1:
        rank, ip = os.environ.get("MACHINE_RANK", "").strip(), os.environ.get("MAIN_PROCESS_IP", "").strip()
        if not rank or not ip:
            sys.exit("error: NUM_MACHINES > 1 needs MACHINE_RANK (0 .. NUM_MACHINES-1) and MAIN_PROCESS_IP "
                     "(the address of machine 0)")
        num_gpus = max(num_gpus, 1)
        nodes = ["--num_machines", str(machines), "--machine_rank", rank, "--main_process_ip", ip,
                 "--main_process_port", os.environ.get("MAIN_PROCESS_PORT", "").strip() or "29500"]
    elif num_gpus <= 1:
        return [sys.executable, *target, *args]
    else:
        nodes = ["--num_machines", "1"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_gpus * machines), *nodes, "--mixed_precision", "no", "--dynamo_backend", "no",
            *shlex.split(os.environ.get("ACCELERATE_ARGS", "")), *target, *args]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit("usage: python -m cmdistill.launch SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    n = 2 if argv[0] == "-m" else 1
    cmd = launch_command(argv[:n], argv[n:])
    if "accelerate.commands.launch" in cmd:
        import torch

        if not torch.cuda.is_available():  # CPU processes: accelerate forms a gloo group only when told
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
