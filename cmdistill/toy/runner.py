"""The project's programs run in-process, each call recorded as the one shell command that reproduces it.

A study (the demo, the sweep) is a list of program calls (``python train_cm.py ...``, ``python test.py ...``,
``python -m cmdistill.precompute ...``). Started as processes, every call pays the import of torch, diffusers and
transformers and the first builds of their models (seconds each on a CPU, more than a toy training step costs on
a GPU). Here a call runs the same script or module in a long-lived worker, exactly as ``python`` would run it (same
``sys.argv``, ``__name__ == "__main__"``, the script's own file), with its output sent to a log file. A worker
runs with a fixed number of torch threads (the recorded command sets ``OMP_NUM_THREADS`` to it), so a call's
numbers do not depend on the worker that ran it or on the calls before it: each program seeds what it draws.

``Workers(n)``: ``n`` worker processes (spawned, one thread each by default: on a small shared CPU two OpenMP
threads competing for busy cores run these small networks far slower than one), or ``n = 0``: this process.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import runpy
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, one_line

ROOT = Path(__file__).resolve().parents[2]
# Settings of every call: offline, quiet, no tokenizer threads (the worker's own threads are torch's), the metrics'
# images read in the process (toy images: a loader process costs more than it saves).
ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
       "CMDISTILL_METRICS_WORKERS": "0"}


@dataclass
class Call:
    """One program call: ``program`` is a script of the repository (``train_cm.py``) or ``-m module``."""

    program: str
    args: list
    log: Path
    label: str = ""
    argv: list = field(init=False)

    def __post_init__(self):
        self.argv = [str(a) for a in self.args]
        self.log = Path(self.log)

    def command(self, threads: int) -> str:
        """The shell command that reproduces this call, from the repository root."""
        env = " ".join(f"{k}={v}" for k, v in {**ENV, "OMP_NUM_THREADS": threads}.items() if k != "PYTHONWARNINGS")
        return f"{env} python {self.program} " + " ".join(shlex.quote(a) for a in self.argv)


def set_threads(threads: int) -> None:
    os.environ.update({**ENV, "OMP_NUM_THREADS": str(threads)})
    import torch

    torch.set_num_threads(threads)


def _init_worker() -> None:
    import multiprocessing
    import warnings

    # A spawned worker inherits 'spawn' as its start method; a program started by python has the platform's
    # default (e.g. for the data loaders of the metrics).
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    warnings.simplefilter("ignore")
    os.chdir(ROOT)


def run_call(call: Call, threads: int) -> float:
    """Run ``call`` in this process, its output (Python's and the libraries') appended to ``call.log``; returns
    its seconds. A program that exits with an error is a :class:`UserError` quoting the end of the log."""
    call.log.parent.mkdir(parents=True, exist_ok=True)
    set_threads(threads)  # at every call: a program may set its own (the toy world's build does), for the worker
    t = time.time()
    with open(call.log, "a") as f:
        f.write(f"\n$ {call.command(threads)}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(call.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    argv, cwd, code, streams = sys.argv, os.getcwd(), 0, (sys.stdout, sys.stderr)
    try:
        # The interpreter's own streams (on file descriptors 1 and 2), which a program's log handlers may keep.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        os.chdir(ROOT)
        if call.program.startswith("-m "):
            module = call.program[3:]
            sys.argv = [module, *call.argv]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [call.program, *call.argv]
            runpy.run_path(str(ROOT / call.program), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except Exception as e:  # noqa: BLE001 -- reported with the log, as a process's traceback would be
        import traceback

        traceback.print_exc()
        code = one_line(e)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.argv = argv
        sys.stdout, sys.stderr = streams
        os.chdir(cwd)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for d in (*saved, fd):
            os.close(d)
    if code:
        tail = "\n".join(call.log.read_text(errors="replace").splitlines()[-15:])
        raise UserError(f"{call.label or call.program} failed ({code}); see {call.log}:\n{tail}")
    return time.time() - t


def run_calls(calls: list[Call], threads: int) -> list[float]:
    """The calls in order, in this process; their seconds."""
    return [run_call(c, threads) for c in calls]


class Workers:
    """``n`` worker processes that each run lists of calls in order (``submit``), or ``n = 0``: this process
    runs them at submit time. ``threads`` torch threads per worker."""

    def __init__(self, n: int, threads: int = 1):
        self.n, self.threads = n, threads
        self.pool = None
        if n > 0:
            import multiprocessing as mp

            self.pool = cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker)

    def submit(self, calls: list[Call]) -> cf.Future:
        if self.pool is not None:
            return self.pool.submit(run_calls, calls, self.threads)
        f: cf.Future = cf.Future()
        try:
            f.set_result(run_calls(calls, self.threads))
        except UserError as e:
            f.set_exception(e)
        return f

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(cancel=exc_type is not None)


@dataclass
class Job:
    """Calls run in order by one worker, once the jobs named in ``after`` are done."""

    name: str
    calls: list
    after: tuple = ()


def run_jobs(workers: Workers, jobs: list[Job], may_start=lambda job: True, on_done=lambda job, seconds: None,
             on_start=lambda job: None) -> dict:
    """Run ``jobs`` on ``workers``, each as soon as its ``after`` jobs are done and a worker is free, in list order
    among those ready. ``may_start(job)`` False: the job and the jobs after it are not started (e.g. a time
    limit); the running ones finish. Returns {name: [seconds of each call]} of the jobs that ran. A failed job
    stops the others from starting and its error is raised once the running ones are done."""
    pending, running, done, error = list(jobs), {}, {}, None
    names, stopped, slots = {j.name for j in jobs}, False, max(1, workers.n)
    while pending or running:
        ready = [j for j in pending if all(a in done or a not in names for a in j.after)]
        while ready and len(running) < slots and error is None and not stopped:
            job = ready.pop(0)
            if not may_start(job):
                stopped = True
                break
            pending.remove(job)
            on_start(job)
            running[workers.submit(job.calls)] = job
        if not running:
            break
        finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
        for f in finished:
            job = running.pop(f)
            try:
                done[job.name] = f.result()
            except Exception as e:  # noqa: BLE001 -- the first error is raised when the pool is idle
                error = error or e
                continue
            on_done(job, done[job.name])
    if error is not None:
        raise error
    return done


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
