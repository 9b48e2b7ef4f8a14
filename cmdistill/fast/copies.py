"""Host-to-device copies that do not make the CPU wait for the GPU (docs/method.md §11).

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory synchronizes: the CPU waits until the GPU
has finished everything queued before it, and the GPU then idles until the CPU has issued the next work. The
training and sampling loops move many small host tensors (timesteps, schedule coefficients, index sets of the
active samples). ``to_device`` stages such a tensor in pinned memory and copies it asynchronously in stream order,
which gives the same values without the wait (PyTorch's caching host allocator keeps the pinned block until the
copy has run). The science modules take it as an injected copy function (``NoiseSchedule(copy=...)``,
``UNetEps(copy=...)``), never import it.
"""

from __future__ import annotations

import torch


def to_device(t, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.as_tensor(t).to(device, dtype)``; a CPU tensor bound for a GPU is copied without a host sync."""
    t = torch.as_tensor(t)
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)  # on the host, before the copy
    if t.device.type == "cpu" and device.type == "cuda":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)
