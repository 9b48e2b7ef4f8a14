"""Host-to-device copies that do not make the CPU wait for the GPU, and work issued ahead on a second stream.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory synchronizes: the CPU waits until the GPU
has finished everything queued before it, and the GPU then idles until the CPU has issued the next work. The
training and sampling loops move many small host tensors (timesteps, schedule coefficients, index sets of the
active samples), so each of those copies used to cost a drain of the GPU queue. ``to_device`` stages such a
tensor in pinned memory and copies it asynchronously in stream order, which gives the same values without the
wait (PyTorch's caching host allocator keeps the pinned block until the copy has run).
"""

from __future__ import annotations

import torch

ASYNC_COPIES = True  # the benchmark's reference rows switch it off to time the synchronizing copies


def to_device(t, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.as_tensor(t).to(device, dtype)``; a CPU tensor bound for a GPU is copied without a host sync."""
    t = torch.as_tensor(t)
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)  # on the host, before the copy
    if ASYNC_COPIES and t.device.type == "cpu" and device.type == "cuda":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


class AheadOfTime:
    """Work issued ahead of where its result is needed. ``same_stream=False``: on a second CUDA stream, so that
    the GPU runs it in the gaps of the work issued meanwhile on the current stream (the two then share the GPU).
    ``same_stream=True``: at once on the current stream, where the GPU runs it before what comes after; with
    little CPU work per unit of GPU work (a compiled teacher pass), the CPU gets ahead of the GPU and its
    slower stretches later (an eager backward's launches) no longer leave the GPU idle. On a CPU: at once.
    ``issue`` takes a function and the tensors it reads; ``Pending.get()`` returns its result, on a second
    stream after making the current stream wait for that work alone (an event)."""

    def __init__(self, device, same_stream: bool = False):
        device = torch.device(device)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and not same_stream else None

    def issue(self, fn, reads=()) -> "Pending":
        if self.stream is None:
            return Pending(fn(), None, None)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # its inputs, written on the current stream, are ready first
        with torch.cuda.stream(self.stream):
            out = fn()
            done = self.stream.record_event()
        for t in _tensors(reads):  # their memory is not reused before this work has read it
            t.record_stream(self.stream)
        return Pending(out, done, main)


class Pending:
    def __init__(self, out, done, main):
        self.out, self.done, self.main = out, done, main

    def get(self):
        if self.done is not None:
            self.main.wait_event(self.done)
            for t in _tensors(self.out):  # allocated on the side stream, used on this one from now on
                t.record_stream(self.main)
            self.done = None
        return self.out


def _tensors(x):
    """The CUDA tensors in a (nested) tuple / list / dict."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_cuda else []
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []
