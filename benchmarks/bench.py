#!/usr/bin/env python
"""The reference behaviour and ours, side by side, on a full-size SDXL-architecture model with random weights.

Builds the SDXL base UNet (2,567,463,684 parameters, asserted), VAE and both text encoders from their configs (no
download) with the real CLIP tokenizer, adds the student's LoRA, and times in one process on one card: the teacher
forward, the student step, the CM and Direct CM training steps and teacher reference images. Every row is isolated:
an out-of-memory error or any other failure is recorded in its row and the next row still runs. ``--tiny`` runs the
same code on the tiny random SDXL on a CPU (the test). benchmarks/README.md lists the rows; RESULTS.md the numbers.

    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --tiny --device cpu --json tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cmdistill import fast, models  # noqa: E402
from cmdistill.fast import AdaptiveCFG, PooledTargets, checkpointing  # noqa: E402
from cmdistill.guidance import UNetEps  # noqa: E402
from cmdistill.objectives import DistillContext, cm_target  # noqa: E402
from cmdistill.optimizer import make_optimizer  # noqa: E402
from cmdistill.sampling import teacher_sample  # noqa: E402
from cmdistill.schedule import Grid, NoiseSchedule, host_to  # noqa: E402
from cmdistill.solvers import get_solver, solve_to_zero_reference  # noqa: E402
from cmdistill.step import LossConfig, ObjectiveTargets, distill_loss  # noqa: E402

T0 = time.perf_counter()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


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


def expected_longest_trajectory(N: int, B: int) -> float:
    """E[N - min n] over B starts n uniform on 0..N-1: the steps of the reference's masked full-batch loop
    (sum over k of P(max (N - n) >= k)). N = 100, B = 16: 94.6."""
    return sum(1 - ((k - 1) / N) ** B for k in range(1, N + 1))


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
class Timer:
    """Wall time of a block: CUDA events on a GPU (after a synchronize), ``time.perf_counter`` otherwise."""

    def __init__(self, device: torch.device):
        self.cuda, self.seconds = device.type == "cuda", float("nan")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0
        return False


def median(xs) -> float:
    return float(statistics.median(xs))


def timed(device: torch.device, fn, repeats: int, label: str | None = None) -> tuple[list, object]:
    """``fn()`` timed ``repeats`` times; returns the seconds and the last result."""
    times, result = [], None
    for _ in range(repeats):
        with Timer(device) as tm:
            result = fn()
        times.append(tm.seconds)
        if label:
            log(f"  {label} {tm.seconds:.3f} s")
    return times, result


def error_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------------------------------
# The reference behaviour and ours
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    precision: str = "fp16"     # frozen weights and autocast dtype (LoRA weights fp32 in both); fp16 adds GradScaler
    inputs: str = "encode"      # encode: VAE + both text encoders inside every step | precomputed (once, outside)
    cfg: str = "separate"       # separate passes | batched (one call of 2b) | adaptive (batched when b <= B/2)
    loop: str = "reference"     # Direct CM: reference (masked full batch) | pool (per sample, next 2 batches ride along)
    lora_cast: bool = True      # PEFT's copy of every LoRA input to fp32
    compile: bool = False       # COMPILE=1: teacher compiled in channels_last with freezing, student blocks compiled
    merged_target: bool = False  # CM: the target pass on weight copies with the LoRA update folded in
    offload: bool = False       # text encoders + VAE on the CPU during steps on precomputed inputs
    switch: str = "peft"        # peft: the LoRA UNet under PEFT's disable/enable_adapters | view: fast.base_view
    h2d: str = "sync"           # small host-to-GPU copies: sync (schedule.host_to) | async (fast.to_device)

    def describe(self) -> str:
        return (f"{self.precision}, {self.inputs}, cfg {self.cfg}" + (", compiled (COMPILE=1)" if self.compile else "")
                + (", merged target" if self.merged_target else "") + ("" if self.lora_cast else ", no LoRA-input copy")
                + (", teacher view" if self.switch == "view" else ", PEFT adapter switch")
                + (", async copies" if self.h2d == "async" else ""))


REF = Knobs()
OURS = Knobs(precision="bf16", inputs="precomputed", cfg="adaptive", loop="pool", lora_cast=False, compile=True,
             merged_target=True, offload=True, switch="view", h2d="async")


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str                 # the measurement function: m_<kind>
    knobs: Knobs | None
    what: str
    default: bool = True
    extra: dict | None = None


SPECS = [  # the reference rows first: the weights change precision once (a frozen compiled graph keeps its weights)
    Spec("matmul_peak", "matmul_peak", None, "bf16 matrix product 8192^3: the card's attainable dense rate"),
    Spec("teacher_fwd_ref", "teacher_fwd", REF, "teacher forward, batch B, fp16 eager, LoRA UNet with PEFT's "
         "adapters disabled"),
    Spec("student_step_ref", "student_step", REF, "student step alone (f_theta forward + backward through the "
         "checkpointed UNet, clip, AdamW) against a fixed target"),
    Spec("cm_step_ref", "cm_step", REF, "CM training step"),
    Spec("direct_cm_calls_ref", "direct_cm_calls", REF, "one guided teacher call of the reference loop at batch B, "
         "+ its step's prompt and VAE encode and adapter switch"),
    Spec("direct_cm_step_ref", "direct_cm_step_ref", REF, "one Direct CM step of the reference at the seed's starts "
         "(checks the expectation model)", default=False),
    Spec("teacher_images_ref", "teacher_images", replace(REF, cfg="batched", switch="view"), "teacher references as "
         "test_teacher.py runs them: one caption per call, 2 images, batched CFG, fp16, eager"),
    Spec("teacher_fwd_ours", "teacher_fwd", replace(OURS, compile=False), "teacher forward, bf16 eager, the view"),
    Spec("teacher_fwd_ours_compiled", "teacher_fwd", OURS, "teacher forward, bf16, compiled as COMPILE=1 "
         "(channels_last, freezing)"),
    Spec("teacher_fwd_ours_compiled_nchw", "teacher_fwd", OURS, "teacher forward, bf16, compiled without "
         "channels_last and freezing", default=False, extra={"channels_last": False, "freezing": False}),
    Spec("student_step_ours", "student_step", OURS, "student step alone, ours"),
    Spec("cm_step_ours", "cm_step", OURS, "CM training step"),
    Spec("cm_step_ours-merged_target", "cm_step", replace(OURS, merged_target=False), "CM training step, target "
         "pass through the LoRA UNet", default=False),
    Spec("direct_cm_step_ours", "direct_cm_pool", OURS, "consecutive Direct CM steps through the trajectory pool; "
         "expected step over the starts"),
    Spec("teacher_images_ours", "teacher_images", OURS, "teacher references, batch B, compiled"),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}


# --------------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.B, self.res, self.N, self.w = args.batch_size, args.resolution, args.num_discr_timesteps, args.w
        self.results: dict[str, dict] = {}
        self.flops_per_forward = self.peak_tflops = None
        self._precision, self._precomputed, self._compiled, self._merged = None, {}, {}, None
        self._blocks, self._budget = False, None

    def build(self):
        args, dev = self.args, self.device
        from transformers import CLIPTokenizer

        from cmdistill.tiny import tiny_sdxl_components, write_clip_tokenizer

        log(f"building {'tiny' if args.tiny else 'full-size SDXL'} components with random weights on {dev}")
        if args.tiny:
            c = tiny_sdxl_components(seed=0, sample_size=self.res // 8)
            unet, vae, te1, te2 = (c[k].to(dev) for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
        else:
            unet, vae, te1, te2 = build_sdxl_modules(dev)
        self.param_counts = {"unet": count_params(unet), "vae": count_params(vae), "text_encoder": count_params(te1),
                             "text_encoder_2": count_params(te2)}
        with tempfile.TemporaryDirectory() as d:
            tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(d) / "tokenizer"))
        self.tokenizers = [tok, tok]
        for m in (unet, vae, te1, te2):
            m.requires_grad_(False)
            m.eval()
        self.unet, self.vae, self.text_encoders = unet, vae, [te1, te2]
        # The student as cmdistill.train.Trainer builds it: LoRA on the default targets in fp32, gradient
        # checkpointing, AdamW (torch's: the paper's 8-bit Adam needs bitsandbytes).
        models.add_lora(unet, args.lora_rank, args.lora_rank)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        unet.enable_gradient_checkpointing()
        unet.train()
        self.view = fast.base_view(unet)  # ours' teacher: the UNet without its adapter layers, same weights
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.param_counts["lora"] = sum(p.numel() for p in self.params)
        self.optimizer = make_optimizer(SimpleNamespace(
            use_8bit_adam=False, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
            adam_epsilon=1e-8), self.params)
        self.sched, self.grid, self.solver = NoiseSchedule.sdxl(), Grid(1000, self.N), get_solver("ddim")
        self.copy = host_to  # the host-to-device copy of the science functions and the UNet's timesteps (configure)
        self.sf = vae.config.scaling_factor
        self.h = self.res // (2 ** (len(vae.config.block_out_channels) - 1))
        g = torch.Generator().manual_seed(args.seed)
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(self.B)]
        self.start = torch.randint(0, self.N, (self.B,), generator=g)
        self.pixels = (torch.rand(self.B, 3, self.res, self.res, generator=g) * 2 - 1).to(dev)
        self.noise = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
        self.x_T = torch.randn(self.B, 4, self.h, self.h, generator=g).to(dev)
        log("parameters: " + ", ".join(f"{k} {v:,}" for k, v in self.param_counts.items()))

    # --- state shared by the rows --------------------------------------------------------------------
    def set_precision(self, name: str):
        """Frozen weights of all four networks in ``name``'s dtype; the LoRA weights stay fp32."""
        if name == self._precision:
            return
        dtype, self._precision = DTYPES[name], None
        for m in [self.unet, self.vae, *self.text_encoders]:
            for t in [*m.parameters(), *m.buffers()]:
                if not t.requires_grad and t.is_floating_point() and t.dtype != dtype:
                    t.data = t.data.to(dtype)
        self._precision = name
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def configure(self, knobs: Knobs, student: bool = True):
        """Precision, compiled blocks, checkpointing plan, LoRA-input copy and host copies for ``knobs``."""
        self.set_precision(knobs.precision)
        if knobs.compile != self._blocks:  # COMPILE=1 compiles every block of the student (the teacher: whole)
            fast.compile_blocks(self.unet, knobs.compile, backend=self.args.compile_backend)
            self._blocks = knobs.compile
        budget = self.args.checkpointing_budget_gib if knobs.switch == "view" else 0.0
        if student and (budget, self._precision) != self._budget:  # the plan's dry run: the frozen weights' dtype
            info = checkpointing.enable(self.unet, budget, self.B, self.h, self.h)
            if budget:
                log("  " + checkpointing.describe(info))
            self._budget = (budget, self._precision)
        models.set_lora_input_casting(self.unet, knobs.lora_cast)
        self.copy = fast.to_device if knobs.h2d == "async" else host_to  # injected, as the trainer does
        self.sched.copy = self.copy

    def autocast(self, precision: str):
        dtype = DTYPES[precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @contextlib.contextmanager
    def peft_switch(self, knobs: Knobs):
        """The reference scripts' teacher: PEFT's own switch around it (ours runs the view: nothing to switch)."""
        if knobs.switch != "peft":
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def place_encoders(self, knobs: Knobs):
        dev = torch.device("cpu") if knobs.offload and knobs.inputs == "precomputed" else self.device
        for m in [self.vae, *self.text_encoders]:
            if next(m.parameters()).device != dev:
                m.to(dev)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_conditioning(self, captions, precision: str) -> dict:
        dtype, b = DTYPES[precision], len(captions)
        prompt_embeds, pooled = models.encode_prompts(captions, self.tokenizers, self.text_encoders)
        ids = models.time_ids([(self.res, self.res)] * b, [(0, 0)] * b, (self.res, self.res))
        return {"prompt_embeds": prompt_embeds.to(self.device, dtype), "text_embeds": pooled.to(self.device, dtype),
                "time_ids": ids.to(self.device, dtype)}

    @torch.no_grad()
    def encode_latents(self, precision: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.args.seed)
        pixels = self.pixels.to(DTYPES[precision])
        out = [self.vae.encode(c).latent_dist.sample(generator=g) for c in pixels.split(8)]  # the trainer's chunks
        return torch.cat(out).float() * self.sf

    def inputs(self, knobs: Knobs):
        """(latents, cond): encoded now (the reference, inside the timed step) or precomputed once, untimed."""
        if knobs.inputs == "encode":
            self.place_encoders(knobs)
            return self.encode_latents(knobs.precision), self.encode_conditioning(self.captions, knobs.precision)
        if knobs.precision not in self._precomputed:
            self.place_encoders(replace(knobs, offload=False))
            self._precomputed[knobs.precision] = (self.encode_latents(knobs.precision),
                                                  self.encode_conditioning(self.captions, knobs.precision))
        self.place_encoders(knobs)
        return self._precomputed[knobs.precision]

    def compiled_teacher(self, channels_last: bool = True, freezing: bool = True):
        """The view under torch.compile as ``Trainer`` builds it with COMPILE=1, built once per setting and
        precision (freezing makes the weights constants of the graph). Freezing is inductor's only."""
        freezing = freezing and self.args.compile_backend == "inductor"
        key = (channels_last, freezing, self._precision)
        if key not in self._compiled:
            self._compiled[key] = fast.compile_unet(self.view, backend=self.args.compile_backend,
                                                      freezing=freezing, channels_last=channels_last)
        return self._compiled[key]

    def teacher_eps(self, knobs: Knobs, **compile_kw) -> UNetEps:
        if knobs.switch == "peft":
            return UNetEps(self.unet, copy=self.copy)  # under the caller's peft_switch
        if knobs.compile:
            return UNetEps(self.compiled_teacher(**compile_kw), dynamic_batch=True, copy=self.copy)
        return UNetEps(self.view, copy=self.copy)

    def guided(self, knobs: Knobs, batch: int):
        """The guided teacher: separate passes, one call of 2b, or batched when b <= B/2 (ours)."""
        threshold = {"separate": 0, "batched": batch, "adaptive": batch // 2}[knobs.cfg]
        return AdaptiveCFG(self.teacher_eps(knobs), self.w, threshold)

    def target_eps(self, knobs: Knobs):
        """The CM target pass (student, no grad): the LoRA UNet, or (``merged_target``) ``fast.MergedAdapters``'
        tree compiled like the teacher without freezing, refreshed before every pass (one per step)."""
        if not knobs.merged_target:
            return UNetEps(self.unet, copy=self.copy)
        key = (self._precision, knobs.compile)
        if self._merged is None or self._merged[0] != key:
            self._merged = None
            merged = fast.MergedAdapters(self.unet)
            tree = fast.compile_unet(merged.tree, backend=self.args.compile_backend,
                                     channels_last=True) if knobs.compile else merged.tree
            self._merged = (key, merged, UNetEps(tree, dynamic_batch=knobs.compile, copy=self.copy))
        _, merged, eps = self._merged
        return merged.refreshing(eps)

    def context(self, knobs: Knobs, objective: str) -> DistillContext:
        guided = self.guided(knobs, self.B)
        teacher = guided
        if objective == "cm" and knobs.switch == "peft":  # the reference switches around each guided call here
            def teacher(x, t, cond):
                with self.peft_switch(knobs):
                    return guided(x, t, cond)
        return DistillContext(teacher_eps=teacher, student_eps_nograd=self.target_eps(knobs), step=self.solver,
                              sched=self.sched, grid=self.grid)

    # ==============================================================================================
    # THE TRAINING STEP: every timed step of the training rows, reference and ours, is the product's step,
    # cmdistill.step.distill_loss, with a target source (cmdistill.step.ObjectiveTargets for CM, ours' Direct CM
    # through cmdistill.fast.PooledTargets, the reference's through Bench.reference_direct_cm below), then backward,
    # clip 1.0 and AdamW as the trainer runs them (with the reference's GradScaler in fp16).
    # ==============================================================================================
    def train_step(self, knobs: Knobs, targets, start: torch.Tensor, scaler, key=None,
                   phases: dict | None = None) -> torch.Tensor:
        """One optimisation step on the bench's batch at grid indices ``start``; ``key``: the batch's key in a pooled
        source (submitted already). ``phases``: also time the teacher part (inputs and targets) and the student part
        (the rest), each after a synchronize."""
        if phases is None:
            return self.student_update(knobs, self.prepared(knobs, start, key), targets, scaler)
        with Timer(self.device) as inputs:
            prep = self.prepared(knobs, start, key)
        target_s = []

        def timed_targets(p):
            with Timer(self.device) as tm:
                out = targets(p)
            target_s.append(tm.seconds)
            return out

        with Timer(self.device) as whole:
            loss = self.student_update(knobs, prep, timed_targets, scaler)
        phases.update(teacher=inputs.seconds + target_s[0], student=whole.seconds - target_s[0])
        return loss

    def prepared(self, knobs: Knobs, start: torch.Tensor, key=None) -> dict:
        """The step's prepared batch (``cmdistill.step``): (encoded or precomputed) inputs, noised to t_n."""
        latents, cond = self.inputs(knobs)
        t = self.grid.timestep(start)
        return {"x_t": self.sched.add_noise(latents, self.noise, t), "t": t, "start": start, "cond": cond, "key": key}

    def student_update(self, knobs: Knobs, prep: dict, targets, scaler) -> torch.Tensor:
        """``step.distill_loss`` (targets, f_theta with grad, distance), backward, clip 1.0, AdamW (GradScaler in
        fp16)."""
        loss = distill_loss(prep, targets, UNetEps(self.unet, copy=self.copy), self.sched, LossConfig(),
                            lambda: self.autocast(knobs.precision))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def reference_direct_cm(self, knobs: Knobs, ctx: DistillContext):
        """The reference's Direct CM target source: one PEFT adapter switch around the masked full-batch loop
        (``solvers.solve_to_zero_reference``, the reference's behaviour; no flag of the product runs it)."""
        def targets(prep):
            with torch.no_grad(), self.peft_switch(knobs):
                target = solve_to_zero_reference(ctx.step, ctx.teacher_eps, prep["x_t"], prep["start"], prep["cond"],
                                                 ctx.sched, ctx.grid)
            return prep["x_t"], prep["t"], prep["cond"], target

        return targets
    # ==============================================================================================

    def scaler_for(self, knobs: Knobs):
        return torch.amp.GradScaler(self.device.type) if knobs.precision == "fp16" else None

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode((x0 / self.sf).to(self.vae.dtype)).sample
        return ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    # --- the rows --------------------------------------------------------------------------------------
    def m_matmul_peak(self, spec: Spec) -> dict:
        n, reps = (256, 2) if self.args.tiny else (8192, 20)
        a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        with Timer(self.device) as tm:
            for _ in range(reps):
                a @ b
        s = tm.seconds / reps
        self.peak_tflops = 2 * n**3 / s / 1e12
        return dict(value=self.peak_tflops, unit="TFLOP/s", seconds=[tm.seconds], median_s=s,
                    notes=f"{n}^3 bf16, mean of {reps}")

    def m_teacher_fwd(self, spec: Spec) -> dict:
        knobs, prec, reps = spec.knobs, spec.knobs.precision, self.args.repeats_fwd
        self.configure(knobs, student=False)
        _, cond = self.inputs(replace(OURS, precision=prec))
        x, t = self.noise, torch.full((self.B,), 500, dtype=torch.long)
        eps = self.teacher_eps(knobs, **(spec.extra or {}))
        if self.flops_per_forward is None:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), self.autocast(prec), FlopCounterMode(display=False) as fc:
                UNetEps(self.view)(x, t, cond)
            self.flops_per_forward = float(fc.get_total_flops())

        def fwd():
            with torch.no_grad(), self.autocast(prec):
                return eps(x, t, cond)

        out = {}
        with self.peft_switch(knobs):  # the reference's teacher: one switch, outside the timed calls
            with Timer(self.device) as tm:
                fwd()
            if knobs.compile:
                out["compile_s"] = tm.seconds
                log(f"  compile + first call: {tm.seconds:.1f} s")
            fwd()
            times, _ = timed(self.device, fwd, reps)  # each call from an idle GPU
            with Timer(self.device) as tm:  # back to back, as a sampler issues them
                for _ in range(reps):
                    fwd()
        s, b2b = median(times), tm.seconds / reps
        tflops = self.flops_per_forward / s / 1e12
        out.update(value=tflops, unit="TFLOP/s", seconds=times, median_s=s, back_to_back_s_per_call=b2b,
                   tflop_per_forward=self.flops_per_forward / 1e12)
        if self.peak_tflops:
            out["fraction_of_matmul_peak"] = tflops / self.peak_tflops
            out["fraction_of_matmul_peak_back_to_back"] = self.flops_per_forward / b2b / 1e12 / self.peak_tflops
        out["notes"] = (f"{1000 * s / self.B:.1f} ms/sample; back to back {1000 * b2b:.1f} ms per call"
                        + (f"; {100 * out['fraction_of_matmul_peak']:.1f}% of the matmul peak" if self.peak_tflops
                           else "") + (f"; compile {out['compile_s']:.0f} s" if "compile_s" in out else ""))
        return out

    def m_student_step(self, spec: Spec) -> dict:
        """The student's part of a step alone; forward-equivalents = its time over the eager teacher forward of the
        same precision (teacher_fwd_ref / teacher_fwd_ours, when they ran earlier)."""
        knobs = spec.knobs
        self.configure(knobs)
        scaler = self.scaler_for(knobs)
        latents, cond = self.inputs(replace(knobs, inputs="precomputed"))
        t = self.grid.timestep(self.start)
        prep = {"x_t": self.sched.add_noise(latents, self.noise, t), "t": t, "start": self.start, "cond": cond}
        target = latents.clone()

        def step():
            return self.student_update(knobs, prep, lambda p: (p["x_t"], p["t"], p["cond"], target), scaler)

        step()
        times, _ = timed(self.device, step, self.args.repeats)
        s = median(times)
        out = dict(value=s, unit="s/step", seconds=times, median_s=s, notes=knobs.describe())
        fwd = self.results.get("teacher_fwd_ref" if knobs.switch == "peft" else "teacher_fwd_ours", {})
        if fwd.get("status") == "ok":
            out["forward_equivalents"] = s / fwd["median_s"]
            out["notes"] += f"; {out['forward_equivalents']:.2f} forward-equivalents"
        return out

    def m_cm_step(self, spec: Spec) -> dict:
        knobs = spec.knobs
        self.configure(knobs)
        scaler, ctx = self.scaler_for(knobs), self.context(knobs, "cm")
        targets = ObjectiveTargets(cm_target, ctx)
        self.inputs(knobs)  # a precomputation happens here, untimed

        def step():
            return self.train_step(knobs, targets, self.start, scaler)

        step()
        times, loss = timed(self.device, step, self.args.repeats, "step")
        s = median(times)
        return dict(value=s, unit="s/step", seconds=times, median_s=s, loss=float(loss), notes=knobs.describe())

    def m_direct_cm_calls(self, spec: Spec) -> dict:
        """The reference Direct CM loop's parts: one guided teacher call at batch B, and per step the prompt and VAE
        encode and one PEFT adapter switch pair."""
        knobs = spec.knobs
        self.configure(knobs, student=False)
        encode, _ = timed(self.device, lambda: self.inputs(knobs), self.args.repeats)
        _, cond = self.inputs(knobs)

        def switch_pair():
            with self.peft_switch(knobs):
                pass

        switch, _ = timed(self.device, switch_pair, self.args.repeats)
        guided, t = self.guided(knobs, self.B), self.grid.timestep(torch.full((self.B,), self.N // 2))

        def call():
            with torch.no_grad(), self.autocast(knobs.precision):
                return guided(self.noise, t, cond)

        with self.peft_switch(knobs):
            call()
            times, _ = timed(self.device, call, self.args.repeats)
        s = median(times)
        out = dict(value=s, unit="s/call", seconds=times, median_s=s, encode_s=median(encode),
                   switch_s=median(switch), per_step_s=median(encode) + median(switch))
        out["notes"] = f"{knobs.describe()}; encode {out['encode_s']:.3f} s, switch {out['switch_s']:.3f} s per step"
        return out

    def expected_reference_s(self) -> float | None:
        """The reference's expected Direct CM step: E[N - min n] guided calls at batch B + the per-step encode and
        switch + its student step (rows direct_cm_calls_ref and student_step_ref); None without them."""
        rows = [self.results.get(n, {}) for n in ("direct_cm_calls_ref", "student_step_ref")]
        if any(r.get("status") != "ok" for r in rows):
            return None
        return (expected_longest_trajectory(self.N, self.B) * rows[0]["median_s"] + rows[0]["per_step_s"]
                + rows[1]["median_s"])

    def m_direct_cm_pool(self, spec: Spec) -> dict:
        """Consecutive Direct CM steps as the trainer runs them (``--teacher_lookahead 2``): the next 2 batches'
        trajectories ride in the current batch's teacher calls, fresh starts every step. After one warm-up step,
        the timed steps give the teacher's seconds per sample-step with full calls; the expected step is
        E[sum of N - n] = B (N + 1) / 2 sample-steps at that rate + the median student part."""
        knobs, K, B, N = spec.knobs, 2, self.B, self.N
        self.configure(knobs)
        scaler, ctx = self.scaler_for(knobs), self.context(knobs, "direct_cm")
        latents, cond = self.inputs(knobs)
        sizes: list[int] = []
        targets = PooledTargets(ctx, B, K, callback=sizes.append)
        pool = targets.pool
        g = torch.Generator().manual_seed(self.args.seed)
        warm, n_timed = 1, self.args.repeats_direct_cm
        starts = [torch.randint(0, N, (B,), generator=g) for _ in range(warm + n_timed + K)]  # K past the last
        for k in range(K):
            pool.submit(k, self.sched.add_noise(latents, self.noise, self.grid.timestep(starts[k])), starts[k], cond)
        parts = []
        for k in range(warm + n_timed):
            nxt = k + K  # the batch that joins the pool now, as the trainer's data pipeline submits it
            pool.submit(nxt, self.sched.add_noise(latents, self.noise, self.grid.timestep(starts[nxt])), starts[nxt],
                        cond)
            n0, phases = len(sizes), {}
            self.train_step(knobs, targets, starts[k], scaler, key=k, phases=phases)
            parts.append((phases["teacher"], phases["student"], len(sizes) - n0, sum(sizes[n0:])))
            log(f"  step {k}: teacher {phases['teacher']:.2f} s in {parts[-1][2]} calls ({parts[-1][3]} sample-steps),"
                f" student {phases['student']:.3f} s")
        parts = parts[warm:]
        n_calls, n_steps = sum(p[2] for p in parts), sum(p[3] for p in parts)
        rate = sum(p[0] for p in parts) / n_steps
        student = median([p[1] for p in parts])
        expected = B * (N + 1) / 2 * rate + student
        measured = [p[0] + p[1] for p in parts]
        out = dict(value=expected, unit="s/step (expected)", median_s=expected, seconds=measured,
                   measured_mean_s=sum(measured) / len(measured), teacher_s_per_full_call=rate * B, calls=n_calls,
                   sample_steps=n_steps, mean_call_size=n_steps / n_calls, student_step_s=student, lookahead=K)
        out["notes"] = (f"{knobs.describe()}; {n_timed} steps timed: {n_steps} sample-steps in {n_calls} calls, "
                        f"{rate * B:.3f} s per full call, measured mean {out['measured_mean_s']:.1f} s/step")
        e_ref = self.expected_reference_s()
        if e_ref is not None:
            out.update(expected_ref_s=e_ref, speed_up_expected=e_ref / expected)
            out["notes"] += f"; {e_ref / expected:.2f}x the reference's expected {e_ref:.1f} s"
        return out

    def m_direct_cm_step_ref(self, spec: Spec) -> dict:
        """One reference Direct CM step at the seed's starts (N - min n full-batch calls), against the expectation
        model's prediction for those starts (from direct_cm_calls_ref and student_step_ref, when they ran)."""
        knobs = spec.knobs
        self.configure(knobs)
        scaler, ctx = self.scaler_for(knobs), self.context(knobs, "direct_cm")
        warm, targets = torch.full((self.B,), self.N - 2), self.reference_direct_cm(knobs, ctx)
        self.train_step(knobs, targets, warm, scaler)
        times, loss = timed(self.device, lambda: self.train_step(knobs, targets, self.start, scaler), 1, "step")
        steps = int(self.N - self.start.min())
        out = dict(value=times[0], unit="s/step", seconds=times, median_s=times[0], loss=float(loss),
                   reference_loop_steps=steps, notes=f"{knobs.describe()}; {steps} full-batch steps")
        calls, student = self.results.get("direct_cm_calls_ref", {}), self.results.get("student_step_ref", {})
        if calls.get("status") == student.get("status") == "ok":
            out["predicted_s"] = steps * calls["median_s"] + calls["per_step_s"] + student["median_s"]
            out["notes"] += f"; the model predicts {out['predicted_s']:.1f} s"
        return out

    def m_teacher_images(self, spec: Spec) -> dict:
        """Teacher references: prompt encode + the N DDIM steps from pure noise + VAE decode to uint8 on the host,
        every step timed. The reference as test_teacher.py runs them (cfg "batched"): one caption per call and its
        ``--ref_images_per_prompt`` images, conditional and unconditional passes in one call; ours: batch B."""
        knobs = spec.knobs
        self.configure(knobs, student=False)
        self.place_encoders(replace(knobs, offload=False))
        per_caption = knobs.cfg == "batched"
        batch = self.args.ref_images_per_prompt if per_caption else self.B
        guided, calls = self.guided(knobs, batch), iter(range(1 << 30))

        def one(grid):
            i = next(calls)
            if per_caption:  # the caption encoded once, its images from their own noise
                c = self.encode_conditioning([self.captions[i % self.B]], knobs.precision)
                cond = {n: v.repeat(batch, *[1] * (v.dim() - 1)) for n, v in c.items()}
                x_T = self.x_T.roll(-i * batch, 0)[:batch]
            else:
                cond, x_T = self.encode_conditioning(self.captions, knobs.precision), self.x_T
            with torch.no_grad(), self.autocast(knobs.precision):
                x0 = teacher_sample(self.solver, guided, x_T, cond, self.sched, grid)
            return self.decode(x0)

        one(Grid(1000, 1))  # warm-up (and the compile)
        n_runs = self.args.ref_prompts if per_caption else self.args.repeats
        times, _ = timed(self.device, lambda: one(self.grid), n_runs, f"{batch} images")
        s = median(times)
        return dict(value=batch / s, unit="img/s", seconds=times, median_s=s, seconds_per_image=s / batch,
                    images_per_call=batch,
                    notes=f"{knobs.describe()}; {batch} images per call, all {self.N} steps, {n_runs} calls")

    # --- driver ------------------------------------------------------------------------------------------
    def run_one(self, spec: Spec):
        if self.args.no_compile and spec.knobs is not None and spec.knobs.compile:
            spec = replace(spec, knobs=replace(spec.knobs, compile=False))
        log(f"[{spec.name}] {spec.what}")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row = {"what": spec.what, "knobs": asdict(spec.knobs) if spec.knobs else None}
        try:
            if spec.name == self.args.inject_oom:  # tests: the failure isolation and the OOM row
                raise torch.OutOfMemoryError("CUDA out of memory (injected by --inject_oom)")
            row.update(getattr(self, f"m_{spec.kind}")(spec))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is reported in its row; the others still run
            row.update(status="oom" if is_oom(e) else "error", error=error_line(e))
            log(f"  FAILED ({row['status']}): {row['error']}")
            if row["status"] == "error":
                traceback.print_exc(file=sys.stdout)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            if cuda:
                torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t0
        self.results[spec.name] = row
        if row["status"] == "ok":
            log(f"  -> {fmt_value(row)}" + (f", peak {row['peak_mem_gib']:.1f} GiB" if cuda else "")
                + f" ({row['wall_s']:.1f} s wall)")


def fmt_value(row) -> str:
    v, u = row["value"], row["unit"]
    return f"{v:.1f} {u}" if u == "TFLOP/s" and v >= 1 else f"{v:.3g} {u}" if u == "TFLOP/s" else f"{v:.3f} {u}"


def speed_ups(results: dict) -> list[str]:
    """Ours against the reference, row pair by row pair (higher is better for rates, lower for times)."""
    lines = []
    for ref, ours in [("teacher_fwd_ref", "teacher_fwd_ours_compiled"), ("student_step_ref", "student_step_ours"),
                      ("cm_step_ref", "cm_step_ours"), ("teacher_images_ref", "teacher_images_ours")]:
        r, o = results.get(ref, {}), results.get(ours, {})
        if r.get("status") == o.get("status") == "ok":
            f = o["value"] / r["value"] if r["unit"] in ("TFLOP/s", "img/s") else r["value"] / o["value"]
            lines.append(f"  {ours}: {f:.2f}x {ref}")
    d = results.get("direct_cm_step_ours", {})
    if d.get("status") == "ok" and "speed_up_expected" in d:
        lines.append(f"  direct_cm_step_ours (expected over the starts): {d['speed_up_expected']:.2f}x the reference "
                     f"({d['value']:.1f} vs {d['expected_ref_s']:.1f} s)")
    return lines


def print_table(bench: Bench, selected: list[Spec]):
    rows = [("row", "result", "median s", "peak GiB", "notes")]
    for spec in selected:
        r = bench.results[spec.name]
        ok = r["status"] == "ok"
        rows.append((spec.name, fmt_value(r) if ok else r["status"].upper(),
                     f"{r['median_s']:.3f}" if ok else "-",
                     f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a",
                     r.get("notes", "") if ok else r["error"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)) + " | " + r[4])
    lines = speed_ups(bench.results)
    if lines:
        print("\nspeed-ups (ours vs reference):\n" + "\n".join(lines))
    failed = [s.name for s in selected if bench.results[s.name]["status"] != "ok"]
    if bench.args.memory_cap_gib:
        fits = [s.name for s in selected if s.name not in failed]
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
           "peft": peft.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
           "timer": "cuda_events" if device.type == "cuda" else "perf_counter"}
    if device.type == "cuda":
        env.update(card=torch.cuda.get_device_name(device),
                   card_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Reference behaviour vs ours on an SDXL-architecture model with random "
                                            "weights: teacher forward, student step, CM and Direct CM steps, "
                                            "teacher references (benchmarks/README.md).")
    p.add_argument("--tiny", action="store_true", help="tiny SDXL config, 64 px, N = 10, B = 4: runs on a CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--only", default=None, help="comma-separated rows, run in the order given (default: all but "
                   f"the optional ones). Rows: {', '.join(SPEC_BY_NAME)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, 1 with --tiny); the teacher "
                   "forward times 4x as many")
    p.add_argument("--repeats_direct_cm", type=int, default=2, help="consecutive Direct CM steps timed after one "
                   "warm-up step")
    p.add_argument("--checkpointing_budget_gib", type=float, default=0.0, help="ours' student: GiB of activations "
                   "kept un-checkpointed (the trainer's flag; 0: every block checkpointed)")
    p.add_argument("--json", default=None, help="every number, the card, versions and settings (rewritten per row)")
    p.add_argument("--no_compile", action="store_true", help="ours without torch.compile")
    p.add_argument("--compile_backend", default=None, help="default inductor (aot_eager with --tiny)")
    p.add_argument("--memory_cap_gib", type=float, default=None,
                   help="torch.cuda.set_per_process_memory_fraction to this many GiB before anything else")
    p.add_argument("--batch_size", type=int, default=None, help="B (default 16; 4 with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default 1024 (64 with --tiny)")
    p.add_argument("--num_discr_timesteps", type=int, default=None, help="N (default 100; 10 with --tiny)")
    p.add_argument("--w", type=float, default=9.0, help="teacher guidance scale (Imagen form)")
    p.add_argument("--lora_rank", type=int, default=None, help="default 64 (4 with --tiny)")
    p.add_argument("--ref_prompts", type=int, default=None, help="teacher_images_ref: calls timed (default 2, "
                   "1 with --tiny)")
    p.add_argument("--ref_images_per_prompt", type=int, default=2, help="teacher_images_ref: images per caption "
                   "(test_teacher.py's 2)")
    p.add_argument("--seed", type=int, default=24, help="seed of the data, noise and Direct CM start indices")
    p.add_argument("--inject_oom", default=None, help=argparse.SUPPRESS)  # tests: fail this row with an OOM
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.num_discr_timesteps = args.num_discr_timesteps or (10 if args.tiny else 100)
    args.lora_rank = args.lora_rank or (4 if args.tiny else 64)
    args.batch_size = args.batch_size or (4 if args.tiny else 16)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.repeats_fwd = 2 if args.tiny else 4 * args.repeats
    args.ref_prompts = args.ref_prompts or (1 if args.tiny else 2)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    if args.only:
        names = list(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))
        unknown = [n for n in names if n not in SPEC_BY_NAME]
        if unknown:
            p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(SPEC_BY_NAME)}")
        args.selected = [SPEC_BY_NAME[n] for n in names]
    else:
        args.selected = [s for s in SPECS if s.default and not (args.no_compile and s.name == "teacher_fwd_ours_compiled")]
    if args.ref_images_per_prompt > args.batch_size:
        p.error("--ref_images_per_prompt: at most --batch_size")
    return args


def write_json(args, bench: Bench, env: dict):
    if not args.json:
        return
    settings = {k: v for k, v in vars(args).items() if k != "selected"}
    settings.update(selected=[s.name for s in args.selected], solver="ddim", start_indices=bench.start.tolist())
    out = {"env": env, "settings": settings, "param_counts": bench.param_counts,
           "flops_per_teacher_forward": bench.flops_per_forward, "measurements": bench.results,
           "total_wall_s": time.perf_counter() - T0}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # peak-memory stats and synchronize() read the current device
        if args.memory_cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
            log(f"memory cap: {args.memory_cap_gib:g} GiB of {total / 2**30:.1f} GiB")
    env = environment(device)
    log(f"{env['card']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; {args.resolution} px,"
        f" B = {args.batch_size}, N = {args.num_discr_timesteps}, DDIM, w = {args.w:g}, LoRA rank {args.lora_rank}")
    bench = Bench(args)
    bench.build()
    log(f"Direct CM start indices (seed {args.seed}): {bench.start.tolist()}")
    for spec in args.selected:
        bench.run_one(spec)
        write_json(args, bench, env)  # after every row: a run cut short keeps what it measured
    print_table(bench, args.selected)
    write_json(args, bench, env)
    log(f"total wall time {time.perf_counter() - T0:.0f} s")
    # The exit status is 1 for an error, or an OOM without --memory_cap_gib.
    return int(any(r["status"] == "error" or (r["status"] == "oom" and not args.memory_cap_gib)
                   for r in bench.results.values()))


if __name__ == "__main__":
    sys.exit(main())
