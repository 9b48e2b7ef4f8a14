"""Progress of the project's programs, readable in a terminal and in a log file alike.

``Progress`` (and ``track`` over an iterable) is a tqdm bar when its stream is a terminal. Written to a file or
a pipe it prints plain lines instead, never a carriage return, at each tenth of the work and at least once a
minute::

    cm steps 120/250 loss 0.0123 1.9 s/step

``quiet_libraries`` turns off the loading, download and dataset-preparation bars of transformers, diffusers,
huggingface_hub and datasets: the programs report their own progress.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
LINE_EVERY_S = 60.0  # a plain line at least this often, however slow a tenth of the work is
EPS = 1e-6  # counts closer than this are the same (fractions of a batch add up to a float near its size)


def quiet_libraries(errors_only: bool = False) -> None:
    """No progress bars from the Hugging Face libraries; ``errors_only``: nor their log messages below ERROR
    (transformers, diffusers)."""
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:  # datasets reads the variable when imported; a program without it is not slowed
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if errors_only:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def _number(x: float) -> str:
    return str(round(x)) if abs(x - round(x)) < EPS else f"{x:.1f}"


class Progress:
    """``total`` units of work named ``desc``; ``update(amount, **info)`` as they are done (``info``, e.g. the
    loss, is shown beside the count); ``close()`` at the end. Nothing is shown unless ``enabled`` (e.g. on the
    main process only); ``bar_options`` go to tqdm."""

    def __init__(self, total: float | None, desc: str, unit: str = "it", enabled: bool = True, initial: float = 0,
                 stream=None, **bar_options):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = self._shown = self._start = initial
        self.info: dict = {}
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, **bar_options)
        self._t0 = self._last = time.monotonic()
        self._tenth = total / 10 if total else None
        self._next = self._after(initial)

    def _after(self, n: float) -> float:
        return (math.floor(n / self._tenth + EPS) + 1) * self._tenth if self._tenth else math.inf

    def update(self, amount: float = 1, **info) -> None:
        self.n += amount
        if self.bar is not None:
            self.bar.update(amount)
            if info:
                self.bar.set_postfix(info)
            return
        self.info.update(info)
        now = time.monotonic()
        if self.enabled and (self.n >= self._next - EPS or now - self._last >= LINE_EVERY_S):
            self._line(now)

    def _line(self, now: float) -> None:
        parts = [f"{self.desc} {_number(self.n)}" + (f"/{_number(self.total)}" if self.total else "")]
        parts += [f"{k} {v}" for k, v in self.info.items()]
        done = self.n - self._start
        if done > 0 and now > self._t0:
            per = (now - self._t0) / done
            parts.append(f"{per:.1f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
        print(" ".join(parts), file=self.stream, flush=True)
        self._shown, self._last, self._next = self.n, now, self._after(self.n)

    def close(self) -> None:
        """The bar closed, or the last count as a line if it was not shown yet."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and abs(self.n - self._shown) > EPS:
            self._line(time.monotonic())
        self.bar, self.enabled = None, False  # a second close shows nothing


def track(items: Iterable[T], desc: str, unit: str = "it", enabled: bool = True, stream=None) -> Iterator[T]:
    """``items`` one by one, each counted by a ``Progress`` once it is handled."""
    progress = Progress(len(items) if hasattr(items, "__len__") else None, desc, unit, enabled, stream=stream)
    try:
        for item in items:
            yield item
            progress.update(1)
    finally:
        progress.close()
