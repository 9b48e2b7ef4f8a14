#!/usr/bin/env python
"""The paper's behaviour ("reference") and ours, side by side, on full-size SDXL with random weights (the networks
of ``random_sdxl.py``, no download): the teacher forward, the student's part of a step, the CM and Direct CM
training steps and teacher reference images, in one process on one card. Every timed training step is the
product's step (``cmdistill.step.distill_loss`` with the trainer's target source, ``fast.target_source``) on
batches from ``inputs.prepare``; ours gets its eps functions from ``fast.build`` with the compiled set of
``--compile on`` for the objective (``fast.plan.on_flags``). A failed row is recorded and the next row runs.
benchmarks/README.md lists the rows and what each side runs; RESULTS.md holds the numbers.

    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --tiny --device cpu --json tiny.json     # the tiny random SDXL on a CPU (the test)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # random_sdxl, and cmdistill from a checkout

import torch  # noqa: E402
from torch.utils.benchmark import Timer, timer as clock  # noqa: E402  (clock: synchronize, then wall time)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cmdistill import fast, models, tiny  # noqa: E402
from cmdistill.errors import one_line  # noqa: E402
from cmdistill.evaluation.generate import Models, conditioning, decode, teacher_sampler  # noqa: E402
from cmdistill.guidance import GuidedEps, UNetEps  # noqa: E402
from cmdistill.inputs import Encoders, prepare  # noqa: E402
from cmdistill.objectives import DistillContext  # noqa: E402
from cmdistill.optimizer import make_optimizer  # noqa: E402
from cmdistill.schedule import Grid, NoiseSchedule, host_to  # noqa: E402
from cmdistill.solvers import get_solver, solve_to_zero_reference  # noqa: E402
from cmdistill.step import LossConfig, ObjectiveTargets, distill_loss  # noqa: E402
from random_sdxl import count_params, full_size_components  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def expected_longest_trajectory(N: int, B: int) -> float:
    """E[N - min n] over B starts n uniform on 0..N-1: the calls of the reference's masked full-batch loop
    (sum over k of P(max (N - n) >= k)). N = 100, B = 16: 94.6."""
    return sum(1 - ((k - 1) / N) ** B for k in range(1, N + 1))


def timed(fn, repeats: int = 1) -> tuple[list, object]:
    """``fn()`` timed ``repeats`` times, each from an idle GPU; returns the seconds and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    return times, out


def per_step(times, **extra) -> dict:
    s = statistics.median(times)
    return dict(value=s, unit="s/step", seconds=times, median_s=s, **extra)


@contextlib.contextmanager
def adapters_off(unet):
    """The reference scripts' teacher: the LoRA UNet under PEFT's own adapter switch."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


# Who runs a row: the paper's behaviour (ref) or ours; the precision of the frozen weights and autocast (LoRA weights
# fp32 in both; fp16 adds a GradScaler); ours compiled as COMPILE=1 or not.
Side = collections.namedtuple("Side", "ref dtype compile")
REF = Side(True, torch.float16, False)
EAGER, OURS = Side(False, torch.bfloat16, False), Side(False, torch.bfloat16, True)
ROWS = [  # (name, method, side, what), run in this order: the reference first, so the weights change precision once
    ("matmul_peak", "matmul_peak", None, "bf16 matrix product 8192^3: the card's attainable dense rate"),
    ("teacher_fwd_ref", "teacher_fwd", REF, "teacher forward, batch B: fp16 eager, the LoRA UNet under PEFT's switch"),
    ("student_step_ref", "student_step", REF, "the student's part of a step against a fixed target"),
    ("cm_step_ref", "cm_step", REF, "CM training step"),
    ("direct_cm_step_ref", "direct_cm_step", REF, "Direct CM step (the masked full-batch loop), expected over starts"),
    ("teacher_images_ref", "teacher_images", REF, "teacher references as the paper's test_teacher.py"),
    ("teacher_fwd_ours", "teacher_fwd", EAGER, "teacher forward, batch B: bf16 eager, the teacher view"),
    ("teacher_fwd_ours_compiled", "teacher_fwd", OURS, "teacher forward, batch B: Direct CM's COMPILE=1 teacher"),
    ("student_step_ours", "student_step", OURS, "the student's part of a step against a fixed target"),
    ("cm_step_ours", "cm_step", OURS, "CM training step"),
    ("direct_cm_step_ours", "direct_cm_step", OURS, "Direct CM steps (the trajectory pool), expected over starts"),
    ("teacher_images_ours", "teacher_images", OURS._replace(dtype=torch.float16), "teacher references as "
     "scripts/test_teacher.sh"),
]
ROW_NAMES = [r[0] for r in ROWS]
PAIRS = [("teacher_fwd_ref", "teacher_fwd_ours_compiled"), ("student_step_ref", "student_step_ours"),
         ("cm_step_ref", "cm_step_ours"), ("direct_cm_step_ref", "direct_cm_step_ours"),
         ("teacher_images_ref", "teacher_images_ours")]


class Bench:
    def __init__(self, args):
        from transformers import CLIPTokenizer

        self.args, self.device, self.w = args, torch.device(args.device), 9.0  # w: the paper's guidance scale
        dev, self.B, self.res, self.N = self.device, args.batch_size, args.resolution, args.num_discr_timesteps
        self.h = self.res // 8  # the latents' side
        self.results, self.flops_per_forward, self.peak_tflops = {}, None, None
        self._dtype = self._checkpointing = None
        self._fast, self._precomputed, self.optimizer_steps = {}, {}, 0
        log(f"building {'tiny' if args.tiny else 'full-size SDXL'} components with random weights on {dev}")
        c = tiny.tiny_sdxl_components(sample_size=self.h) if args.tiny else full_size_components(dev)
        unet, vae, te1, te2 = (c[k].to(dev) for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
        self.param_counts = {k: count_params(c[k]) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
        with tempfile.TemporaryDirectory() as d:
            tok = CLIPTokenizer.from_pretrained(tiny.write_clip_tokenizer(Path(d) / "tokenizer"))
        for m in (unet, vae, te1, te2):
            m.requires_grad_(False).eval()
        self.unet, self.vae, self.tokenizers, self.text_encoders = unet, vae, [tok, tok], [te1, te2]
        # The student as cmdistill.train.Trainer builds it: LoRA on the default targets, fp32 adapter weights,
        # gradient checkpointing, AdamW (torch's: the recipe's 8-bit Adam needs bitsandbytes' GPU kernels).
        models.add_lora(unet, args.lora_rank, args.lora_rank)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        unet.train()
        self.param_counts["lora"] = sum(p.numel() for p in self.params)
        self.optimizer = make_optimizer(SimpleNamespace(
            use_8bit_adam=False, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
            adam_epsilon=1e-8), self.params)
        self.scalers = {dt: torch.amp.GradScaler(dev.type, enabled=dt == torch.float16)
                        for dt in (torch.float16, torch.bfloat16)}
        self.sched, self.grid, self.solver = NoiseSchedule.sdxl(), Grid(1000, self.N), get_solver("ddim")
        g = torch.Generator().manual_seed(args.seed)
        self.captions = [f"a photograph of subject {i}, detailed, golden hour" for i in range(self.B)]
        self.data = {"pixel_values": torch.rand(self.B, 3, self.res, self.res, generator=g) * 2 - 1,  # on the host
                     "captions": self.captions, "original_sizes": [(self.res,) * 2] * self.B,
                     "crop_top_lefts": [(0, 0)] * self.B}
        self.x_T = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
        log("parameters: " + ", ".join(f"{k} {v:,}" for k, v in self.param_counts.items()))

    # --- the state of a side ---------------------------------------------------------------------------------
    def use(self, side: Side):
        """Frozen weights in the side's dtype, PEFT's LoRA-input copy (the reference's), the host-to-device copy of
        the schedule and the checkpointing plan (ours: ``--checkpointing_budget_gib``), as the trainer sets them."""
        if side.dtype != self._dtype:
            for m in [self.unet, self.vae, *self.text_encoders]:
                for t in [*m.parameters(), *m.buffers()]:
                    if not t.requires_grad and t.is_floating_point():
                        t.data = t.data.to(side.dtype)
            self._dtype = side.dtype
            self.empty_cache()
        fast.set_lora_input_casting(self.unet, side.ref)
        self.sched.copy = host_to if side.ref else fast.to_device
        plan = (0.0 if side.ref else self.args.checkpointing_budget_gib, side.dtype)  # the dry run reads the dtype
        if plan != self._checkpointing:
            info = fast.checkpointing.enable(self.unet, plan[0], self.B, self.h, self.h)
            if plan[0]:
                log("  " + fast.checkpointing.describe(info))
            self._checkpointing = plan

    def empty_cache(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def place_encoders(self, on_device: bool):
        """The text encoders and the VAE on the GPU, or on the host (ours, on precomputed inputs)."""
        dev = self.device if on_device else torch.device("cpu")
        if self.vae.device != dev:
            for m in [self.vae, *self.text_encoders]:
                m.to(dev)
            self.empty_cache()

    def ours(self, objective: str, compile: bool) -> fast.Fast:
        """``fast.build`` with the flags that ``--compile on`` (``compile``) or off sets for ``objective``."""
        key = (objective, compile, self._dtype)
        if key not in self._fast:
            args = SimpleNamespace(compile="on" if compile else "off", lora_dropout=0.0, compile_mode=None, w=self.w,
                                   teacher_max_batch=None, train_batch_size=self.B, **dict.fromkeys(fast.plan.FLAGS))
            fast.plan.resolve(objective, args, self.device, steps=1)  # sets fast.plan.on_flags(objective) for "on"
            self._fast[key] = fast.build(self.unet, self.unet, args, objective,
                                         optimizer_step=lambda: self.optimizer_steps)
        return self._fast[key]

    def context(self, side: Side, objective: str) -> tuple[DistillContext, object]:
        """The objective's context and the student's eps function. The reference: separate guidance passes on the
        LoRA UNet, PEFT's switch around every guided call in CM (around the loop in Direct CM), the LoRA UNet as
        the CM target pass; ours: ``fast.build``'s."""
        if side.ref:
            eps = UNetEps(self.unet, copy=host_to)
            guided = GuidedEps(eps, self.w)

            def switched(x, t, cond):
                with adapters_off(self.unet):
                    return guided(x, t, cond)

            teacher, target, student = (switched if objective == "cm" else guided), eps, eps
        else:
            f = self.ours(objective, side.compile)
            teacher, target, student = f.teacher_eps, f.target_eps, f.student_eps
        return DistillContext(teacher, target, self.solver, self.sched, self.grid), student

    # --- the step ----------------------------------------------------------------------------------------------
    def encoders(self, dtype) -> Encoders:
        return Encoders(self.tokenizers, self.text_encoders, self.vae, self.device, dtype, self.res, 8, self.args.seed)

    def precomputed(self, dtype) -> dict:
        """The data batch's latent posterior and conditioning, computed once (untimed) and kept on the host, as
        ``scripts/precompute.sh`` leaves them."""
        if dtype not in self._precomputed:
            self.place_encoders(True)
            mean, std = self.encoders(dtype).posterior(self.data["pixel_values"])
            cond = self.encoders(dtype).conditioning(self.data)
            self._precomputed[dtype] = {"mean": mean.cpu(), "std": std.cpu(), **{k: v.cpu() for k, v in cond.items()}}
        return self._precomputed[dtype]

    def prepare(self, side: Side, k: int, precomputed: bool | None = None) -> dict:
        """Batch ``k`` as the trainer prepares it (``inputs.prepare``): encoded now (the reference) or from the
        precomputed inputs with the encoders on the host (ours); starts and noise drawn from its positions."""
        precomputed = not side.ref if precomputed is None else precomputed
        data = self.precomputed(side.dtype) if precomputed else self.data
        self.place_encoders(not precomputed)
        batch = {**data, "positions": list(range(k * self.B, (k + 1) * self.B)), "skipped": 0}
        return {**prepare(batch, self.encoders(side.dtype), self.sched, self.grid, self.args.seed), "key": k}

    def batches(self, side: Side, source):
        """Batches in order, each submitted to the target source when prepared, ``source.ahead`` batches ahead
        (as ``Trainer.upcoming``)."""
        queue, keys = collections.deque(), itertools.count()
        while True:
            while len(queue) <= source.ahead:
                queue.append(self.prepare(side, next(keys)))
                source.submit(queue[-1])
            yield queue.popleft()

    def train_step(self, side: Side, prep: dict, targets, student) -> torch.Tensor:
        """The product's step, ``step.distill_loss`` (the targets under no grad, the student's consistency function
        with grad, the distance), then backward, clip 1.0 and AdamW (with the reference's GradScaler in fp16)."""
        loss = distill_loss(prep, targets, student, self.sched, LossConfig(),
                            lambda: torch.autocast(self.device.type, dtype=side.dtype))
        scaler = self.scalers[side.dtype]
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return loss.detach()

    # --- the rows ------------------------------------------------------------------------------------------------
    def matmul_peak(self, side) -> dict:
        n = 256 if self.args.tiny else 8192
        a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
        m = Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=0.05 if self.args.tiny else 1.0)
        self.peak_tflops = 2 * n**3 / m.median / 1e12
        return dict(value=self.peak_tflops, unit="TFLOP/s", seconds=m.times, median_s=m.median,
                    notes=f"{n}^3 bf16, {len(m.times)} blocks of {m.number_per_run}")

    def teacher_fwd(self, side: Side) -> dict:
        """One teacher UNet forward at batch B, no grad: the first call (with the compile), the median of calls
        each from an idle GPU, and back to back (as a sampler issues them). FLOPs counted once."""
        self.use(side)
        prep = self.prepare(side, 0, precomputed=True)
        unet = self.unet if side.ref else self.ours("direct_cm", side.compile).teacher_unet
        eps = UNetEps(fast.DynamicBatch(unet) if side.compile else unet, copy=host_to if side.ref else fast.to_device)

        def fwd():
            with torch.no_grad(), torch.autocast(self.device.type, dtype=side.dtype):
                return eps(prep["x_t"], prep["t"], prep["cond"])

        if self.flops_per_forward is None:  # counted eagerly: dynamo would skip a frame first met under the counter
            view = UNetEps(fast.base_view(self.unet), copy=host_to)
            with FlopCounterMode(display=False) as fc, torch.no_grad(), torch.autocast(self.device.type, side.dtype):
                view(prep["x_t"], prep["t"], prep["cond"])
            self.flops_per_forward = float(fc.get_total_flops())
        reps = 2 if self.args.tiny else 4 * self.args.repeats
        with adapters_off(self.unet) if side.ref else contextlib.nullcontext():  # once, outside the timed calls
            (first,), _ = timed(fwd)
            timer = Timer("fwd()", globals={"fwd": fwd}, num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=0.05 if self.args.tiny else 0.3 * reps)
            b2b = timer.timeit(reps).mean
        tflops = self.flops_per_forward / m.median / 1e12
        out = dict(value=tflops, unit="TFLOP/s", seconds=m.times, median_s=m.median, back_to_back_s_per_call=b2b,
                   first_call_s=first, tflop_per_forward=self.flops_per_forward / 1e12,
                   notes=f"{1000 * m.median / self.B:.1f} ms/sample; back to back {1000 * b2b:.1f} ms per call")
        if self.peak_tflops:
            out.update(fraction_of_matmul_peak=tflops / self.peak_tflops,
                       fraction_of_matmul_peak_back_to_back=self.flops_per_forward / b2b / 1e12 / self.peak_tflops)
            out["notes"] += f"; {100 * out['fraction_of_matmul_peak']:.1f}% of the matmul peak"
        return out

    def student_step(self, side: Side) -> dict:
        """The student's part alone (precomputed inputs, a fixed target); forward-equivalents = its time over the
        eager teacher forward of the same precision (teacher_fwd_ref / teacher_fwd_ours, when they ran)."""
        self.use(side)
        _, student = self.context(side, "cm")
        prep = self.prepare(side, 0, precomputed=True)
        fixed = ObjectiveTargets(lambda ctx, x_t, start, cond, target=prep["x_t"].clone(): target, None)
        self.train_step(side, prep, fixed, student)  # warm-up (and the compile)
        out = per_step(timed(lambda: self.train_step(side, prep, fixed, student), self.args.repeats)[0])
        fwd = self.results.get("teacher_fwd_ref" if side.ref else "teacher_fwd_ours", {})
        if fwd.get("status") == "ok":
            out["forward_equivalents"] = out["value"] / fwd["median_s"]
            out["notes"] = f"{out['forward_equivalents']:.2f} forward-equivalents"
        return out

    def cm_step(self, side: Side) -> dict:
        """One CM training step, its batch prepared inside (the reference encodes it there)."""
        self.use(side)
        ctx, student = self.context(side, "cm")
        source = fast.target_source("cm", ctx)
        batches = self.batches(side, source)

        def step():
            return self.train_step(side, next(batches), source, student)

        step()  # warm-up (and the compile, the precompute)
        times, loss = timed(step, self.args.repeats)
        return per_step(times, loss=float(loss))

    def direct_cm_step(self, side: Side) -> dict:
        """Direct CM steps, timed whole and their teacher part (the targets) alone. Ours: consecutive steps as the
        trainer runs them (``--teacher_lookahead 2``: the next 2 batches' trajectories ride in the current batch's
        teacher calls), fresh starts each; the expected step = E[sum of N - n] = B (N + 1) / 2 sample-steps at the
        measured rate + the rest. The reference: one step of its masked full-batch loop under one PEFT switch
        (``solvers.solve_to_zero_reference``) at the batch's starts, N - min n calls; the expected step scales
        them to E[N - min n] calls + the rest."""
        self.use(side)
        ctx, student = self.context(side, "direct_cm")
        sizes, teacher = [], ctx.teacher_eps
        ctx.teacher_eps = lambda x, t, cond: sizes.append(x.shape[0]) or teacher(x, t, cond)
        if side.ref:
            def loop(ctx, x_t, start, cond):
                with adapters_off(self.unet):
                    return solve_to_zero_reference(ctx.step, ctx.teacher_eps, x_t, start, cond, ctx.sched, ctx.grid)

            source, warm, n_timed = ObjectiveTargets(loop, ctx), 0, 1
            with torch.no_grad(), torch.autocast(self.device.type, dtype=side.dtype), adapters_off(self.unet):
                pre = self.prepare(side, 0, precomputed=True)  # warm-up: one guided call
                ctx.teacher_eps(pre["x_t"], pre["t"], pre["cond"])
        else:
            source = fast.target_source("direct_cm", ctx, lookahead=2, capacity=self.B)
            warm, n_timed = 1, self.args.repeats
        batches, steps, teacher_s, preps = self.batches(side, source), [], [], []

        def timed_targets(prep):
            times, out = timed(lambda: source(prep))
            teacher_s.append(times[0])
            return out

        def step():
            preps.append(next(batches))
            return self.train_step(side, preps[-1], timed_targets, student)

        for k in range(warm + n_timed):
            sizes.clear()
            (whole,), loss = timed(step)
            steps.append((whole, teacher_s[-1], len(sizes), sum(sizes), preps[-1]["start"]))
            log(f"  step {k}: {whole:.2f} s, teacher {teacher_s[-1]:.2f} s in {len(sizes)} calls, {sum(sizes)} "
                "sample-steps")
        steps = steps[warm:]
        whole, teacher, calls, sample_steps = (sum(s[i] for s in steps) for i in range(4))
        out = dict(unit="s/step (expected)", seconds=[s[0] for s in steps], calls=calls, sample_steps=sample_steps,
                   mean_call_size=sample_steps / calls, rest_s=statistics.median([s[0] - s[1] for s in steps]),
                   loss=float(loss), notes=f"{n_timed} step(s) timed: {sample_steps} sample-steps in {calls} calls, "
                   f"measured {whole / n_timed:.1f} s/step")
        if side.ref:
            out.update(teacher_s_per_call=teacher / calls, start_indices=steps[0][4].tolist(),
                       value=expected_longest_trajectory(self.N, self.B) * teacher / calls + out["rest_s"])
        else:
            out.update(teacher_s_per_full_call=teacher / sample_steps * self.B, lookahead=source.ahead,
                       value=self.B * (self.N + 1) / 2 * teacher / sample_steps + out["rest_s"])
        out["median_s"] = out["value"]
        return out

    def teacher_images(self, side: Side) -> dict:
        """Teacher references through the product's sampler (``evaluation.generate``): prompt encode, the N DDIM
        steps from pure noise, decode to images, every step timed. The reference as the paper's test_teacher.py:
        one caption per call and its 2 images, the guidance passes batched, fp16 eager; ours as
        scripts/test_teacher.sh: batch B, fp16, separate passes, COMPILE=1 (channels_last, freezing)."""
        self.use(side)
        self.place_encoders(True)
        batch = 2 if side.ref else self.B
        m = Models(self.tokenizers, self.text_encoders, self.vae, fast.base_view(self.unet), self.sched, side.dtype,
                   self.device)
        sample = teacher_sampler(m, "ddim", self.N, self.w, cfg_batched=side.ref, compile=side.compile,
                                 freezing=side.compile, channels_last=side.compile)
        calls = itertools.count()

        def one():
            i = next(calls)
            captions = [self.captions[i % self.B]] * batch if side.ref else self.captions
            x_T = self.x_T.roll(-i * batch, 0)[:batch]
            return decode(self.vae, sample(x_T, conditioning(m, captions, self.res), list(range(batch)),
                                           lambda f: None), batch)

        one()  # warm-up (and the compile)
        times, _ = timed(one, self.args.repeats)
        s = statistics.median(times)
        return dict(value=batch / s, unit="img/s", seconds=times, median_s=s, images_per_call=batch,
                    notes=f"{batch} images per call, all {self.N} steps")

    # --- the driver ----------------------------------------------------------------------------------------------
    def run_row(self, name: str, method: str, side: Side | None, what: str):
        log(f"[{name}] {what}")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, row = time.perf_counter(), {"what": what, "side": side._asdict() if side else None}
        try:
            row.update(getattr(self, method)(side), status="ok")
        except Exception as e:  # noqa: BLE001 - every failure is reported in its row; the others still run
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            row.update(status="oom" if oom else "error", error=one_line(e, 300))
            log(f"  FAILED ({row['status']}): {row['error']}")
            if not oom:
                traceback.print_exc(file=sys.stdout)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            self.empty_cache()
        row["wall_s"] = time.perf_counter() - t0
        self.results[name] = row
        if row["status"] == "ok":
            log(f"  -> {row['value']:.4g} {row['unit']}" + (f", peak {row['peak_mem_gib']:.1f} GiB" if cuda else "")
                + f" ({row['wall_s']:.1f} s wall)")


def print_summary(results: dict, memory_cap_gib: float | None):
    print()
    for name, r in results.items():
        result = f"{r['value']:.4g} {r['unit']}" if r["status"] == "ok" else r["status"].upper()
        peak = "" if r["peak_mem_gib"] is None else f"peak {r['peak_mem_gib']:.1f} GiB; "
        print(f"{name:<26} {result:<24} {peak}{r.get('notes') or r.get('error', '')}")
    print("\nspeed-ups (ours vs reference):")
    for ref, ours in PAIRS:  # higher is better for rates, lower for times
        r, o = results.get(ref, {}), results.get(ours, {})
        if r.get("status") == o.get("status") == "ok":
            f = o["value"] / r["value"] if r["unit"] in ("TFLOP/s", "img/s") else r["value"] / o["value"]
            print(f"  {ours}: {f:.2f}x {ref}")
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    print(f"\nfailed: {', '.join(failed) or 'nothing'}" + (f" (under the {memory_cap_gib:g} GiB cap)"
                                                           if memory_cap_gib else ""), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The paper's behaviour vs ours on SDXL with random weights "
                                            "(benchmarks/README.md).")
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL config, 64 px, N = 10, B = 4: runs on a CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--only", default=None, help="comma-separated rows, run in the table's order: "
                   + ", ".join(ROW_NAMES))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 3, 1 with --tiny)")
    p.add_argument("--checkpointing_budget_gib", type=float, default=0.0, help="ours' student: GiB of activations "
                   "kept un-checkpointed (the trainer's flag; 0: every block checkpointed)")
    p.add_argument("--no_compile", action="store_true", help="ours as --compile off (eager)")
    p.add_argument("--memory_cap_gib", type=float, default=None,
                   help="torch.cuda.set_per_process_memory_fraction to this many GiB before anything else")
    p.add_argument("--json", default=None, help="every number, the card, versions and settings (rewritten per row)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.resolution, args.num_discr_timesteps, args.batch_size, args.lora_rank = (64, 10, 4, 4) if args.tiny else \
        (1024, 100, 16, 64)
    args.repeats, args.seed = args.repeats or (1 if args.tiny else 3), 24  # the paper's seed: data, noise, starts
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else ROW_NAMES
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(ROW_NAMES)}")
    args.rows = [(n, m, s._replace(compile=False) if s and args.no_compile else s, w) for n, m, s, w in ROWS
                 if n in names and not (args.no_compile and n == "teacher_fwd_ours_compiled")]
    return args


def main(argv=None) -> int:
    import diffusers
    import peft
    import transformers

    args = parse_args(argv)
    device = torch.device(args.device)
    env = {m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft)}
    env.update(python=platform.python_version(), cuda=torch.version.cuda,
               card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # peak-memory stats and synchronize() read the current device
        total = torch.cuda.get_device_properties(device).total_memory
        env.update(card=torch.cuda.get_device_name(device), card_memory_gib=total / 2**30)
        if args.memory_cap_gib:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
            log(f"memory cap: {args.memory_cap_gib:g} GiB of {total / 2**30:.1f} GiB")
    log(f"{env['card']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; {args.resolution} px,"
        f" B = {args.batch_size}, N = {args.num_discr_timesteps}, DDIM, w = 9, LoRA rank {args.lora_rank}")
    bench = Bench(args)
    settings = {**{k: v for k, v in vars(args).items() if k != "rows"}, "rows": [r[0] for r in args.rows]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        bench.run_row(*row)
        if args.json:  # after every row, replacing the file whole: a run cut short keeps what it measured
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps({"env": env, "settings": settings, "param_counts": bench.param_counts,
                                       "flops_per_teacher_forward": bench.flops_per_forward,
                                       "measurements": bench.results}, indent=2, default=str))
            os.replace(tmp, args.json)
    print_summary(bench.results, args.memory_cap_gib)
    log(f"total wall time {time.perf_counter() - T0:.0f} s")
    # The exit status is 1 for an error, or an OOM without --memory_cap_gib.
    return int(any(r["status"] == "error" or (r["status"] == "oom" and not args.memory_cap_gib)
                   for r in bench.results.values()))


if __name__ == "__main__":
    sys.exit(main())
