#!/usr/bin/env python
"""Side-by-side benchmark of the REFERENCE behaviour and OURS on an SDXL-architecture pipeline.

Builds every SDXL component at full size with random weights from configs (no download): the
SDXL base UNet (2,567,463,684 parameters, asserted), the SDXL VAE, the CLIP ViT-L and OpenCLIP
bigG text encoders, and the real CLIP tokenizer (``cmdistill.tiny.write_clip_tokenizer``). Then it
times, in one run on one card, with the project's own code (solvers, guidance, objectives,
sampling, models):

* the teacher forward (FLOPs counted once with FlopCounterMode; TFLOP/s), eager and ``--compile``;
* one CM training step and one Direct CM training step (teacher target + LoRA student
  forward/backward with gradient checkpointing + AdamW), for the reference knobs, for ours, and
  for one knob changed at a time;
* teacher-reference images per second (100 DDIM steps, w = 9) and 4-step student images per second.

Every measurement is isolated: an out-of-memory error or any other failure is recorded in its row
and the next one still runs. ``--tiny`` runs the same code paths on the tiny random SDXL
(``cmdistill.tiny.tiny_sdxl_components``) on the CPU in well under a minute (the CPU test).

    python benchmarks/bench.py --json out.json            # the full GPU run (~5 min on one H100)
    python benchmarks/bench.py --tiny --device cpu        # smoke run of every code path
    torchrun --nproc_per_node=2 benchmarks/bench.py --only cm_step_ours,direct_cm_step_ours,teacher_images_ours
                                                          # the same on 2 GPUs at once (scaling)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402,F401  (knob rows patch it)

from cmdistill import checkpointing, devices, models  # noqa: E402
from cmdistill.guidance import AdaptiveCFG, GuidedEps, UNetEps  # noqa: E402
from cmdistill.objectives import (DistillContext, cm_target, cm_target_from, cm_teacher_step,  # noqa: E402
                                  direct_cm_target, distance)
from cmdistill.sampling import consistency_fn, student_sample, teacher_sample  # noqa: E402
from cmdistill.schedule import Grid, NoiseSchedule  # noqa: E402
from cmdistill.solvers import TrajectoryPool, get_solver, solve_to_zero_reference  # noqa: E402
from cmdistill.train import make_optimizer  # noqa: E402

T0 = time.perf_counter()
# Several processes (torchrun / accelerate launch, one per GPU): each runs every measurement on its own
# batch B at the same time, gradients are all-reduced as DDP does, and rank 0 reports (see dist_setup).
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def log(msg: str) -> None:
    if RANK == 0:
        print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` of n samples (None or 0: one slice of all n)."""
    size = n if not size or size >= n else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def backward_in_micro_batches(loss_of, n: int, micro_batch: int | None, backward) -> torch.Tensor:
    """The ``micro_batch`` knob: the gradient of the batch-mean loss with the student's forward and backward
    run ``micro_batch`` samples at a time (``loss_of(sl)``: the mean loss of samples ``sl``, weighted by their
    share of the batch), so that only one part's activations live at a time. Measured slower than
    checkpointing the whole batch on an H200 (RESULTS.md): small batches leave the GPU waiting on launches.
    Returns the batch's loss."""
    total = None
    parts = micro_batches(n, micro_batch)
    for sl in parts:
        loss = loss_of(sl)
        if len(parts) > 1:
            loss = loss * ((sl.stop - sl.start) / n)
        backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total


def barrier():
    if WORLD > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------------
# SDXL base 1.0 architecture (configs of stabilityai/stable-diffusion-xl-base-1.0, random weights)
# --------------------------------------------------------------------------------------------------
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_UNET_PARAMS = 2_567_463_684
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025,
)
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", **_CLIP_COMMON)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu", **_CLIP_COMMON)
# Parameter counts of the real SDXL components (checked by tests/test_bench.py on the meta device).
SDXL_VAE_PARAMS, CLIP_L_PARAMS, CLIP_BIGG_PARAMS = 83_653_863, 123_060_480, 694_659_840

CAPTIONS = ["a red cat sleeping on a velvet sofa", "a lighthouse on a cliff at dusk, oil painting",
            "a bowl of ramen", "portrait of an old fisherman, dramatic light, 85mm",
            "a futuristic city skyline with flying cars", "watercolor of a fox in the snow", "a cup of coffee",
            "an astronaut riding a horse on mars, highly detailed digital art", "mountains at dawn",
            "a vintage car parked in front of a diner, 1950s", "macro photo of a dew drop on a leaf",
            "a medieval castle surrounded by fog", "a plate of sushi on a wooden table",
            "a child flying a kite on the beach, golden hour", "an isometric pixel-art room",
            "a field of sunflowers under a blue sky"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_sdxl_modules(device="meta"):
    """The four SDXL networks, full size, random weights, created directly on ``device`` (fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    n = count_params(unet)
    assert n == SDXL_UNET_PARAMS, f"SDXL UNet config gives {n:,} parameters, expected {SDXL_UNET_PARAMS:,}"
    return unet, vae, te1, te2


# --------------------------------------------------------------------------------------------------
# Timing, memory
# --------------------------------------------------------------------------------------------------
class Timer:
    """Wall time of a block: CUDA events on a GPU (recorded on the current stream, read after an event
    synchronize), ``time.perf_counter`` otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = float("nan")

    def __enter__(self):
        if WORLD > 1:  # every process starts together; the time is that of the slowest
            if self.cuda:
                torch.cuda.synchronize()
            barrier()
            self._t0 = time.perf_counter()
            return self
        if self.cuda:
            torch.cuda.synchronize()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if WORLD > 1:
            if self.cuda:
                torch.cuda.synchronize()
            barrier()
            self.seconds = time.perf_counter() - self._t0
            return False
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0
        return False


def timer_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "perf_counter"


def median(xs):
    return float(statistics.median(xs))


def timed(device: torch.device, fn, repeats: int, label: str | None = None) -> tuple[list[float], object]:
    """Time ``fn()`` ``repeats`` times (``Timer``); returns the seconds and the last result. ``label``:
    log each time as "  <label> <seconds> s"."""
    times, result = [], None
    for _ in range(repeats):
        with Timer(device) as tm:
            result = fn()
        times.append(tm.seconds)
        if label:
            log(f"  {label} {tm.seconds:.3f} s")
    if PROFILE.active and PROFILE.result is None:  # the row's first timed function only
        PROFILE.result = profile_once(device, fn)
        log_profile(PROFILE.result)
    return times, result


# ``--profile ROWS``: the rows named there run one more call of their timed function under torch.profiler
# (after the timed repeats, so the numbers are unchanged); its summary lands in the row as "profile".
PROFILE = SimpleNamespace(active=False, result=None)

KERNEL_KINDS = (  # first match wins; lower-case substrings of kernel (or, on a CPU, operator) names
    ("layout conversion", ("nchwtonhwc", "nhwctonchw")),  # cuDNN's around a convolution in the other layout
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "mm_", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear")),
    ("norm", ("norm", "welford")),
    ("inductor fused", ("triton_",)),
    ("copy / cast", ("copy", "cast", "to_copy", "cat", "memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_once(device: torch.device, fn, top: int = 15) -> dict:
    """One call of ``fn`` under torch.profiler: its wall time, the summed device time of its kernels
    (CUDA) or operators (CPU: self time), that time by kind of kernel, and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=cuda) as prof:  # shapes name the ops behind idle gaps
        fn()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per_name: dict[str, list[float]] = {}
    kernels = device_events(prof) if cuda else []
    if cuda:  # the raw device events, each kernel once (prof.events() can list one twice with record_shapes)
        for name, _, dur_ns, _ in kernels:
            acc = per_name.setdefault(name, [0.0, 0])
            acc[0] += dur_ns / 1e9
            acc[1] += 1
    else:
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CPU or not e.name.startswith("aten::"):
                continue
            acc = per_name.setdefault(e.name, [0.0, 0])
            acc[0] += e.self_cpu_time_total / 1e6
            acc[1] += 1
    busy = sum(v[0] for v in per_name.values())
    covered = busy if not cuda else union_seconds([(t0, t0 + d) for _, t0, d, _ in kernels])
    kinds: dict[str, float] = {}
    for name, (s, _) in per_name.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + s
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    gaps = None
    if cuda:
        try:
            gaps = kineto_idle_gaps(prof, kernels)
        except Exception as e:  # noqa: BLE001 - the breakdown above stands without it
            gaps = {"error": f"{type(e).__name__}: {e}"[:200]}
    return {"idle": gaps, "wall_s": wall, "busy_s": busy, "busy_fraction_of_wall": covered / wall if wall > 0 else float("nan"),
            "covered_s": covered,  # time with at least one kernel running (kernels on two streams overlap)
            "what": "CUDA kernel time" if cuda else "CPU self time of aten operators",
            "by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "s": s, "calls": c, "kind": kernel_kind(n)} for n, (s, c) in ranked]}


def union_seconds(intervals: list[tuple[int, int]]) -> float:
    """Total length (s) of the union of [start_ns, end_ns) intervals."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total / 1e9


def is_annotation(name: str) -> bool:
    return name.startswith("## ") and name.endswith(" ##")


def device_events(prof) -> list[tuple[str, int, int, int]]:
    """(name, start_ns, duration_ns, id of the launching CPU operator) of every kernel, memcpy and memset of a
    CUDA profile, each once. Ranges that only annotate the GPU track (inductor's "## Call CompiledFxGraph ... ##",
    spanning a compiled graph's kernels) are not kernels: counted, they doubled the busy time of compiled calls."""
    seen = {}
    for e in prof.profiler.kineto_results.events():
        user_annotation = getattr(e, "is_user_annotation", lambda: False)()
        if (e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0 and not user_annotation
                and not is_annotation(e.name())):
            seen[(e.name(), e.start_ns())] = (e.name(), e.start_ns(), e.duration_ns(), e.linked_correlation_id())
    return list(seen.values())


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def idle_gaps(kernels: list[tuple], syncs: list[tuple], ops: dict, min_gap_ns: int = 10_000, top: int = 12,
              host: list[tuple] | None = None) -> dict:
    """Where the GPU sat idle between kernels. ``kernels``: (start_ns, end_ns, name, op_id) in any order, op_id
    naming the CPU operator that launched it (``ops[op_id]``); ``syncs``: (start_ns, end_ns) of host calls that
    wait for the GPU (cudaStreamSynchronize, a blocking cudaMemcpy, ...). A gap of at least ``min_gap_ns`` is
    "after a host sync" when such a call was running in it (the CPU waited for the GPU to drain, then had
    to issue the next work from nothing), else "waiting for the CPU" (the launches could not keep ahead).
    Each gap is charged to the operator that launched the kernel after it. ``host``: (start_ns, end_ns, name) of
    the CPU's recorded events (operators, runtime calls, dynamo / inductor regions); each of the largest gaps then
    lists the host events that ran during it, by the time they overlap it ("host_in_gap_ms", nested events
    each counted: inclusive times)."""
    ks = sorted(kernels)
    syncs = sorted(syncs)
    out = {"idle_s": 0.0, "small_gaps_s": 0.0, "gaps": 0, "by_cause_s": {}, "by_op_s": {}, "largest": []}
    if not ks:
        return out
    horizon = ks[0][1]
    gaps = []
    for start, end, name, op in ks[1:]:
        gap = start - horizon
        if gap > 0:
            out["idle_s"] += gap / 1e9
            if gap < min_gap_ns:
                out["small_gaps_s"] += gap / 1e9
            else:
                synced = any(a < start and b > horizon for a, b in syncs)
                cause = "after a host sync" if synced else "waiting for the CPU"
                op_name = ops.get(op, "?")
                out["by_cause_s"][cause] = out["by_cause_s"].get(cause, 0.0) + gap / 1e9
                out["by_op_s"][op_name] = out["by_op_s"].get(op_name, 0.0) + gap / 1e9
                gaps.append((gap, cause, op_name, name, horizon, start))
        horizon = max(horizon, end)
    out["gaps"] = len(gaps)
    out["by_op_s"] = dict(sorted(out["by_op_s"].items(), key=lambda kv: -kv[1])[:top])
    out["largest"] = []
    for g, c, o, n, a, b in sorted(gaps, key=lambda g: -g[0])[:top]:
        row = {"s": g / 1e9, "cause": c, "op": o[:300], "next_kernel": n[:120]}
        if host is not None:
            during: dict[str, int] = {}
            for h0, h1, hname in host:
                overlap = min(h1, b) - max(h0, a)
                if overlap > 0:
                    during[hname] = during.get(hname, 0) + overlap
            row["host_in_gap_ms"] = {k[:120]: v / 1e6 for k, v in sorted(during.items(), key=lambda kv: -kv[1])[:8]}
        out["largest"].append(row)
    return out


def kineto_idle_gaps(prof, kernels: list[tuple[str, int, int, int]]) -> dict:
    """``idle_gaps`` of a CUDA profile: its device events (``device_events``) and the CPU's operators and
    host syncs from its raw events."""
    events = prof.profiler.kineto_results.events()
    cpu = torch.autograd.DeviceType.CPU
    runtime = re.compile(r"^cu(da)?[A-Z]")  # CUDA runtime / driver calls carry ids of another kind
    ops = {e.correlation_id(): e.name() + (f" {list(e.shapes())}" if e.shapes() else "") for e in events
           if e.device_type() == cpu and not runtime.match(e.name())}
    syncs = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
             if e.device_type() == cpu and e.name().startswith(SYNC_CALLS) and not e.name().endswith("Async")]
    host = [(e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in events
            if e.device_type() == cpu and e.duration_ns() > 0]
    return idle_gaps([(t0, t0 + d, name, op) for name, t0, d, op in kernels], syncs, ops, host=host)


def log_profile(p: dict) -> None:
    log(f"  profile: {p['what']} {p['busy_s']:.3f} s in a call of {p['wall_s']:.3f} s "
        f"({100 * p['busy_fraction_of_wall']:.0f}% busy); "
        + ", ".join(f"{k} {100 * v / max(p['busy_s'], 1e-12):.0f}%" for k, v in p["by_kind_s"].items()))
    idle = p.get("idle") or {}
    if "idle_s" in idle:
        log(f"  idle GPU {idle['idle_s']:.3f} s ({idle['small_gaps_s']:.3f} s in gaps < 10 us); {idle['gaps']} "
            f"larger gaps: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in idle["by_cause_s"].items())
            + "; by launching op: " + ", ".join(f"{k} {v:.3f} s" for k, v in list(idle["by_op_s"].items())[:5]))
        if idle["largest"] and "host_in_gap_ms" in idle["largest"][0]:
            big = idle["largest"][0]
            log(f"  largest gap {1000 * big['s']:.2f} ms; the CPU meanwhile (inclusive ms): "
                + ", ".join(f"{k} {v:.2f}" for k, v in big["host_in_gap_ms"].items()))


class PaddedConvIn(torch.nn.Module):
    """A convolution whose input channels are zero-padded to a multiple of 8 (its weight too, with zeros): the
    same sums plus exact zeros. Probes whether cuDNN's handling of the UNet's 4-channel input is what the
    compiled forward waits for."""

    def __init__(self, conv: torch.nn.Conv2d, multiple: int = 8):
        super().__init__()
        self.original = conv
        self.extra = (-conv.in_channels) % multiple

    def forward(self, x):
        w = self.original.weight
        pad = (0, 0, 0, 0, 0, self.extra)
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, pad), torch.nn.functional.pad(w, pad),
                                          self.original.bias, self.original.stride, self.original.padding)


def host_seconds(device: torch.device, fn, repeats: int = 3) -> float:
    """Median time until ``fn()`` returns to the CPU, starting from an idle GPU: the cost of issuing its work
    (its GPU time when something inside waits for the GPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return median(times)


def host_syncs(device: torch.device, fn) -> dict:
    """How often one ``fn()`` makes the CPU wait for the GPU through a PyTorch call (``.item()``, a blocking
    copy, a stream synchronize: ``torch.cuda.set_sync_debug_mode``), and where (the message and the innermost
    frames of the first few). Waits inside CUDA itself (e.g. cudaFree) are not seen. Empty on a CPU."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    seen = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" in str(message):  # (not the "prototype feature" notice)
            seen.append([str(message)[:200]] + [ln.strip() for ln in traceback.format_stack()[-15:-2]])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return {"syncs_per_call": len(seen), "syncs_at": seen[:3]}


def error_line(e: BaseException) -> str:
    """A failure as one line for a row: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------------------------------
# The knobs of a training step (reference values first)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    precision: str = "fp16"       # fp16 | bf16 | fp32 (autocast dtype and frozen-weight dtype; LoRA stays fp32)
    inputs: str = "encode"        # encode: VAE encode + both text encoders inside every step | precomputed
    cfg: str = "separate"         # separate | batched (one 2B call) | adaptive (batched when active <= B/2)
    loop: str = "reference"       # Direct CM only: reference (masked full batch) | per_sample (solve_to_zero)
    lora_cast: str = "fp32"       # fp32: PEFT copies every LoRA input to fp32 | off: no copy (same values, autocast)
    compile: bool = False         # teacher passes through torch.compile (dynamic batch)
    offload: bool = False         # text encoders + VAE off the GPU while training on precomputed inputs
    compile_student: bool = False  # the student's forward + backward through torch.compile (optional rows)
    channels_last: bool = False   # the UNet's 4-D weights in channels_last (NHWC) memory format
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark (cuDNN times its algorithms per shape)
    compile_mode: str = "default"  # torch.compile mode of the teacher (reduce-overhead: CUDA graphs per batch size)
    checkpoint_budget_gib: float = 0  # selective checkpointing: GiB of activations kept (0: every block checkpointed)
    compile_blocks: bool = False  # every ResNet / transformer block through torch.compile (models.compile_blocks)
                                  # (teacher_fwd rows' extra: True or a torch.compile mode for the blocks)
    lookahead: int = 0            # Direct CM: batches whose trajectories ride in the current one's calls (pool)
                                  # CM: the next step's teacher step issued during this one
    ahead_stream: str = "side"    # CM lookahead on: side (a second CUDA stream) | same (the current stream)
    merged_target: bool = False   # CM: the target pass on weight copies with the LoRA update folded in
                                  # (models.MergedAdapters, --merged_target)
    micro_batch: int = 0          # the student's forward + backward this many samples at a time (0: whole batch)
    attention: str = "default"    # SDPA backend: default (torch's choice) | cudnn (cuDNN attention only)
    switch: str = "peft"          # teacher's adapter switch: peft (disable_adapters(), flips requires_grad of every
                                  # adapter weight) | flags (models.adapters_disabled: the layers' flags only) |
                                  # view (models.base_view: the teacher runs a view without adapter layers)
    h2d: str = "sync"             # small host-to-GPU copies (timesteps, coefficients, indices): sync (plain .to(),
                                  # the CPU waits for the GPU queue to drain) | async (cmdistill.devices.to_device)

    def describe(self, objective: str) -> str:
        s = f"{self.precision}, {self.inputs}, cfg={self.cfg}, lora_cast={self.lora_cast}"
        s += ", compiled teacher" if self.compile else ""
        s += f" ({self.compile_mode})" if self.compile and self.compile_mode != "default" else ""
        s += ", encoders offloaded" if self.offload else ""
        s += ", compiled student" if self.compile_student else ""
        s += ", compiled blocks" if self.compile_blocks else ""
        s += f" ({self.compile_blocks})" if isinstance(self.compile_blocks, str) else ""
        s += ", channels_last" if self.channels_last else ""
        s += ", cudnn.benchmark" if self.cudnn_benchmark else ""
        s += ", cuDNN attention" if self.attention == "cudnn" else ""
        if self.checkpoint_budget_gib:
            s += (", no block checkpointed" if math.isinf(self.checkpoint_budget_gib)
                  else f", {self.checkpoint_budget_gib:g} GiB un-checkpointed")
        s += f", student in micro-batches of {self.micro_batch}" if self.micro_batch else ""
        s += f", teacher lookahead {self.lookahead} batches" if self.lookahead else ""
        s += " (same stream)" if self.lookahead and objective == "cm" and self.ahead_stream == "same" else ""
        s += ", target pass on merged weights" if self.merged_target else ""
        s += ", teacher on a view without adapter layers" if self.switch == "view" else f", {self.switch} adapter switch"
        s += ", synchronizing host copies" if self.h2d == "sync" else ""
        return s + (f", loop={self.loop}" if objective == "direct_cm" else "")


REF = Knobs()
OURS = Knobs(precision="bf16", inputs="precomputed", cfg="adaptive", loop="per_sample", lora_cast="off",
             compile=True, offload=True, switch="view", h2d="async")


@dataclass(frozen=True)
class Spec:
    name: str
    group: str
    behaviour: str           # reference | ours | knob (one knob of the reference changed) | check
    what: str
    default: bool = True
    knobs: Knobs | None = None
    extra: dict | None = None


SPECS = [
    Spec("matmul_peak", "peak", "check", "bf16 matrix product 8192^3 (the card's attainable dense rate)"),
    Spec("conv_in_probe", "probe", "check", "the UNet's first convolution alone, 4 input channels and padded to 8: "
         "GPU time and host time per call", default=False),
    Spec("teacher_fwd_ref", "teacher_fwd", "reference", "teacher UNet forward, batch B, fp16, no grad",
         extra={"precision": "fp16"}),
    Spec("teacher_fwd_ours", "teacher_fwd", "ours", "teacher UNet forward, batch B, bf16, no grad",
         extra={"precision": "bf16"}),
    Spec("teacher_fwd_ours_compiled", "teacher_fwd", "ours", "teacher UNet forward, bf16, torch.compile "
         "(dynamic batch, as the training loop uses it)", extra={"precision": "bf16", "compile": True}),
    Spec("teacher_fwd_ours+blocks", "teacher_fwd", "knob", "teacher UNet forward, bf16, every block compiled "
         "(models.compile_blocks), no whole-model compile", default=False,
         extra={"precision": "bf16", "compile_blocks": True}),
    Spec("teacher_fwd_ours+blocks_autotune", "teacher_fwd", "knob", "teacher UNet forward, bf16, every block "
         "compiled with mode max-autotune-no-cudagraphs (GEMM / conv kernels tuned per block shape)", default=False,
         extra={"precision": "bf16", "compile_blocks": "max-autotune-no-cudagraphs"}),
    Spec("teacher_fwd_ours+channels_last", "teacher_fwd", "knob", "teacher UNet forward, bf16, eager, weights "
         "channels_last", default=False, extra={"precision": "bf16", "channels_last": True}),
    Spec("teacher_fwd_ours_compiled+channels_last", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile (dynamic batch), weights channels_last", default=False,
         extra={"precision": "bf16", "compile": True, "channels_last": True}),
    Spec("teacher_fwd_ours_compiled+cudagraphs", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile mode reduce-overhead (dynamic batch, a CUDA graph per batch size)", default=False,
         extra={"precision": "bf16", "compile": True, "compile_mode": "reduce-overhead"}),
    Spec("teacher_fwd_ours_compiled_static", "teacher_fwd", "knob", "teacher UNet forward, bf16, torch.compile "
         "with a static batch (inductor's own channels_last layout pass applies)", default=False,
         extra={"precision": "bf16", "compile": True, "static": True}),
    Spec("teacher_fwd_ours+cudnn_benchmark", "teacher_fwd", "knob", "teacher UNet forward, bf16, eager, "
         "torch.backends.cudnn.benchmark", default=False, extra={"precision": "bf16", "cudnn_benchmark": True}),
    Spec("teacher_fwd_ours_compiled+tuned", "teacher_fwd", "knob", "teacher UNet forward, bf16, torch.compile "
         "(dynamic batch) with inductor's conv_1x1_as_mm, coordinate_descent_tuning, no epilogue fusion",
         default=False, extra={"precision": "bf16", "compile": True, "inductor": {
             "conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}}),
    Spec("teacher_fwd_ours_compiled+freezing", "teacher_fwd", "knob", "teacher UNet forward, bf16, torch.compile "
         "(dynamic batch) with inductor's freezing (the frozen weights become constants of the compiled graph: "
         "no parameter inputs to fetch per call, weights pre-laid-out)", default=False,
         extra={"precision": "bf16", "compile": True, "inductor": {"freezing": True}}),
    Spec("teacher_fwd_ours_compiled+nhwc", "teacher_fwd", "knob", "teacher UNet forward, bf16, torch.compile "
         "(dynamic batch) in channels_last (inductor's layout pass forced; group norms with per-channel "
         "statistics: models.compile_unet(view, channels_last=True))",
         default=False, extra={"precision": "bf16", "compile": True, "nhwc": True}),
    Spec("teacher_fwd_ours_compiled+nhwc+freezing", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile (dynamic batch) in channels_last (as +nhwc) with inductor's freezing", default=False,
         extra={"precision": "bf16", "compile": True, "nhwc": True, "inductor": {"freezing": True}}),
    Spec("teacher_fwd_ours_compiled_static+freezing", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile with a static batch and inductor's freezing (its channels_last layout pass applies)",
         default=False, extra={"precision": "bf16", "compile": True, "static": True, "inductor": {"freezing": True}}),
    Spec("teacher_fwd_ours_compiled+flags", "teacher_fwd", "knob", "teacher UNet forward, bf16, torch.compile "
         "(dynamic batch) of the UNet itself with its adapter layers' flags off (models.adapters_disabled), as "
         "before models.base_view", default=False, extra={"precision": "bf16", "compile": True, "switch": "flags"}),
    Spec("teacher_fwd_ours_compiled+skip_guards", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile (dynamic batch), timed under set_stance(skip_guard_eval_unsafe=True) (measures the guards' "
         "cost; not used in training)", default=False,
         extra={"precision": "bf16", "compile": True, "skip_guards": True}),
    Spec("teacher_fwd_ours_compiled+pad_conv_in", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile (dynamic batch), conv_in's 4 input channels zero-padded to 8", default=False,
         extra={"precision": "bf16", "compile": True, "pad_conv_in": True}),
    Spec("teacher_fwd_ours_compiled+cudnn_benchmark", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile (dynamic batch), torch.backends.cudnn.benchmark", default=False,
         extra={"precision": "bf16", "compile": True, "cudnn_benchmark": True}),
    Spec("teacher_fwd_ours+cudnn_attention", "teacher_fwd", "knob", "teacher UNet forward, bf16, eager, "
         "cuDNN attention", default=False, extra={"precision": "bf16", "attention": "cudnn"}),
    Spec("teacher_fwd_ours_compiled+cudnn_attention", "teacher_fwd", "knob", "teacher UNet forward, bf16, "
         "torch.compile (dynamic batch), cuDNN attention", default=False,
         extra={"precision": "bf16", "compile": True, "attention": "cudnn"}),
    Spec("cm_step_ref", "cm_step", "reference", "CM training step", knobs=REF),
    Spec("cm_step_ref+precomputed", "cm_step", "knob", "CM step, reference but precomputed inputs",
         knobs=replace(REF, inputs="precomputed")),
    Spec("cm_step_ref+bf16", "cm_step", "knob", "CM step, reference but bf16", knobs=replace(REF, precision="bf16")),
    Spec("cm_step_ours+lora_cast", "cm_step", "knob", "CM step, ours but PEFT's fp32 copy of LoRA inputs",
         default=False, knobs=replace(OURS, loop="reference", lora_cast="fp32")),
    Spec("cm_step_ours-compile", "cm_step", "knob", "CM step, ours but eager teacher", default=False,
         knobs=replace(OURS, loop="reference", compile=False)),
    Spec("cm_step_ours", "cm_step", "ours", "CM training step", knobs=replace(OURS, loop="reference")),
    Spec("student_step_ref", "student_step", "reference", "student step alone: f_theta forward + backward "
         "(checkpointing) + clip + AdamW, fixed target, fp16, fp32 LoRA-input copies", knobs=REF),
    Spec("student_step_ours", "student_step", "ours", "student step alone, bf16, no LoRA-input copy",
         knobs=OURS),
    Spec("student_step_ours+compile", "student_step", "knob", "student step alone, ours + compiled student",
         default=False, knobs=replace(OURS, compile_student=True)),
    Spec("student_step_ours+channels_last", "student_step", "knob", "student step alone, ours + channels_last "
         "weights", default=False, knobs=replace(OURS, channels_last=True)),
    Spec("student_step_ours+cudnn_benchmark", "student_step", "knob", "student step alone, ours + "
         "torch.backends.cudnn.benchmark", default=False, knobs=replace(OURS, cudnn_benchmark=True)),
    Spec("student_step_ours+cudnn_attention", "student_step", "knob", "student step alone, ours + cuDNN "
         "attention", default=False, knobs=replace(OURS, attention="cudnn")),
    Spec("student_step_ours+sac20", "student_step", "knob", "student step alone, ours + selective checkpointing "
         "(20 GiB of activations kept)", default=False, knobs=replace(OURS, checkpoint_budget_gib=20)),
    Spec("student_step_ours+sac40", "student_step", "knob", "student step alone, ours + selective checkpointing "
         "(40 GiB)", default=False, knobs=replace(OURS, checkpoint_budget_gib=40)),
    Spec("cm_step_ours+sac40", "cm_step", "knob", "CM step, ours + selective checkpointing (40 GiB)", default=False,
         knobs=replace(OURS, loop="reference", checkpoint_budget_gib=40)),
    Spec("direct_cm_step_ours+sac40", "direct_cm_step", "knob", "Direct CM step, ours + selective checkpointing "
         "(40 GiB)", default=False, knobs=replace(OURS, checkpoint_budget_gib=40)),
    Spec("student_step_ours+micro2", "student_step", "knob", "student step alone, ours, the student's forward + "
         "backward 2 samples at a time, no block checkpointed", default=False,
         knobs=replace(OURS, micro_batch=2, checkpoint_budget_gib=float("inf"))),
    Spec("student_step_ours+micro4", "student_step", "knob", "student step alone, ours, 4 samples at a time, no block "
         "checkpointed", default=False, knobs=replace(OURS, micro_batch=4, checkpoint_budget_gib=float("inf"))),
    Spec("student_step_ours+micro8", "student_step", "knob", "student step alone, ours, 8 samples at a time, no block "
         "checkpointed (a card with more than 80 GB)", default=False,
         knobs=replace(OURS, micro_batch=8, checkpoint_budget_gib=float("inf"))),
    Spec("student_step_ours+micro8+sac40", "student_step", "knob", "student step alone, ours, 8 samples at a time, "
         "selective checkpointing (40 GiB)", default=False, knobs=replace(OURS, micro_batch=8, checkpoint_budget_gib=40)),
    Spec("cm_step_ours+micro4", "cm_step", "knob", "CM step, ours, the student 4 samples at a time, no block "
         "checkpointed", default=False,
         knobs=replace(OURS, loop="reference", micro_batch=4, checkpoint_budget_gib=float("inf"))),
    Spec("direct_cm_step_ours+micro4", "direct_cm_step", "knob", "Direct CM step, ours, the student 4 samples at a "
         "time, no block checkpointed", default=False,
         knobs=replace(OURS, micro_batch=4, checkpoint_budget_gib=float("inf"))),
    Spec("student_step_ours+blocks", "student_step", "knob", "student step alone, ours + compiled blocks "
         "(models.compile_blocks), every block checkpointed", default=False, knobs=replace(OURS, compile_blocks=True)),
    Spec("student_step_ours+blocks+micro4", "student_step", "knob", "student step alone, ours + compiled blocks, "
         "4 samples at a time, no block checkpointed", default=False,
         knobs=replace(OURS, compile_blocks=True, micro_batch=4, checkpoint_budget_gib=float("inf"))),
    Spec("cm_step_ours+blocks+micro4", "cm_step", "knob", "CM step, ours + compiled blocks, the student 4 samples "
         "at a time, no block checkpointed", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, micro_batch=4, checkpoint_budget_gib=float("inf"))),
    Spec("student_step_ours+blocks+sac40", "student_step", "knob", "student step alone, ours + compiled blocks + "
         "selective checkpointing (40 GiB)", default=False,
         knobs=replace(OURS, compile_blocks=True, checkpoint_budget_gib=40)),
    Spec("cm_step_ours+blocks+sac40", "cm_step", "knob", "CM step, ours + compiled blocks + selective checkpointing "
         "(40 GiB)", default=False, knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=40)),
    Spec("student_step_ours+blocks+sac60", "student_step", "knob", "student step alone, ours + compiled blocks + "
         "selective checkpointing (60 GiB estimated: ~0.65x that with compiled blocks)", default=False,
         knobs=replace(OURS, compile_blocks=True, checkpoint_budget_gib=60)),
    Spec("cm_step_ours+blocks+sac60", "cm_step", "knob", "CM step, ours + compiled blocks + selective checkpointing "
         "(60 GiB)", default=False, knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=60)),
    Spec("student_step_ours+blocks+sac80", "student_step", "knob", "student step alone, ours + compiled blocks + "
         "selective checkpointing (80 GiB estimated: ~0.65x that with compiled blocks)", default=False,
         knobs=replace(OURS, compile_blocks=True, checkpoint_budget_gib=80)),
    Spec("cm_step_ours+blocks+sac80", "cm_step", "knob", "CM step, ours + compiled blocks + selective checkpointing "
         "(80 GiB)", default=False, knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=80)),
    Spec("cm_step_ours+blocks", "cm_step", "knob", "CM step, ours + compiled blocks", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True)),
    Spec("student_step_ours+blocks_cudagraphs+sac80", "student_step", "knob", "as student_step_ours+blocks+sac80, "
         "the blocks compiled in reduce-overhead mode (CUDA graphs: fewer launches from the CPU)", default=False,
         knobs=replace(OURS, compile_blocks="reduce-overhead", checkpoint_budget_gib=80)),
    Spec("cm_step_ours+blocks_only+sac80", "cm_step", "knob", "as cm_step_ours+blocks+sac80, the teacher through "
         "the compiled blocks too (no whole-model compile)", default=False,
         knobs=replace(OURS, loop="reference", compile=False, compile_blocks=True, checkpoint_budget_gib=80)),
    Spec("cm_step_ours+blocks_only_cudagraphs+sac80", "cm_step", "knob", "as cm_step_ours+blocks_only+sac80, the "
         "blocks compiled in reduce-overhead mode (CUDA graphs)", default=False,
         knobs=replace(OURS, loop="reference", compile=False, compile_blocks="reduce-overhead",
                       checkpoint_budget_gib=80)),
    Spec("cm_step_ours+blocks+lookahead1", "cm_step", "knob", "as cm_step_ours+blocks, the next step's teacher "
         "step issued ahead on a second stream (--teacher_lookahead 1)", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, lookahead=1)),
    Spec("cm_step_ours+blocks+sac80+lookahead1", "cm_step", "knob", "as cm_step_ours+blocks+sac80, the next step's "
         "teacher step issued ahead on a second stream (--teacher_lookahead 1)", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=80, lookahead=1)),
    Spec("cm_step_ours+blocks+merged_target", "cm_step", "knob", "as cm_step_ours+blocks, the target pass on "
         "weight copies with the LoRA update folded in (--merged_target)", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, merged_target=True)),
    Spec("cm_step_ours+blocks+sac80+merged_target", "cm_step", "knob", "as cm_step_ours+blocks+sac80, the target "
         "pass on weight copies with the LoRA update folded in (--merged_target)", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=80, merged_target=True)),
    Spec("cm_step_ours+blocks+sac40+merged_target", "cm_step", "knob", "as cm_step_ours+blocks+sac40, the target "
         "pass on weight copies with the LoRA update folded in (--merged_target)", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=40, merged_target=True)),
    *[Spec(f"cm_step_ours+blocks{sac}{merged}+lookahead1same", "cm_step", "knob",
           f"as cm_step_ours+blocks{sac}{merged}, the next step's teacher step issued at the start of this one on "
           "the same stream (--teacher_lookahead 1)", default=False,
           knobs=replace(OURS, loop="reference", compile_blocks=True, lookahead=1, ahead_stream="same",
                         checkpoint_budget_gib=float(sac[4:] or 0), merged_target=bool(merged)))
      for sac in ("", "+sac40", "+sac80") for merged in ("", "+merged_target")],
    Spec("cm_step_ours+blocks+sac80+sync_h2d", "cm_step", "knob", "as cm_step_ours+blocks+sac80, small host-to-GPU "
         "copies synchronizing (plain .to())", default=False,
         knobs=replace(OURS, loop="reference", compile_blocks=True, checkpoint_budget_gib=80, h2d="sync")),
    Spec("cm_step_ours+channels_last", "cm_step", "knob", "CM step, ours + channels_last weights", default=False,
         knobs=replace(OURS, loop="reference", channels_last=True)),
    Spec("cm_step_ours+compile_student", "cm_step", "knob", "CM step, ours + compiled student", default=False,
         knobs=replace(OURS, loop="reference", compile_student=True)),
    Spec("student_images_ref", "student_images", "reference", "4-step student sampling + decode, 1 image at a time",
         extra={"precision": "fp16", "batch": 1}),
    Spec("student_images_ours", "student_images", "ours", "4-step student sampling + decode, batch B",
         extra={"precision": "bf16", "batch": None}),
    Spec("teacher_images_ref", "teacher_images", "reference", "teacher ODE sampling (N DDIM steps, CFG) + decode, "
         "1 image at a time", knobs=REF, extra={"batch": 1}),
    Spec("teacher_images_ours", "teacher_images", "ours", "teacher ODE sampling (N DDIM steps, CFG) + decode, "
         "batch B (cmdistill.sampling.teacher_sample)", knobs=OURS, extra={"batch": None}),
    Spec("direct_cm_agreement", "check", "check", "Direct CM targets: solve_to_zero (ours, adaptive CFG) vs "
         "solve_to_zero_reference, float32"),
    Spec("direct_cm_step_ours", "direct_cm_step", "ours", "Direct CM training step", knobs=OURS),
    Spec("direct_cm_step_ref", "direct_cm_step", "reference", "Direct CM training step", knobs=REF),
    Spec("direct_cm_calls_ref", "direct_cm_calls", "reference", "one guided teacher call of the reference Direct "
         "CM loop (full batch, separate CFG), + the prompt and VAE encode of its step", knobs=REF),
    Spec("direct_cm_calls_ours", "direct_cm_calls", "ours", "one guided teacher call of the per-sample loop at "
         "every active-set size 1..B (adaptive CFG)", knobs=OURS),
    Spec("direct_cm_calls_ours+channels_last", "direct_cm_calls", "knob", "as direct_cm_calls_ours, weights "
         "channels_last", default=False, knobs=replace(OURS, channels_last=True)),
    Spec("direct_cm_calls_ours+cudnn_attention", "direct_cm_calls", "knob", "as direct_cm_calls_ours, cuDNN "
         "attention", default=False, knobs=replace(OURS, attention="cudnn")),
    Spec("direct_cm_calls_ours+cudagraphs", "direct_cm_calls", "knob", "as direct_cm_calls_ours, teacher "
         "compiled with mode reduce-overhead (CUDA graphs)", default=False,
         knobs=replace(OURS, compile_mode="reduce-overhead")),
    Spec("direct_cm_step_ours+cudagraphs", "direct_cm_step", "knob", "Direct CM step, ours with the teacher "
         "compiled in mode reduce-overhead (CUDA graphs)", default=False,
         knobs=replace(OURS, compile_mode="reduce-overhead")),
    Spec("direct_cm_steps_ours+lookahead2", "direct_cm_pipeline", "knob", "consecutive Direct CM steps, ours with "
         "the next 2 batches' teacher trajectories in the current batch's calls (--teacher_lookahead 2)",
         default=False, knobs=replace(OURS, lookahead=2)),
    Spec("direct_cm_steps_ours+lookahead2+blocks", "direct_cm_pipeline", "knob", "as "
         "direct_cm_steps_ours+lookahead2, + compiled blocks", default=False,
         knobs=replace(OURS, lookahead=2, compile_blocks=True)),
    Spec("direct_cm_steps_ours+lookahead2+blocks+sync_h2d", "direct_cm_pipeline", "knob", "as "
         "direct_cm_steps_ours+lookahead2+blocks, small host-to-GPU copies synchronizing (plain .to())",
         default=False, knobs=replace(OURS, lookahead=2, compile_blocks=True, h2d="sync")),
    Spec("direct_cm_expected", "direct_cm_expected", "check", "expected Direct CM step over the start "
         "distribution, from the measured call times and student steps (needs direct_cm_calls_* and "
         "student_step_*; reports the ours/reference ratio)"),
    Spec("direct_cm_step_ref+per_sample", "direct_cm_step", "knob", "Direct CM step, reference but per-sample loop",
         default=False, knobs=replace(REF, loop="per_sample")),
    Spec("direct_cm_step_ours-compile", "direct_cm_step", "knob", "Direct CM step, ours but eager teacher",
         default=False, knobs=replace(OURS, compile=False)),
    Spec("direct_cm_step_ours+separate_cfg", "direct_cm_step", "knob", "Direct CM step, ours but CFG always "
         "separate", default=False, knobs=replace(OURS, cfg="separate")),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}
EXPECTED_VARIANT = "direct_cm_expected+"


def spec_named(name: str) -> Spec:
    """A row by name; ``direct_cm_expected+K1[+K2...]``: the expected Direct CM step from ours' rows of those
    knobs (``direct_cm_calls_ours+...`` and ``student_step_ours+...``, run earlier in ``--only``)."""
    if name in SPEC_BY_NAME:
        return SPEC_BY_NAME[name]
    knobs = name[len(EXPECTED_VARIANT):]
    return Spec(name, "direct_cm_expected", "check", f"as direct_cm_expected, from ours' rows of +{knobs}",
                default=False)


class Counted:
    """An eps_fn that counts its calls and the samples it was given (teacher sample-forwards), and
    optionally prints a progress line every ``every`` calls."""

    def __init__(self, eps_fn, every: int = 0, label: str = ""):
        self.eps_fn, self.every, self.label = eps_fn, every, label
        self.calls = self.samples = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        self.samples += int(x.shape[0])
        if self.every and self.calls % self.every == 0:
            log(f"    {self.label}: {self.calls} teacher UNet calls, {self.samples} sample-forwards queued")
        return self.eps_fn(x, t, cond)


# --------------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.B, self.res, self.N, self.w = args.batch_size, args.resolution, args.num_discr_timesteps, args.w
        self.results: dict[str, dict] = {}
        self.flops_per_forward: float | None = None
        self._precision = None
        self._precomputed: dict = {}
        self._compiled = None
        self._compiled_student = None
        self._merged = None  # (key, models.MergedAdapters, its eps): --merged_target
        self._cm_ahead: list = []  # CM with a lookahead: the teacher step issued for the next step
        self._ahead: dict = {}  # knobs.ahead_stream -> devices.AheadOfTime
        self._layout = False
        self._budget = (0.0, None, None)
        self._blocks_compiled = False
        self.peak_tflops: float | None = None

    # --- setup ------------------------------------------------------------------------------------
    def build(self):
        args, dev = self.args, self.device
        from transformers import CLIPTokenizer

        log(f"building {'tiny' if args.tiny else 'full-size SDXL'} components with random weights on {dev}")
        if args.tiny:
            from cmdistill.tiny import tiny_sdxl_components

            c = tiny_sdxl_components(seed=0, sample_size=self.res // 8)
            unet, vae, te1, te2 = c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"]
            for m in (unet, vae, te1, te2):
                m.to(dev)
        else:
            unet, vae, te1, te2 = build_sdxl_modules(dev)
        self.param_counts = {"unet": count_params(unet), "vae": count_params(vae), "text_encoder": count_params(te1),
                             "text_encoder_2": count_params(te2)}
        log("parameters: " + ", ".join(f"{k} {v:,}" for k, v in self.param_counts.items()))
        with tempfile.TemporaryDirectory() as d:
            from cmdistill.tiny import write_clip_tokenizer

            tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(d) / "tokenizer"))
        self.tokenizers = [tok, tok]
        for m in (unet, vae, te1, te2):
            m.requires_grad_(False)
            m.eval()
        self.unet, self.vae, self.text_encoders = unet, vae, [te1, te2]
        # The student, as cmdistill.train.Trainer builds it: LoRA on the default targets, fp32 LoRA weights,
        # gradient checkpointing, AdamW (torch; the paper's 8-bit Adam needs bitsandbytes).
        models.add_lora(unet, args.lora_rank, args.lora_rank)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        unet.enable_gradient_checkpointing()
        unet.train()
        self.view = models.base_view(unet)  # ours: the teacher without adapter layers, on the same weights
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.param_counts["lora"] = sum(p.numel() for p in self.params)
        self.optimizer = make_optimizer(SimpleNamespace(
            use_8bit_adam=False, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
            adam_epsilon=1e-8), self.params)
        self.sched = NoiseSchedule.sdxl()
        self.grid = Grid(self.sched.T, self.N)
        self.step_fn = get_solver("ddim")
        self.sf = vae.config.scaling_factor
        self.h = self.res // (2 ** (len(vae.config.block_out_channels) - 1))
        g = torch.Generator().manual_seed(args.seed)
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(self.B)]
        self.pixels = (torch.rand(self.B, 3, self.res, self.res, generator=g) * 2 - 1).to(dev)
        self.orig_sizes = [(self.res, self.res)] * self.B
        self.crops = [(0, 0)] * self.B
        # The Direct CM start indices and the noise: drawn once from a fixed seed, shared by ours and the reference.
        self.start = torch.randint(0, self.N, (self.B,), generator=g)
        self.noise = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
        self.x_T = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
        if RANK > 0:  # the same start indices on every process (the same work per GPU), other data and noise
            g = torch.Generator().manual_seed(args.seed + 1000 * RANK)
            self.pixels = (torch.rand(self.B, 3, self.res, self.res, generator=g) * 2 - 1).to(dev)
            self.noise = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
            self.x_T = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
        log(f"LoRA rank {args.lora_rank}: {self.param_counts['lora']:,} trainable parameters (fp32)")

    def set_precision(self, name: str):
        """Frozen weights of all four networks in ``name``'s dtype; the LoRA weights stay fp32 (SPEC §7)."""
        if name == self._precision:
            return
        dtype = DTYPES[name]
        self._precision = None  # a failure half-way leaves no stale record
        for m in [self.unet, self.vae, *self.text_encoders]:
            for p in m.parameters():
                if not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for b in m.buffers():
                if b.is_floating_point() and b.dtype != dtype:
                    b.data = b.data.to(dtype)
        self._precision = name
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def autocast(self, precision: str):
        dtype = DTYPES[precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # --- the pieces of a step, as cmdistill.train.Trainer assembles them ---------------------------
    @torch.no_grad()
    def encode_conditioning(self, captions, precision: str) -> dict:
        dtype = DTYPES[precision]
        prompt_embeds, pooled = models.encode_prompts(captions, self.tokenizers, self.text_encoders)
        ids = models.time_ids(self.orig_sizes[: len(captions)], self.crops[: len(captions)], (self.res, self.res))
        return {"prompt_embeds": prompt_embeds.to(self.device, dtype), "text_embeds": pooled.to(self.device, dtype),
                "time_ids": ids.to(self.device, dtype)}

    @torch.no_grad()
    def encode_latents(self, precision: str) -> torch.Tensor:
        pixels = self.pixels.to(DTYPES[precision])
        g = torch.Generator().manual_seed(self.args.seed)
        out = [self.vae.encode(c).latent_dist.sample(generator=g) for c in pixels.split(self.args.vae_encode_batch)]
        return torch.cat(out).float() * self.sf

    def inputs(self, knobs: Knobs):
        if knobs.inputs == "encode":
            self.place_encoders(knobs)
            return self.encode_latents(knobs.precision), self.encode_conditioning(self.captions, knobs.precision)
        if knobs.precision not in self._precomputed:  # computed once, outside the timed region
            self.place_encoders(replace(knobs, offload=False))
            self._precomputed[knobs.precision] = (self.encode_latents(knobs.precision),
                                                  self.encode_conditioning(self.captions, knobs.precision))
        self.place_encoders(knobs)
        return self._precomputed[knobs.precision]

    def compiled_unet(self, static: bool = False, inductor: tuple = (), mode: str = "default", view: bool = True,
                      nhwc: bool = False):
        """The UNet under torch.compile, built once per (memory format, static, the row's inductor settings as
        sorted items) and shared by every measurement (so it compiles once); called through
        ``UNetEps(..., dynamic_batch=True)`` as ``Trainer.distill_context`` does, or with ``static`` through a
        plain ``UNetEps`` (one batch size)."""
        key = (self._layout, static, inductor, torch.backends.cuda.flash_sdp_enabled(), mode, view, nhwc)
        if self._compiled is None or self._compiled[0] != key:
            if self._compiled is not None:  # another variant: start from a clean dynamo state
                torch._dynamo.reset()
                self._compiled_student = self._merged = None
            self._compiled = (key, models.compile_unet(self.view if view else self.unet,
                                                       backend=self.args.compile_backend, mode=mode,
                                                       channels_last=nhwc))
        return self._compiled[1]

    def set_checkpointing(self, budget_gib: float, micro_batch: int = 0):
        """Every block checkpointed (0), or selective checkpointing with ``budget_gib`` GiB kept (the trainer's
        ``--checkpointing_budget_gib``), planned for the student's (micro-)batch; inf: no block checkpointed."""
        batch = min(micro_batch or self.B, self.B)
        key = (budget_gib, self._precision, batch)
        if key != self._budget and (budget_gib or self._budget[0]):
            info = checkpointing.enable(self.unet, budget_gib, batch, self.h, self.h)
            if budget_gib:
                log("  " + checkpointing.describe(info))
        self._budget = key

    def ahead(self, knobs: Knobs) -> devices.AheadOfTime:
        """Where work issued ahead goes (``--teacher_lookahead`` on CM; ``knobs.ahead_stream``), made on first use."""
        if knobs.ahead_stream not in self._ahead:
            self._ahead[knobs.ahead_stream] = devices.AheadOfTime(self.device, same_stream=knobs.ahead_stream == "same")
        return self._ahead[knobs.ahead_stream]

    def set_conv_in_padding(self, pad: bool):
        """The UNet's first convolution with its 4 input channels zero-padded to 8 (``PaddedConvIn``; the same
        output up to the order of the sums), or as built."""
        for tree in (self.unet, self.view):  # (the view has its own list of the UNet's children)
            padded = isinstance(tree.conv_in, PaddedConvIn)
            if pad and not padded:
                tree.conv_in = PaddedConvIn(tree.conv_in)
            elif padded and not pad:
                tree.conv_in = tree.conv_in.original

    def set_layout(self, channels_last: bool):
        """The UNet's 4-D weights (frozen and LoRA) in channels_last or contiguous memory format."""
        if channels_last != self._layout:
            self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            self._layout = channels_last
            self.optimizer.state.clear()  # AdamW's moments in the old layout would not match (fused kernel)

    def student_module(self, knobs: Knobs):
        """The UNet for the student's pass with grad: eager, or compiled once (its own graph: adapters on, grad)."""
        if not knobs.compile_student:
            return self.unet
        if self._compiled_student is None:
            self._compiled_student = models.compile_unet(self.unet, backend=self.args.compile_backend)
        return self._compiled_student

    def teacher_unet_eps(self, compile: bool, static: bool = False, inductor: tuple = (),
                         mode: str = "default", view: bool = True, nhwc: bool = False) -> UNetEps:
        """The teacher's UNet call: on ``base_view`` (ours) or on the UNet itself, whose adapter the caller
        switches off (``view=False``); eager or compiled."""
        if not compile:
            return UNetEps(self.view if view else self.unet)
        return UNetEps(self.compiled_unet(static, inductor, mode, view, nhwc), dynamic_batch=not static,
                       fresh_output=models.uses_cudagraphs(mode))

    def place_encoders(self, knobs: Knobs):
        """Text encoders and VAE on the GPU, or (``offload``, precomputed inputs) on the CPU."""
        dev = torch.device("cpu") if (knobs.offload and knobs.inputs == "precomputed") else self.device
        for m in [self.vae, *self.text_encoders]:
            if next(m.parameters()).device != dev:
                m.to(dev)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def adapter_switch(self, switch: str):
        """The teacher's adapter switch as a context: PEFT's own, as the reference training scripts do
        (``disable_adapters()`` / ``enable_adapters()``), or ours (``models.adapters_disabled``)."""
        if switch == "flags":
            return models.adapters_disabled(self.unet)
        if switch == "view":  # the teacher's calls go to the view: nothing to switch
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def peft_switch():
            self.unet.disable_adapters()
            try:
                yield
            finally:
                self.unet.enable_adapters()

        return peft_switch()

    def guided_teacher(self, cfg: str, batch: int, every: int = 0, label: str = "", compile: bool = False,
                       switch: str | None = "view", mode: str = "default", view: bool | None = None):
        """The guided teacher eps_fn of ``cmdistill.train.Trainer.distill_context`` (adapter disabled by
        ``switch`` around every call; None: the caller disables it once around many calls), with a counting
        wrapper around the UNet call."""
        view = switch == "view" if view is None else view  # (view=True with switch=None: the caller's own switch)
        counted = Counted(self.teacher_unet_eps(compile, mode=mode, view=view), every, label)
        threshold = {"separate": 0, "batched": batch, "adaptive": batch // 2}[cfg]
        guide = counted.guide = AdaptiveCFG(counted, self.w, threshold)
        if switch is None:
            return guide, counted

        def teacher_eps(x, t, cond):
            with self.adapter_switch(switch):
                return guide(x, t, cond)

        return teacher_eps, counted

    def context(self, knobs: Knobs, every: int = 0, label: str = "", objective: str = "cm"):
        # The reference switches the adapter off once around a Direct CM step's loop (PEFT's switch); ours per
        # call (Trainer.distill_context); the CM step once (its one guided call) in both.
        once = objective == "direct_cm" and knobs.switch == "peft"
        teacher_eps, counted = self.guided_teacher(knobs.cfg, self.B, every, label, compile=knobs.compile,
                                                   switch=None if once else knobs.switch, mode=knobs.compile_mode)
        target = self.merged_target_eps(knobs) if knobs.merged_target else UNetEps(self.unet)
        ctx = DistillContext(teacher_eps=teacher_eps, student_eps_nograd=target, step=self.step_fn,
                             sched=self.sched, grid=self.grid)
        return ctx, counted

    def merged_target_eps(self, knobs: Knobs):
        """The CM target pass as ``Trainer.distill_context`` runs it with ``--merged_target``: on
        ``models.MergedAdapters``' tree, refreshed before every pass, compiled as the teacher is (or through
        compiled blocks when only they are on). Built once per precision and compile setting."""
        key = (self._precision, knobs.compile, self._blocks_compiled, self._layout)  # (no conv_in padding here)
        if self._merged is None or self._merged[0] != key:
            self._merged = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            merged = models.MergedAdapters(self.unet)
            tree = merged.tree
            if knobs.compile:
                tree = models.compile_unet(tree, backend=self.args.compile_backend)
            elif self._blocks_compiled:
                models.compile_blocks(tree, backend=self.args.compile_backend)
            self._merged = (key, merged, UNetEps(tree, dynamic_batch=knobs.compile))
        _, merged, eps = self._merged
        return merged.refreshing(eps)  # before every pass: one pass per step here

    def direct_cm_target(self, ctx: DistillContext, knobs: Knobs, x_t, start, cond):
        with self.adapter_switch(knobs.switch) if knobs.switch == "peft" else contextlib.nullcontext():
            if knobs.loop == "reference":
                with torch.no_grad():
                    return solve_to_zero_reference(ctx.step, ctx.teacher_eps, x_t, start, cond, ctx.sched, ctx.grid)
            return direct_cm_target(ctx, x_t, start, cond)

    def train_step(self, objective: str, knobs: Knobs, start: torch.Tensor, scaler, every: int = 0):
        """One optimisation step as ``Trainer.loss`` + ``Trainer.train`` do it: (encode,) noise to t_n, target
        under autocast and no_grad, student f_theta with grad, distance, backward, clip 1.0, AdamW step."""
        latents, cond = self.inputs(knobs)
        models.set_lora_input_casting(self.unet, knobs.lora_cast == "fp32")
        t = self.grid.timestep(start)
        x_t = self.sched.add_noise(latents, self.noise, t)
        ctx, counted = self.context(knobs, every, objective, objective)
        with self.autocast(knobs.precision):
            if objective == "cm" and knobs.lookahead:  # as the trainer: the next step's teacher step issued now
                def teacher_step():
                    with self.autocast(knobs.precision):
                        return cm_teacher_step(ctx, x_t, start, cond)

                ahead = self.ahead(knobs)
                pending = self._cm_ahead.pop() if self._cm_ahead else ahead.issue(teacher_step, (x_t, cond))
                self._cm_ahead.append(ahead.issue(teacher_step, (x_t, cond)))  # the next step's (same inputs)
                target = cm_target_from(ctx, *pending.get(), cond)
            elif objective == "cm":
                target = cm_target(ctx, x_t, start, cond)
            else:
                target = self.direct_cm_target(ctx, knobs, x_t, start, cond)
        counted.loss = self.student_update(knobs, x_t, t, cond, target, scaler)
        side = self.ahead(knobs).stream if self._cm_ahead else None
        if side is not None:
            # The step's time includes the teacher step it issued for the next one (the steady state's cost per
            # step): the current stream waits for it before the timer's end event.
            torch.cuda.current_stream(self.device).wait_stream(side)
        return counted

    def student_update(self, knobs: Knobs, x_t, t, cond, target, scaler) -> torch.Tensor:
        """The student's part of a step: f_theta with grad, distance, backward (in micro-batches: as
        ``Trainer.loss_and_backward``), (all-reduce,) clip 1.0, AdamW."""
        student = UNetEps(self.student_module(knobs))

        def loss_of(sl):
            with self.autocast(knobs.precision):
                pred = consistency_fn(student, x_t[sl], t[sl], {k: v[sl] for k, v in cond.items()}, self.sched, 10.0)
            return distance(pred, target[sl])

        backward = (lambda loss: scaler.scale(loss).backward()) if scaler is not None else (lambda loss: loss.backward())
        loss = backward_in_micro_batches(loss_of, x_t.shape[0], knobs.micro_batch, backward)
        self.all_reduce_grads()
        if scaler is not None:  # fp16 mixed precision: accelerate's GradScaler
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            scaler.step(self.optimizer)
            scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def all_reduce_grads(self):
        """With several processes: average the LoRA gradients over them, as DDP does (one flat buffer)."""
        if WORLD == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= WORLD
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    def scaler_for(self, precision: str):
        return torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in x0.split(self.args.decode_batch or x0.shape[0]):
            img = self.vae.decode((chunk / self.sf).to(self.vae.dtype)).sample
            outs.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        return torch.cat(outs)

    # --- measurements --------------------------------------------------------------------------------
    def m_matmul_peak(self, spec: Spec) -> dict:
        n = 1024 if self.args.tiny else 8192
        dtype = torch.bfloat16
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        for _ in range(3):
            a @ b
        reps = 2 if self.args.tiny else 20
        with Timer(self.device) as tm:
            for _ in range(reps):
                a @ b
        s = tm.seconds / reps
        self.peak_tflops = 2 * n**3 / s / 1e12
        return dict(value=self.peak_tflops, unit="TFLOP/s", seconds=[tm.seconds], median_s=s,
                    notes=f"{n}^3 bf16, mean of {reps}")

    def m_conv_in_probe(self, spec: Spec) -> dict:
        """The UNet's first convolution alone (B x 4 x H x W latents, 320 filters 3x3, bf16), eager: its GPU time
        and the time the call takes to return to the CPU, with the input's 4 channels as they are and
        zero-padded to 8 (same output). Looks for the ~10 ms that the compiled forward idles before it."""
        conv = self.unet.conv_in
        w, b = conv.weight.detach().to(torch.bfloat16), conv.bias.detach().to(torch.bfloat16)
        x = self.noise.to(torch.bfloat16)
        out, notes = {}, []
        for c in (4, 8):
            xi = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, c - 4))
            wi = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, c - 4))

            def call(xi=xi, wi=wi):
                return torch.nn.functional.conv2d(xi, wi, b, padding=1)

            for _ in range(3):
                call()
            gpu, _ = timed(self.device, call, 10)
            host = host_seconds(self.device, call, 10)
            out[f"gpu_s_c{c}"], out[f"host_s_c{c}"] = median(gpu), host
            notes.append(f"{c} channels: GPU {1000 * median(gpu):.2f} ms, returns after {1000 * host:.2f} ms")
        out.update(value=out["host_s_c4"], unit="s (host, 4 channels)", median_s=out["gpu_s_c4"], notes="; ".join(notes))
        return out

    def m_teacher_fwd(self, spec: Spec) -> dict:
        prec = spec.extra["precision"]
        self.set_precision(prec)
        _, cond = self.inputs(replace(OURS, precision=prec))
        x = self.noise
        t = torch.full((self.B,), 500, dtype=torch.long)
        # ours: the teacher view (models.base_view); the reference and the +flags row: the UNet, adapter flags off
        view = spec.behaviour != "reference" and spec.extra.get("switch", "view") == "view"
        eps = self.teacher_unet_eps(bool(spec.extra.get("compile")), static=spec.extra.get("static", False),
                                    inductor=tuple(sorted(spec.extra.get("inductor", {}).items())),
                                    mode=spec.extra.get("compile_mode", "default"), view=view,
                                    nhwc=spec.extra.get("nhwc", False))
        out = {}
        def switch():
            return contextlib.nullcontext() if view else models.adapters_disabled(self.unet)

        def fwd():
            with torch.no_grad(), switch(), self.autocast(prec):
                return eps(x, t, cond)

        if self.flops_per_forward is None:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), models.adapters_disabled(self.unet), self.autocast(prec):
                with FlopCounterMode(display=False) as fc:
                    UNetEps(self.unet)(x, t, cond)
            self.flops_per_forward = float(fc.get_total_flops())
            log(f"  FLOPs of one teacher forward at batch {self.B}: {self.flops_per_forward / 1e12:.4g} TFLOP "
                f"({self.flops_per_forward / self.B / 1e12:.4g} per sample)")
        with Timer(self.device) as tm:
            fwd()
        if spec.extra.get("compile") or spec.extra.get("compile_blocks"):
            out["compile_s"] = tm.seconds
            log(f"  compile + first call: {tm.seconds:.1f} s")
        for _ in range(self.args.warmup_fwd - 1):
            fwd()
        # +skip_guards (measurement only, after the warm-up): dynamo runs only the guards that tell its cache
        # entries apart, which shows what the full guard check costs per call. Unsafe as a default.
        with (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if spec.extra.get("skip_guards")
              else contextlib.nullcontext()):
            times, _ = timed(self.device, fwd, self.args.repeats_fwd)  # each call from an idle GPU
            out["host_s_per_call"] = host_seconds(self.device, fwd)
            with Timer(self.device) as tm:  # the same calls back to back, as a sampler or the Direct CM loop
                for _ in range(self.args.repeats_fwd):  # issues them: the CPU's part overlaps the GPU's
                    fwd()
        out.update(host_syncs(self.device, fwd))  # a wait for the GPU inside the call would keep the GPU idle
        s = median(times)                          # while the CPU prepares the next one, even back to back
        out["back_to_back_s_per_call"] = b2b = tm.seconds / self.args.repeats_fwd
        tflops = self.flops_per_forward / s / 1e12
        if self.peak_tflops:
            out["fraction_of_matmul_peak"] = tflops / self.peak_tflops
            out["fraction_of_matmul_peak_back_to_back"] = self.flops_per_forward / b2b / 1e12 / self.peak_tflops
        out.update(value=tflops, unit="TFLOP/s", seconds=times, median_s=s,
                   ms_per_sample=1000 * s / self.B, tflop_per_forward=self.flops_per_forward / 1e12,
                   notes=f"{1000 * s / self.B:.1f} ms/sample, {len(times)} repeats"
                         + (f", {100 * out['fraction_of_matmul_peak']:.0f}% of the bf16 matmul peak"
                            if "fraction_of_matmul_peak" in out else "")
                         + (f"; compile {out['compile_s']:.0f} s" if "compile_s" in out else "")
                         + f"; the CPU returns after {1000 * out['host_s_per_call']:.1f} ms"
                         + f"; back to back {1000 * b2b:.1f} ms per call"
                         + (f" ({100 * out['fraction_of_matmul_peak_back_to_back']:.1f}%)"
                            if "fraction_of_matmul_peak_back_to_back" in out else "")
                         + (f"; {out['syncs_per_call']} host syncs per call" if "syncs_per_call" in out else ""))
        return out

    def m_student_step(self, spec: Spec) -> dict:
        """The student's part of every training step, without any teacher or target pass: its cost in
        forward-equivalents is this time over the eager teacher forward of the same batch and precision."""
        knobs = spec.knobs
        self.set_precision(knobs.precision)
        scaler = self.scaler_for(knobs.precision)
        latents, cond = self.inputs(knobs)
        models.set_lora_input_casting(self.unet, knobs.lora_cast == "fp32")
        t = self.grid.timestep(self.start)
        x_t = self.sched.add_noise(latents, self.noise, t)
        target = latents.clone()

        def step():
            return self.student_update(knobs, x_t, t, cond, target, scaler)

        step()  # warm-up
        times, _ = timed(self.device, step, self.args.repeats)
        s = median(times)
        out = dict(value=s, unit="s/step", seconds=times, median_s=s, processes=WORLD)
        fwd = self.results.get("teacher_fwd_ref" if knobs.precision == "fp16" else "teacher_fwd_ours", {})
        if fwd.get("status") == "ok":
            out["forward_equivalents"] = s / fwd["median_s"]
        out["notes"] = (f"{knobs.describe('cm')}; {len(times)} repeats"
                        + (f"; {out['forward_equivalents']:.2f} forward-equivalents (eager forward "
                           f"{fwd['median_s']:.3f} s)" if "forward_equivalents" in out else ""))
        return out

    def m_cm_step(self, spec: Spec) -> dict:
        knobs = spec.knobs
        self.set_precision(knobs.precision)
        scaler = self.scaler_for(knobs.precision)
        self.inputs(knobs)  # precomputation (when asked) happens here, untimed
        self.train_step("cm", knobs, self.start, scaler)  # warm-up
        times, counted = timed(self.device, lambda: self.train_step("cm", knobs, self.start, scaler),
                               self.args.repeats, "step")
        syncs = host_syncs(self.device, lambda: self.train_step("cm", knobs, self.start, scaler))
        s = median(times)
        return dict(value=s, unit="s/step", seconds=times, median_s=s, teacher_sample_forwards=counted.samples,
                    processes=WORLD, samples_per_s=WORLD * self.B / s, **syncs,
                    loss=float(counted.loss), notes=f"{knobs.describe('cm')}; {len(times)} repeats"
                    + (f"; {syncs['syncs_per_call']} host syncs per step" if syncs else ""))

    def m_direct_cm_step(self, spec: Spec) -> dict:
        knobs = spec.knobs
        self.set_precision(knobs.precision)
        scaler = self.scaler_for(knobs.precision)
        self.inputs(knobs)
        N, B = self.N, self.B
        # Warm-up at few steps. The per-sample loop's warm-up visits every active-set size B..1
        # (starts N-1, N-2, ...), so that each batch shape has been seen once before timing.
        if knobs.loop == "per_sample":
            warm = torch.tensor([N - 1 - (i % N) for i in range(B)])
        else:
            warm = torch.full((B,), N - 2)
        with Timer(self.device) as tm:
            self.train_step("direct_cm", knobs, warm, scaler)
        log(f"  warm-up ({int((N - warm).sum())} sample-steps): {tm.seconds:.2f} s")
        every = 25 if not self.args.tiny else 0
        times, counted = timed(self.device,
                               lambda: self.train_step("direct_cm", knobs, self.start, scaler, every=every),
                               self.args.repeats_direct_cm, "step")
        s = median(times)
        per_sample_steps = int((N - self.start).sum())
        ref_steps = int(N - self.start.min())
        return dict(value=s, unit="s/step", seconds=times, median_s=s, per_sample_steps_sum=per_sample_steps,
                    processes=WORLD, samples_per_s=WORLD * self.B / s,
                    reference_loop_steps=ref_steps, teacher_unet_calls=counted.calls,
                    teacher_sample_forwards=counted.samples, loss=float(counted.loss),
                    batched_cfg_calls=counted.guide.batched_calls, separate_cfg_calls=counted.guide.separate_calls,
                    notes=f"{knobs.describe('direct_cm')}; {counted.samples} teacher sample-forwards in "
                          f"{counted.calls} calls; {len(times)} timed")

    def m_direct_cm_pipeline(self, spec: Spec) -> dict:
        """Consecutive Direct CM steps as ``Trainer`` runs them with ``--teacher_lookahead K``: the next K
        batches' trajectories ride in the room of the current batch's teacher calls (``TrajectoryPool``),
        every step with freshly drawn starts. After a warm-up step (it has no head start), the timed
        steps give the teacher's seconds per sample-step at full calls; the expected step is then
        E[sum of N - n] = B (N + 1) / 2 sample-steps at that rate + the measured student step (in the steady
        state every call is full: ``tests/test_math.py``)."""
        knobs = spec.knobs
        self.set_precision(knobs.precision)
        scaler = self.scaler_for(knobs.precision)
        latents, cond = self.inputs(knobs)
        models.set_lora_input_casting(self.unet, knobs.lora_cast == "fp32")
        N, B, K = self.N, self.B, knobs.lookahead
        ctx, _ = self.context(knobs, 0, "pipeline", "direct_cm")
        calls = []
        pool = TrajectoryPool(ctx.step, ctx.teacher_eps, ctx.sched, ctx.grid, B, callback=calls.append)
        warm, timed_steps = 1, self.args.repeats_pipeline
        g = torch.Generator().manual_seed(self.args.seed)
        # K batches beyond the last timed step, as in a long run (without them the last steps' calls would run
        # partly empty: the 2026-11-27 blocks call had that, mean call size 15.3 of 16)
        starts = [torch.randint(0, N, (B,), generator=g) for _ in range(warm + timed_steps + K)]

        def x_t(k):
            return self.sched.add_noise(latents, self.noise, self.grid.timestep(starts[k]))

        submitted = 0

        def step(k):
            nonlocal submitted
            while submitted < len(starts) and submitted <= k + K:
                pool.submit(submitted, x_t(submitted), starts[submitted], cond)
                submitted += 1
            n0 = len(calls)
            # PEFT's switch (the reference's knob): once around the step's calls, as direct_cm_target does
            switch = self.adapter_switch(knobs.switch) if knobs.switch == "peft" else contextlib.nullcontext()
            with Timer(self.device) as tt, torch.no_grad(), self.autocast(knobs.precision), switch:
                target = pool.result(k)
            with Timer(self.device) as ts:
                self.student_update(knobs, x_t(k), self.grid.timestep(starts[k]), cond, target, scaler)
            done = calls[n0:]
            log(f"  step {k}: teacher {tt.seconds:.2f} s in {len(done)} calls ({sum(done)} sample-steps), "
                f"student {ts.seconds:.3f} s")
            return tt.seconds, ts.seconds, len(done), sum(done)

        for k in range(warm):
            step(k)
        parts = [step(k) for k in range(warm, warm + timed_steps)]
        teacher_s, student_s = sum(p[0] for p in parts), [p[1] for p in parts]
        n_calls, n_steps = sum(p[2] for p in parts), sum(p[3] for p in parts)
        per_sample_step = teacher_s / n_steps
        expected = B * (N + 1) / 2 * per_sample_step + median(student_s)
        measured = [p[0] + p[1] for p in parts]
        out = dict(value=expected, unit="s/step (expected)", median_s=expected, seconds=measured,
                   measured_mean_s=sum(measured) / len(measured), teacher_s_per_sample_step=per_sample_step,
                   teacher_s_per_full_call=per_sample_step * B, calls=n_calls, sample_steps=n_steps,
                   mean_call_size=n_steps / n_calls, student_step_s=median(student_s), lookahead=K)
        e_ref = self.expected_reference_s()
        note = ""
        if e_ref is not None:
            out["expected_ref_s"] = e_ref
            out["speed_up_expected"] = e_ref / expected
            note = f"; {out['speed_up_expected']:.2f}x the reference's expected {e_ref:.1f} s"
        out["notes"] = (f"{knobs.describe('direct_cm')}; {timed_steps} steps timed: {n_steps} sample-steps in "
                        f"{n_calls} calls (mean size {n_steps / n_calls:.1f}), {per_sample_step * B:.3f} s per full "
                        f"call, mean measured {out['measured_mean_s']:.1f} s/step" + note)
        return out

    def m_teacher_images(self, spec: Spec) -> dict:
        knobs = spec.knobs
        prec = knobs.precision
        self.set_precision(prec)
        batch = spec.extra["batch"] or self.B
        k = self.args.teacher_steps_timed or self.N
        part = Grid(self.sched.T, k)  # same per-step cost as the N-grid; scaled by N / k below
        n_runs = self.args.ref_images if batch == 1 else self.args.repeats
        self.place_encoders(replace(knobs, offload=False))  # prompts are encoded per batch, in the timed region
        # Sampling runs the teacher alone (the reference script: a plain pipeline): one switch per batch.
        teacher_eps, _ = self.guided_teacher(knobs.cfg, batch, compile=knobs.compile, switch=None,
                                             view=knobs.switch == "view")

        def one(i, grid):
            idx = slice(i * batch % self.B, i * batch % self.B + batch)
            with Timer(self.device) as t_enc:  # the prompts of this batch, both text encoders
                cond = self.encode_conditioning(self.captions[idx], prec)
            with Timer(self.device) as t_smp, torch.no_grad(), self.autocast(prec), \
                    self.adapter_switch("view" if knobs.switch == "view" else "flags"):
                x0 = teacher_sample(self.step_fn, teacher_eps, self.x_T[idx], cond, self.sched, grid)
            with Timer(self.device) as t_dec:
                self.decode(x0)
            return t_enc.seconds, t_smp.seconds, t_dec.seconds

        one(0, Grid(self.sched.T, 1))  # warm-up
        totals, parts = [], []
        for i in range(n_runs):
            e, s, d = one(i, part)
            total = e + s * self.N / k + d
            totals.append(total)
            parts.append((e, s, d))
            log(f"  {batch} image(s): encode {e:.3f} s, {k} steps {s:.3f} s (x{self.N / k:g}), decode {d:.3f} s")
        tot = median(totals)
        return dict(value=WORLD * batch / tot, unit="img/s", seconds=totals, median_s=tot,
                    seconds_per_image=tot / batch, processes=WORLD,
                    steps_timed=k, steps_total=self.N, encode_s=median([p[0] for p in parts]),
                    sample_s_scaled=median([p[1] for p in parts]) * self.N / k, decode_s=median([p[2] for p in parts]),
                    notes=f"{prec}, batch {batch}, cfg={knobs.cfg}; timed {k} of {self.N} steps and scaled x"
                          f"{self.N / k:g}, decode + prompt encode timed in full; {n_runs} runs")

    def m_student_images(self, spec: Spec) -> dict:
        prec = spec.extra["precision"]
        self.set_precision(prec)
        batch = spec.extra["batch"] or self.B
        n_runs = self.args.ref_images if batch == 1 else self.args.repeats
        self.place_encoders(REF)

        def one(i):
            idx = slice(i * batch % self.B, i * batch % self.B + batch)
            with Timer(self.device) as tm, torch.no_grad():
                cond = self.encode_conditioning(self.captions[idx], prec)
                with self.autocast(prec):
                    x0 = student_sample(UNetEps(self.unet), self.x_T[idx], cond, self.sched, self.grid,
                                        self.args.student_steps)
                self.decode(x0)
            return tm.seconds

        one(0)  # warm-up
        times = [one(i) for i in range(n_runs)]
        s = median(times)
        return dict(value=WORLD * batch / s, unit="img/s", seconds=times, median_s=s, seconds_per_image=s / batch,
                    processes=WORLD,
                    notes=f"{prec}, batch {batch}, {self.args.student_steps} steps, prompt encode + decode "
                          f"included; {n_runs} runs")

    def m_direct_cm_calls(self, spec: Spec) -> dict:
        """Seconds per guided teacher call of a Direct CM step's loop. The reference loop always calls the
        full batch (its step also encodes the prompts and images: timed here too); the per-sample loop
        calls the active set, of every size 1..B over a step (adaptive CFG: one call of 2a when a <= B/2)."""
        knobs = spec.knobs
        self.set_precision(knobs.precision)
        latents, cond = self.inputs(knobs)
        out = {"per_step_s": 0.0}
        if knobs.inputs == "encode":
            times, _ = timed(self.device, lambda: self.inputs(knobs), self.args.repeats)
            out["encode_s"] = median(times)
            out["per_step_s"] += out["encode_s"]
        once = knobs.switch == "peft"  # the reference switches the adapter off once per Direct CM step
        if once:
            def switch_pair():
                with self.adapter_switch(knobs.switch):
                    pass
            times, _ = timed(self.device, switch_pair, self.args.repeats)
            out["switch_s"] = median(times)
            out["per_step_s"] += out["switch_s"]
        teacher_eps, counted = self.guided_teacher(knobs.cfg, self.B, compile=knobs.compile,
                                                   switch=None if once else knobs.switch, mode=knobs.compile_mode)
        t = self.grid.timestep(torch.full((self.B,), self.N // 2))
        sizes = [self.B] if knobs.loop == "reference" else list(range(1, self.B + 1))

        def call(a):  # (the reference loop's one switch per step is timed above, in switch_s)
            with torch.no_grad(), self.autocast(knobs.precision), \
                    (self.adapter_switch("flags") if once else contextlib.nullcontext()):
                return teacher_eps(self.noise[:a], t[:a], {k: v[:a] for k, v in cond.items()})

        for a in sizes:  # warm-up: every shape once (a compiled teacher specializes batch 1 and 2)
            call(a)
        per_size = {}
        for a in sizes:
            times, _ = timed(self.device, lambda: call(a), self.args.repeats)
            per_size[a] = median(times)
        out.update(value=per_size[self.B], unit="s/call", seconds=[per_size[self.B]], median_s=per_size[self.B],
                   seconds_per_call={str(a): v for a, v in per_size.items()},
                   notes=f"{knobs.describe('direct_cm')}; " + ", ".join(f"{a}: {v:.3f}" for a, v in per_size.items())
                         + (f"; encode {out['encode_s']:.3f} s" if "encode_s" in out else "")
                         + (f"; adapter switch {out['switch_s']:.3f} s" if "switch_s" in out else ""))
        return out

    def start_draws(self) -> torch.Tensor:
        """The Direct CM start indices over which expected steps are taken: ``--expected_draws`` batches of B,
        each n uniform on 0..N-1 (as ``Trainer.prepare`` draws them), the same draws in every row."""
        return torch.randint(0, self.N, (self.args.expected_draws, self.B), generator=torch.Generator().manual_seed(0))

    def expected_reference_s(self) -> float | None:
        """The reference loop's expected Direct CM step (as in ``m_direct_cm_expected``) from this run's rows
        direct_cm_calls_ref and student_step_ref; None without them."""
        res = self.results
        if any(res.get(n, {}).get("status") != "ok" for n in ("direct_cm_calls_ref", "student_step_ref")):
            return None
        longest = (self.N - self.start_draws()).max(dim=1).values.double().mean()
        calls = res["direct_cm_calls_ref"]
        return float(longest * calls["median_s"] + calls["per_step_s"] + res["student_step_ref"]["median_s"])

    def m_direct_cm_expected(self, spec: Spec) -> dict:
        """The expected Direct CM step over the training distribution of start indices (each sample's n
        uniform on 0..N-1, as ``Trainer.loss`` draws it), from measured parts: the reference loop runs
        N - min(n) full-batch calls; the per-sample loop runs, for a = B..1, (L_(a) - L_(a+1)) calls of the
        a samples still active (L = N - n sorted descending); + each behaviour's measured student step."""
        res = self.results
        # "" or "+<knob>[+<knob>...]": ours' calls and student rows of those knobs (the plain row where a knob
        # leaves that part alone, e.g. +cudagraphs the student step and +micro4 the teacher calls)
        variant = spec.name[len("direct_cm_expected"):]
        knobs = [k for k in variant.split("+") if k]

        def row_for(prefix: str) -> str:
            """The successful row prefix+K1+K2... with the most of the variant's knobs (and no other), in any
            order; ties by name. The plain row when none has any."""
            rows = [(len(k.split("+")) - 1, k) for k, r in res.items() if k.startswith(prefix + "+")
                    and r.get("status") == "ok" and set(k.split("+")[1:]) <= set(knobs)]
            return max(rows, key=lambda nk: (nk[0], nk[1]))[1] if rows else prefix

        calls_ours, student_ours = row_for("direct_cm_calls_ours"), row_for("student_step_ours")
        covered = set(calls_ours.split("+")[1:]) | set(student_ours.split("+")[1:])
        if set(knobs) - covered:
            raise RuntimeError(f"{spec.name} needs rows direct_cm_calls_ours+K or student_step_ours+K for "
                               f"{', '.join(sorted(set(knobs) - covered))} earlier in --only")
        need = ["direct_cm_calls_ref", "student_step_ref", student_ours, calls_ours]
        missing = [n for n in need if res.get(n, {}).get("status") != "ok"]
        if missing:
            raise RuntimeError(f"direct_cm_expected needs the rows {', '.join(missing)} earlier in --only")
        B, N = self.B, self.N
        t_ref = res["direct_cm_calls_ref"]["median_s"]
        enc_ref = res["direct_cm_calls_ref"]["per_step_s"]  # prompt + VAE encode, one adapter switch
        per = res[calls_ours]["seconds_per_call"]
        t_ours = torch.tensor([0.0] + [per[str(a)] for a in range(1, B + 1)], dtype=torch.float64)
        s_ref, s_ours = res["student_step_ref"]["median_s"], res[student_ours]["median_s"]

        def predict(starts: torch.Tensor):  # starts [M, B] -> (reference, ours) seconds, each [M]
            L = (N - starts).double().sort(dim=1, descending=True).values
            runs = L - torch.cat([L[:, 1:], torch.zeros_like(L[:, :1])], dim=1)  # calls at active size a = 1..B
            ours = (runs * t_ours[1:]).sum(1) + s_ours
            ref = L[:, 0] * t_ref + enc_ref + s_ref
            return ref, ours

        draws = self.start_draws()
        ref, ours = predict(draws)
        seed_ref, seed_ours = (float(v) for v in predict(self.start[None]))
        e_ref, e_ours = float(ref.mean()), float(ours.mean())
        out = dict(value=e_ref / e_ours, unit="x (expected speed-up)", median_s=e_ours, seconds=[e_ours],
                   expected_ref_s=e_ref, expected_ours_s=e_ours, draws=self.args.expected_draws,
                   ratio_of_means=e_ref / e_ours, mean_of_ratios=float((ref / ours).mean()),
                   predicted_seed_ref_s=seed_ref, predicted_seed_ours_s=seed_ours, calls_row=calls_ours,
                   student_row=student_ours)
        for name, key in (("direct_cm_step_ref", "predicted_seed_ref_s"), ("direct_cm_step_ours", "predicted_seed_ours_s")):
            if res.get(name, {}).get("status") == "ok":
                out[f"measured_{name}_s"] = res[name]["median_s"]
        out["notes"] = (f"E[reference] {e_ref:.1f} s, E[ours] {e_ours:.1f} s over {self.args.expected_draws} draws "
                        f"of {B} starts; seed {self.args.seed}'s starts predicted {seed_ref:.1f} / {seed_ours:.1f} s"
                        + "".join(f"; measured {k[9:-2]} {v:.1f} s" for k, v in out.items()
                                  if k.startswith("measured_")))
        return out

    def m_direct_cm_agreement(self, spec: Spec) -> dict:
        """float32, no autocast: ours (solve_to_zero per sample, adaptive CFG, via objectives.direct_cm_target)
        against the reference loop (solve_to_zero_reference, separate CFG), same x_t and starts."""
        self.set_precision("fp32")
        self.place_encoders(REF)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            if self.args.tiny:  # the whole batch, the same start indices as the timed steps
                start, rows = self.start, slice(0, self.B)
            else:  # two samples near the end of the grid: both CFG paths, a few seconds in fp32
                start, rows = torch.tensor([self.N - 3, self.N - 1]), slice(0, 2)
            b = start.numel()
            cond = {k: v[rows] for k, v in self.encode_conditioning(self.captions[rows], "fp32").items()}
            x_t = self.sched.add_noise(self.x_T[rows], self.noise[rows], self.grid.timestep(start))
            ref_eps, _ = self.guided_teacher("separate", b)
            ours_eps, ours_count = self.guided_teacher("adaptive", b)
            ctx = DistillContext(teacher_eps=ours_eps, student_eps_nograd=UNetEps(self.unet), step=self.step_fn,
                                 sched=self.sched, grid=self.grid)
            with Timer(self.device) as tm:
                ours = direct_cm_target(ctx, x_t, start, cond)
                with torch.no_grad():
                    ref = solve_to_zero_reference(self.step_fn, ref_eps, x_t, start, cond, self.sched, self.grid)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        diff = float((ours - ref).abs().max())
        scale = float(ref.abs().max())
        rel = diff / max(1.0, scale)
        tol = self.args.agreement_tol
        ok = bool(math.isfinite(rel) and rel <= tol)
        return dict(value=rel, unit="max|d|/max(1,max|ref|)", seconds=[tm.seconds], median_s=tm.seconds,
                    max_abs_diff=diff, max_abs_target=scale, max_rel_diff=rel, tolerance=tol, agree=ok,
                    samples=b, starts=start.tolist(), ours_batched_cfg_calls=ours_count.guide.batched_calls,
                    ours_separate_cfg_calls=ours_count.guide.separate_calls,
                    notes=f"{'AGREE' if ok else 'DISAGREE'} (tol {tol:g}); {b} samples, starts {start.tolist()}, "
                          f"max|target| {scale:.3g}")

    # --- driver ------------------------------------------------------------------------------------
    def run_one(self, spec: Spec):
        fn = {"peak": self.m_matmul_peak, "probe": self.m_conv_in_probe, "teacher_fwd": self.m_teacher_fwd, "student_step": self.m_student_step,
              "cm_step": self.m_cm_step, "direct_cm_step": self.m_direct_cm_step,
              "teacher_images": self.m_teacher_images, "student_images": self.m_student_images,
              "direct_cm_calls": self.m_direct_cm_calls, "direct_cm_expected": self.m_direct_cm_expected,
              "direct_cm_pipeline": self.m_direct_cm_pipeline, "check": self.m_direct_cm_agreement}[spec.group]
        if self.args.no_compile and spec.knobs is not None and (spec.knobs.compile or spec.knobs.compile_student
                                                                or spec.knobs.compile_blocks):
            spec = replace(spec, knobs=replace(spec.knobs, compile=False, compile_student=False, compile_blocks=False))
        if self.args.no_compile and (spec.extra or {}).get("compile_blocks"):
            spec = replace(spec, extra={**spec.extra, "compile_blocks": False})
        log(f"[{spec.name}] {spec.what}")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row = {"group": spec.group, "behaviour": spec.behaviour, "what": spec.what,
               "knobs": asdict(spec.knobs) if spec.knobs else None}
        try:
            if spec.name == self.args.inject_oom:  # tests: the failure isolation and the OOM row
                raise torch.OutOfMemoryError("CUDA out of memory (injected by --inject_oom)")
            knob = (lambda k: getattr(spec.knobs, k)) if spec.knobs else (lambda k: (spec.extra or {}).get(k, False))
            self.set_layout(bool(knob("channels_last")))
            self.set_conv_in_padding(bool((spec.extra or {}).get("pad_conv_in")))
            blocks = knob("compile_blocks") or False  # False | True | a torch.compile mode for the blocks
            if blocks != self._blocks_compiled:
                if self._blocks_compiled:
                    models.compile_blocks(self.unet, False)
                    models.compile_blocks(self.view, False)
                    if blocks:  # another mode for the blocks: from a clean dynamo state
                        torch._dynamo.reset()
                        self._compiled = self._compiled_student = self._merged = None
                self._blocks_compiled = blocks
                if blocks:  # the student's blocks and the teacher view's (each compiles at its first call)
                    for tree in (self.unet, self.view):
                        models.compile_blocks(tree, backend=self.args.compile_backend,
                                              mode=blocks if isinstance(blocks, str) else None)
            if spec.knobs is not None:  # the plan's dry run uses the frozen weights' dtype: set it first
                self.set_precision(spec.knobs.precision)
            self.set_checkpointing(float(knob("checkpoint_budget_gib") or 0), int(knob("micro_batch") or 0))
            torch.backends.cudnn.benchmark = bool(knob("cudnn_benchmark"))
            devices.ASYNC_COPIES = spec.knobs is None or spec.knobs.h2d == "async"
            cudnn_attention = knob("attention") == "cudnn"
            torch.backends.cuda.enable_flash_sdp(not cudnn_attention)
            torch.backends.cuda.enable_mem_efficient_sdp(not cudnn_attention)
            torch.backends.cuda.enable_cudnn_sdp(True)
            PROFILE.active, PROFILE.result = spec.name in self.args.profile, None
            self._cm_ahead.clear()
            with torch._inductor.config.patch((spec.extra or {}).get("inductor", {})):  # the row's settings
                row.update(fn(spec))
            if PROFILE.result is not None:
                row["profile"] = PROFILE.result
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is reported in its row; the others still run
            row["status"] = "oom" if is_oom(e) else "error"
            row["error"] = error_line(e)
            log(f"  FAILED ({row['status']}): {row['error']}")
            if row["status"] == "error":
                traceback.print_exc(file=sys.stdout)
                sys.stdout.flush()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                torch.cuda.empty_cache()
            else:
                row["peak_mem_gib"] = None  # no per-measurement peak on the CPU
        row["wall_s"] = time.perf_counter() - t0
        self.results[spec.name] = row
        if row["status"] == "ok":
            mem = f", peak {row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else ""
            log(f"  -> {fmt_value(row)}{mem} ({row['wall_s']:.1f} s wall)")


def fmt_value(row) -> str:
    v, u = row.get("value"), row.get("unit", "")
    if v is None:
        return ""
    if u == "s/step":
        return f"{v:.3f} s/step"
    if u == "img/s":
        return f"{v:.3f} img/s"
    if u == "TFLOP/s":
        return f"{v:.1f} TFLOP/s" if v >= 1 else f"{v:.3g} TFLOP/s"
    if u == "s/call":
        return f"{v:.3f} s/call"
    if u.startswith("x "):
        return f"{v:.2f}{u}"
    return f"{v:.2e} {u}"


def print_table(bench: Bench, selected: list[Spec]):
    rows = [("measurement", "behaviour", "result", "median s", "peak GiB", "notes")]
    for spec in selected:
        r = bench.results.get(spec.name)
        if r is None:
            continue
        if r["status"] != "ok":
            res = r["status"].upper()
            notes = r.get("error", "")
        else:
            res, notes = fmt_value(r), r.get("notes", "")
        med = f"{r['median_s']:.3f}" if r.get("median_s") is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "n/a"
        rows.append((spec.name, spec.behaviour, res, med, mem, notes))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + " | " + r[5])
        if i == 0:
            print("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    # Ours vs the reference, per group.
    lines = []
    for group, better in [("teacher_fwd", "higher"), ("cm_step", "lower"), ("direct_cm_step", "lower"),
                          ("teacher_images", "higher"), ("student_images", "higher")]:
        ref, ours = bench.results.get(f"{group}_ref"), bench.results.get(f"{group}_ours")
        if ref and ours and ref["status"] == ours["status"] == "ok":
            f = ours["value"] / ref["value"] if better == "higher" else ref["value"] / ours["value"]
            lines.append(f"  {group}: ours {f:.2f}x the reference")
    e = bench.results.get("direct_cm_expected")
    if e and e["status"] == "ok":
        lines.append(f"  direct_cm_step, expected over the start distribution: ours {e['value']:.2f}x the reference "
                     f"({e['expected_ours_s']:.1f} vs {e['expected_ref_s']:.1f} s)")
    d = bench.results.get("direct_cm_step_ours") or bench.results.get("direct_cm_step_ref")
    if d and d["status"] == "ok":
        lines.append(f"  Direct CM starts (seed {bench.args.seed}): {bench.start.tolist()}; sum of per-sample steps "
                     f"{d['per_sample_steps_sum']} (ours), reference loop {d['reference_loop_steps']} steps x "
                     f"{bench.B} = {d['reference_loop_steps'] * bench.B} sample-steps")
    if lines:
        print("\nspeed-ups (ours vs reference):")
        print("\n".join(lines))
    failed = [s.name for s in selected if s.name in bench.results and bench.results[s.name]["status"] != "ok"]
    if bench.args.memory_cap_gib:
        fits = [s.name for s in selected if s.name in bench.results and bench.results[s.name]["status"] == "ok"]
        print(f"\nunder the {bench.args.memory_cap_gib:g} GiB cap: fits: {', '.join(fits) or 'nothing'}; "
              f"fails: {', '.join(failed) or 'nothing'}")
    elif failed:
        print(f"\nfailed: {', '.join(failed)}")
    sys.stdout.flush()


def environment(device: torch.device) -> dict:
    import diffusers
    import peft
    import transformers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "python": platform.python_version(), "device": str(device),
           "timer": timer_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   card_memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count)
    else:
        env.update(card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                   cuda=torch.version.cuda)
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Reference vs ours: seconds per CM / Direct CM step, images per second, "
                                            "memory and TFLOP/s on an SDXL-architecture model with random weights.")
    p.add_argument("--tiny", action="store_true", help="tiny SDXL config, 64 px, N=10: runs on a CPU in < 1 minute")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--only", default=None, help=f"comma-separated measurements, run in the order given (default: "
                   f"all but the optional ones). Names: {', '.join(s.name for s in SPECS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of the short measurements "
                   "(default 3; 1 with --tiny); the teacher forward uses 4x this (2 with --tiny)")
    p.add_argument("--repeats_direct_cm", type=int, default=1, help="timed Direct CM steps (after one short warm-up)")
    p.add_argument("--repeats_pipeline", type=int, default=3,
                   help="direct_cm_steps_*: consecutive Direct CM steps timed (after 1 warm-up step)")
    p.add_argument("--profile", default="", help="comma-separated measurements to run once more under "
                   "torch.profiler after timing them: kernel time by kind and the top kernels, in the row")
    p.add_argument("--json", default=None, help="write every number, the card, versions and settings here")
    p.add_argument("--no_compile", action="store_true", help="ours without torch.compile (no compile time)")
    p.add_argument("--compile_backend", default=None, help="default inductor (--tiny: aot_eager, i.e. dynamo's "
                   "graph capture and AOTAutograd without code generation, to stay fast on a CPU)")
    p.add_argument("--memory_cap_gib", type=float, default=None,
                   help="torch.cuda.set_per_process_memory_fraction to this many GiB (e.g. 24) before anything else")
    p.add_argument("--batch_size", type=int, default=None, help="B (default 16; 4 with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default 1024 (64 with --tiny)")
    p.add_argument("--num_discr_timesteps", type=int, default=None, help="N (default 100; 10 with --tiny)")
    p.add_argument("--w", type=float, default=9.0, help="teacher guidance scale (Imagen form)")
    p.add_argument("--lora_rank", type=int, default=None, help="default 64 (4 with --tiny)")
    p.add_argument("--student_steps", type=int, default=4)
    p.add_argument("--teacher_steps_timed", type=int, default=None,
                   help="teacher sampling: time this many of the N steps and scale (must divide 1000; "
                        "default 10, 5 with --tiny; 0 = all N)")
    p.add_argument("--ref_images", type=int, default=None,
                   help="images timed for the one-at-a-time reference samplers (default 2; 1 with --tiny)")
    p.add_argument("--decode_batch", type=int, default=None, help="VAE decode chunk (default: the whole batch)")
    p.add_argument("--vae_encode_batch", type=int, default=8, help="VAE encode chunk (the training default, 8)")
    p.add_argument("--agreement_tol", type=float, default=1e-4)
    p.add_argument("--expected_draws", type=int, default=100_000,
                   help="direct_cm_expected: draws of B start indices averaged over")
    p.add_argument("--seed", type=int, default=24, help="seed of the data, noise and Direct CM start indices")
    p.add_argument("--inject_oom", default=None, help=argparse.SUPPRESS)  # tests: fail this measurement with an OOM
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.num_discr_timesteps = args.num_discr_timesteps or (10 if args.tiny else 100)
    args.lora_rank = args.lora_rank or (4 if args.tiny else 64)
    args.batch_size = args.batch_size or (4 if args.tiny else 16)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.repeats_fwd = 2 if args.tiny else 4 * args.repeats
    args.warmup_fwd = 1 if args.tiny else 2
    args.ref_images = args.ref_images or (1 if args.tiny else 2)
    if args.teacher_steps_timed is None:
        args.teacher_steps_timed = 5 if args.tiny else 10
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SPEC_BY_NAME and not n.startswith(EXPECTED_VARIANT)]
        if unknown:
            p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(SPEC_BY_NAME)}")
        args.selected = [spec_named(n) for n in dict.fromkeys(names)]  # in the order given
    else:
        args.selected = [s for s in SPECS
                         if s.default and not (args.no_compile and s.name == "teacher_fwd_ours_compiled")]
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    args.profile = {n.strip() for n in args.profile.split(",") if n.strip()}
    if args.profile - {s.name for s in args.selected}:
        p.error(f"--profile: not measured in this run: {', '.join(sorted(args.profile - {s.name for s in args.selected}))}")
    if args.teacher_steps_timed:
        Grid(1000, args.teacher_steps_timed)  # must divide T
    return args


def write_json(args, bench: Bench, env: dict) -> bool:
    if not args.json or RANK != 0:
        return False
    settings = {k: v for k, v in vars(args).items() if k != "selected"}
    settings.update(selected=[s.name for s in args.selected], solver="ddim",
                    start_indices=bench.start.tolist(), lora_targets=list(models.DEFAULT_LORA_TARGETS),
                    per_sample_steps_sum=int((bench.N - bench.start).sum()),
                    reference_loop_steps=int(bench.N - bench.start.min()))
    out = {"env": env, "settings": settings, "param_counts": bench.param_counts,
           "flops_per_teacher_forward": bench.flops_per_forward, "measurements": bench.results,
           "total_wall_s": time.perf_counter() - T0}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, path)
    return True


def main(argv=None):
    args = parse_args(argv)
    if WORLD > 1:  # one process per GPU (torchrun --nproc_per_node=N benchmarks/bench.py ...)
        local = int(os.environ.get("LOCAL_RANK", RANK))
        cuda = torch.cuda.is_available() and not args.device.startswith("cpu")
        args.device = f"cuda:{local}" if cuda else "cpu"
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             device_id=torch.device(args.device) if cuda else None)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" alone has no index to set
    if device.type == "cuda":
        torch.cuda.set_device(device)  # peak-memory stats and synchronize() read the current device
    if args.memory_cap_gib:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            frac = min(1.0, args.memory_cap_gib * 2**30 / total)
            torch.cuda.set_per_process_memory_fraction(frac, device)
            log(f"memory cap: {args.memory_cap_gib:g} GiB = {frac:.3f} of {total / 2**30:.1f} GiB")
        else:
            log("--memory_cap_gib applies to CUDA devices only; ignored on the CPU")
    env = environment(device)
    env["processes"] = WORLD
    log(f"device {env['card']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; "
        f"timer: {env['timer']}")
    log(f"settings: {args.resolution} px, batch {args.batch_size}, N={args.num_discr_timesteps}, DDIM, "
        f"w={args.w:g}, LoRA rank {args.lora_rank}; measurements: {', '.join(s.name for s in args.selected)}")
    bench = Bench(args)
    bench.build()
    log(f"Direct CM start indices (seed {args.seed}): {bench.start.tolist()}; per-sample steps sum "
        f"{int((bench.N - bench.start).sum())}, reference loop {int(bench.N - bench.start.min())} steps")
    for spec in args.selected:
        bench.run_one(spec)
        write_json(args, bench, env)  # after every row: a run cut short keeps what it measured
        if WORLD > 1 and bench.results[spec.name]["status"] != "ok":
            # The other processes may be waiting in a collective of this measurement: stop them all.
            print(f"rank {RANK}: {spec.name} failed; stopping (the JSON keeps the rows measured)", flush=True)
            sys.exit(1)
    if RANK == 0:
        print_table(bench, args.selected)
    log(f"total wall time {time.perf_counter() - T0:.0f} s")
    if write_json(args, bench, env):
        log(f"wrote {args.json}")
    # Failures are in the table; the exit status is 1 for an error, or an OOM without --memory_cap_gib.
    bad = [r for r in bench.results.values()
           if r["status"] == "error" or (r["status"] == "oom" and not args.memory_cap_gib)]
    if WORLD > 1:
        torch.distributed.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
