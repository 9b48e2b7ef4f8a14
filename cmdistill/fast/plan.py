"""``--compile off|on|auto``: which compilation a training run gets, and (``auto``) whether its compile time is
repaid by the steps it makes faster (docs/method.md §11).

``on`` is the recipe's compiled set, measured per objective on an H200 (benchmarks/RESULTS.md, whole-recipe time):

* CM: every UNet block compiled once per block shape (regional compilation: the student, the teacher view and the
  merged target share the compiled code of a block class) and the target pass on merged weights. A whole-UNet
  compile of the teacher is no faster per CM step and costs minutes more to compile.
* Direct CM: the teacher compiled whole (dynamic batch, channels_last, freezing: its calls are most of the step)
  and the student's blocks.

``auto`` compiles on a GPU when ``steps x (eager step - compiled step) > compile time``, with the step times of
the recipe scaled to this run's work per step (pixels x samples per device) and the compile time of a cold cache,
or of a warm one where this machine's compile cache (``compile.compile_cache``) holds the same graphs. Each
compiled run records its measured compile time (first step minus a steady one) and step time in that cache; later
``auto`` decisions use them.

The evaluation programs (``test_teacher.py``, ``test.py``) decide the same way (``resolve_sampling``), counting
UNet calls instead of training steps: a teacher reference batch makes N x the solver's evaluations per step x the
guidance passes (2 N for DDIM with guidance), a student batch K; a compile is paid once per set of weights.
Where inductor cannot compile (no Triton), ``auto`` stays eager.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from ..files import atomic_write_text
from .compile import compile_cache

logger = logging.getLogger(__name__)
RECORD_NAME = "cmdistill_compile_record.json"
CHOICES = ("off", "on", "auto")


def choice(value: str) -> str:
    """A ``--compile`` value as given, with the scripts' ``1`` / ``0`` (``COMPILE=1``) read as on / off."""
    return {"1": "on", "0": "off"}.get(value, value)


FLAGS = ("compile_teacher", "teacher_channels_last", "teacher_freezing", "compile_blocks", "merged_target")

# Seconds on one H200 at 1024 px with 16 samples per device: the recipe's eager and compiled steps (precomputed
# inputs) and the compile time with an empty and with a filled cache (benchmarks/RESULTS.md, "The cost model of
# --compile auto", gives the source of each; the larger where two machines differed).
RECIPE_COSTS = {
    "cm": dict(eager_step_s=2.76, compiled_step_s=2.0, cold_compile_s=140.0, warm_compile_s=50.0),
    "direct_cm": dict(eager_step_s=34.0, compiled_step_s=22.8, cold_compile_s=200.0, warm_compile_s=100.0),
}


# The same for sampling (test_teacher.py, test.py): one no-grad call of the teacher's UNet on 16 samples at 1024 px,
# eager and compiled as COMPILE=1 compiles it (channels_last, freezing), and that compile (benchmarks/RESULTS.md,
# ibid.; bench.py's 16-bit rows of the teacher, also used for a student's LoRA UNet).
SAMPLING_COSTS = dict(eager_step_s=0.3210, compiled_step_s=0.2131, cold_compile_s=143.0, warm_compile_s=72.0)
SAMPLING_FLAGS = ("compile_channels_last", "compile_freezing")


def on_flags(objective: str, args) -> dict:
    """The flags that ``--compile on`` sets for ``objective``."""
    if objective == "cm":
        return dict(compile_blocks=True, merged_target=not args.lora_dropout)
    return dict(compile_teacher=True, teacher_channels_last=True, teacher_freezing=True, compile_blocks=True)


def record_key(objective: str, args, flags: dict | None = None) -> str:
    """What the compiled graphs depend on: objective, sizes, precision, versions, the card and the compile flags
    (``flags``, else those set in ``args``)."""
    flags = flags if flags is not None else {k: getattr(args, k, False) for k in FLAGS}
    return _key(objective, args.resolution, args.train_batch_size, args.mixed_precision, flags)


def sampling_key(args, kind: str) -> str:
    """``record_key`` of the evaluation's compiled UNet (``kind``: "teacher" or "student", with its LoRA): sizes,
    --weight_dtype and its compile options."""
    return _key(f"sample {kind}", args.resolution, args.batch_size, args.weight_dtype,
                {k: getattr(args, k, False) for k in SAMPLING_FLAGS})


def _key(kind: str, resolution: int, batch: int, precision: str, flags: dict) -> str:
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    on = ",".join(sorted(k for k, v in flags.items() if v))
    return f"{kind}|{resolution}px|b{batch}|{precision}|torch {torch.__version__}|{card}|{on}"


def record_path():
    """The compile record's file, in the compile cache folder."""
    return compile_cache() / RECORD_NAME


def read_record() -> dict:
    try:
        return json.loads(record_path().read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Estimate:
    steps: int
    saved_per_step_s: float
    compile_s: float
    cache: str  # "cold", "warm" or "measured": the first compile's
    unit: str = "steps"
    compiles: int = 1

    @property
    def repays(self) -> bool:
        return self.steps * self.saved_per_step_s > self.compile_s

    def __str__(self):
        return (f"{self.steps} {self.unit} x {self.saved_per_step_s:.2f} s saved = "
                f"{self.steps * self.saved_per_step_s:.0f} s {'>' if self.repays else '<='} {self.compile_s:.0f} s "
                f"to compile{f' {self.compiles} sets of weights' if self.compiles > 1 else ''} ({self.cache} cache)")


def estimate(objective: str, args, steps: int, record: dict | None = None) -> Estimate:
    """The time ``--compile on`` would save over ``steps`` steps, and its compile time, for this run's sizes."""
    return _estimate(RECIPE_COSTS[objective], record_key(objective, args, on_flags(objective, args)),
                     _work(args.resolution, args.train_batch_size), steps, record)


def estimate_sampling(args, kind: str, calls: int, loads: int = 1, record: dict | None = None) -> Estimate:
    """The same for the evaluation: ``calls`` UNet calls of ``--batch_size`` samples, over ``loads`` sets of
    weights (each compiled once: the first as the cache stands, the later ones on the graphs it left)."""
    return _estimate(SAMPLING_COSTS, sampling_key(args, kind), _work(args.resolution, args.batch_size), calls, record,
                     loads, unit="UNet calls")


def _work(resolution: int, batch: int) -> float:
    """Work of a step or call relative to the costs' 16 samples at 1024 px."""
    return (resolution / 1024) ** 2 * batch / 16


def _estimate(costs: dict, key: str, work: float, steps: int, record: dict | None, loads: int = 1,
              unit: str = "steps") -> Estimate:
    saved = (costs["eager_step_s"] - costs["compiled_step_s"]) * work
    entry = (record if record is not None else read_record()).get(key)
    warm = (entry or {}).get("warm_compile_s")
    warm, cache = (warm, "measured") if warm is not None else (costs["warm_compile_s"], "warm")
    first, cache = (costs["cold_compile_s"], "cold") if entry is None else (warm, cache)
    return Estimate(steps, saved, first + (loads - 1) * warm, cache, unit, loads)


def resolve(objective: str, args, device: torch.device, steps: int) -> str:
    """Sets the compile flags that ``args.compile`` asks for (``auto``: decided here) and returns what was decided,
    e.g. ``"auto: off (no GPU)"``; the individual flags given by hand stay set."""
    choice = getattr(args, "compile", "off") or "off"
    if choice == "off":
        return "off"
    if choice == "auto":
        if device.type != "cuda":
            return "auto: off (no GPU)"
        if not has_compiler():
            return f"auto: off ({NO_COMPILER})"
        if any(getattr(args, k, False) for k in FLAGS):
            return "auto: off (compile flags given by hand)"
        est = estimate(objective, args, steps)
        decided = f"auto: {'on' if est.repays else 'off'} ({est})"
        if not est.repays:
            return decided
    else:
        decided = "on"
    for k, v in on_flags(objective, args).items():
        setattr(args, k, getattr(args, k, False) or v)
    return decided


def resolve_sampling(args, kind: str, device: torch.device, calls: int, loads: int = 1) -> str:
    """``--compile off|on|auto`` of test_teacher.py / test.py (``kind``: "teacher" or "student"), for ``calls`` UNet
    calls of ``--batch_size`` samples planned over ``loads`` sets of weights: sets ``args.compile`` to "on" or
    "off" and returns what was decided, e.g. ``"auto: off (no GPU)"``. The compile options (``SAMPLING_FLAGS``)
    apply when it is on."""
    if args.compile != "auto":
        return args.compile
    if device.type != "cuda":
        decided = "auto: off (no GPU)"
    elif not has_compiler():
        decided = f"auto: off ({NO_COMPILER})"
    elif not calls:
        decided = "auto: off (nothing to generate)"
    else:
        est = estimate_sampling(args, kind, calls, loads)
        decided = f"auto: {'on' if est.repays else 'off'} ({est})"
    args.compile = "on" if decided.startswith("auto: on") else "off"
    return decided


def training_timer(objective: str, args) -> "CompileTimer":
    """The compile timer of a training run (inert when nothing is compiled)."""
    return CompileTimer(record_key(objective, args) if args.compile_teacher or args.compile_blocks else None)


def sampling_timer(args, kind: str) -> "CompileTimer":
    """The compile timer of an evaluation: its first two batches of one setting (inert when not compiled)."""
    return CompileTimer(sampling_key(args, kind) if args.compile == "on" else None, unit="a batch")


NO_COMPILER = "no Triton: inductor cannot compile for this GPU"


def has_compiler() -> bool:
    """Whether torch.compile's inductor can generate GPU code here (Triton installed and usable)."""
    from torch.utils._triton import has_triton

    return has_triton()


class CompileTimer:
    """Records, in the compile cache under ``key``, the compile time of a compiled run (its first step or batch
    minus its next one) and its step time, for later ``auto`` decisions; ``key`` None: records nothing."""

    def __init__(self, key: str | None, unit: str = "a step"):
        self.key, self.unit = key, unit
        self.first = None

    def observe(self, step_s: float):
        if self.key is None:
            return
        if self.first is None:
            self.first = step_s
            return
        record = read_record()
        entry = record.setdefault(self.key, {})
        kind = "warm_compile_s" if entry else "cold_compile_s"
        entry.update({kind: round(max(self.first - step_s, 0.0), 1), "step_s": round(step_s, 3)})
        path = record_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
        except OSError as e:  # a read-only cache folder costs later estimates, not this run
            logger.warning("could not record the compile time in %s: %s", path, e)
        logger.info("compile time %.0f s (first %s %.1f s, then %.2f s %s), recorded in %s", self.first - step_s,
                    self.unit.split()[-1], self.first, step_s, self.unit, path)
        self.key = None
