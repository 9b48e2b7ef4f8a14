"""Models, samplers and the batched, sharded, resumable generation loop of the evaluation (docs/method.md §8)."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import models as M
from ..errors import one_line
from ..fast import DynamicBatch, compile_unet, to_device
from ..guidance import GuidedEps, UNetEps
from ..noise import per_sample_noise
from ..progress import Progress
from ..sampling import student_sample, teacher_sample
from ..schedule import Grid, NoiseSchedule
from ..solvers import get_solver
from .store import SampleStore

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# sample(x_T, cond, indices, tick) -> scaled final latents; tick(f) reports f of a batch done.
Sampler = Callable[[torch.Tensor, dict, list, Callable[[float], None]], torch.Tensor]


@dataclass
class Models:
    tokenizers: list
    text_encoders: list
    vae: object
    unet: object
    sched: NoiseSchedule
    dtype: torch.dtype
    device: torch.device


def load_models(args, device, prepare_unet: Callable | None = None) -> Models:
    """The SDXL components on ``device`` in ``--weight_dtype``; ``prepare_unet(unet)`` (e.g. attaching
    the student's LoRA) runs in float32 on the device before the cast."""
    dtype = DTYPES[args.weight_dtype]
    t = M.load_teacher(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path,
                       revision=args.revision, teacher_revision=args.teacher_revision)
    unet = t.unet.to(device)
    if prepare_unet is not None:
        prepare_unet(unet)
    unet.to(dtype)
    for enc in t.text_encoders:
        enc.to(device, dtype)
    # The original SDXL VAE overflows in fp16 (force_upcast); the fp16-fix VAE of the paper does not.
    vae_dtype = torch.float32 if dtype == torch.float16 and t.vae.config.force_upcast else dtype
    t.vae.to(device, vae_dtype)
    return Models(t.tokenizers, t.text_encoders, t.vae, unet, NoiseSchedule.from_scheduler(t.scheduler, copy=to_device), dtype,
                  torch.device(device))


def conditioning(models: Models, captions: list[str], resolution: int) -> dict:
    """SDXL conditioning (docs/method.md §1) with time_ids original = target = resolution, crop (0, 0)."""
    prompt_embeds, pooled = M.encode_prompts(captions, models.tokenizers, models.text_encoders)
    n = len(captions)
    ids = M.time_ids([(resolution, resolution)] * n, [(0, 0)] * n, (resolution, resolution))
    return {"prompt_embeds": prompt_embeds.to(models.device, models.dtype),
            "text_embeds": pooled.to(models.device, models.dtype), "time_ids": ids.to(models.device, models.dtype)}


def decode(vae, latents: torch.Tensor, batch_size: int) -> list:
    """Scaled latents -> PIL images, as the diffusers SDXL pipeline decodes and post-processes them."""
    from PIL import Image

    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    out = []
    for z in latents.split(batch_size):
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            z = z * torch.tensor(std).view(view).to(z) / cfg.scaling_factor + torch.tensor(mean).view(view).to(z)
        else:
            z = z / cfg.scaling_factor
        img = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        arr = ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        out.extend(Image.fromarray(a) for a in arr)
    return out


def unet_eps(models: Models, compile: bool = False, freezing: bool = False, channels_last: bool = False) -> UNetEps:
    """The UNet as an eps function; ``compile``: through ``torch.compile`` with a dynamic batch dimension
    (``freezing``: its weights constants of the compiled graph, for a UNet whose weights stay as they are;
    ``channels_last``: see ``fast.compile_unet``). Host-to-device copies without a sync (``fast.to_device``)."""
    if not compile:
        return UNetEps(models.unet, models.dtype, copy=to_device)
    return UNetEps(DynamicBatch(compile_unet(models.unet, freezing=freezing, channels_last=channels_last)),
                   models.dtype, copy=to_device)


def teacher_sampler(models: Models, solver: str, N: int, w: float, cfg_batched: bool = False,
                    compile: bool = False, freezing: bool = False, channels_last: bool = False) -> Sampler:
    """docs/method.md §8: the Direct CM target code (``solvers.solve_to_zero`` via ``teacher_sample``) from t = T,
    ``N`` solver steps (the N-grid)."""
    step, grid = get_solver(solver), Grid(models.sched.T, N)
    eps = GuidedEps(unet_eps(models, compile, freezing, channels_last), w, batched=cfg_batched)

    def sample(x_T, cond, indices, tick):
        return teacher_sample(step, eps, x_T, cond, models.sched, grid, callback=lambda _: tick(1 / grid.N))

    return sample


def student_sampler(models: Models, N: int, K: int, seed: int, timestep_scaling: float,
                    compile: bool = False, channels_last: bool = False) -> Sampler:
    """docs/method.md §8: multistep consistency sampling, unguided, ``K`` steps on the N-grid; the fresh noise of
    the j-th renoising of caption i is ``per_sample_noise(seed, [i], shape, stream=j + 1)``."""
    grid = Grid(models.sched.T, N)
    eps = unet_eps(models, compile, channels_last=channels_last)

    def sample(x_T, cond, indices, tick):
        def fresh(j):
            return per_sample_noise(seed, indices, tuple(x_T.shape[1:]), stream=j + 1)

        out = student_sample(eps, x_T, cond, models.sched, grid, K, fresh_noise=fresh,
                             timestep_scaling=timestep_scaling)
        tick(1.0)
        return out

    return sample


@torch.inference_mode()
def generate(store: SampleStore, todo: list[int], captions: list[str], init_noise, sample: Sampler, models: Models,
             batch_size: int, vae_batch_size: int, desc: str, show_progress: bool,
             featurize: Callable | None = None, on_batch: Callable[[float], None] | None = None) -> None:
    """Generate the captions ``todo`` in batches; each batch's images and latents are committed at once,
    with ``featurize(images)`` (the instance metrics' features of the in-memory images) if given. A batch's
    files are written (JPEG encoding, the shard that commits them) on a writer thread while the next batch is
    sampled; one batch at a time is in flight, a write error stops the loop at the next batch, and a run stopped
    for any reason first finishes the write in flight. ``on_batch(seconds)``: the time of each full batch up to
    its write (sampling and decoding)."""
    bar = Progress(len(todo), desc, "img", enabled=show_progress, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
    with ThreadPoolExecutor(1, thread_name_prefix="sample-writer") as writer:
        pending = None
        try:
            for b in range(0, len(todo), batch_size):
                t0 = time.perf_counter()
                idx = todo[b:b + batch_size]
                cond = conditioning(models, [captions[i] for i in idx], store.resolution)
                x_T = init_noise(idx).to(models.device)
                latents = sample(x_T, cond, idx, lambda f: bar.update(f * len(idx)))
                images = decode(models.vae, latents, vae_batch_size)
                features = featurize(images) if featurize else None
                if on_batch is not None and len(idx) == batch_size:
                    on_batch(time.perf_counter() - t0)
                previous, pending = pending, None
                if previous is not None:
                    previous.result()  # the previous batch is on disk (or its error is raised here)
                pending = writer.submit(store.write_batch, idx, latents.float().cpu(), images, features)
                bar.update(b + len(idx) - bar.n)  # the batch counted whole, whatever its ticks added up to
        except BaseException:
            failed = pending.exception() if pending is not None else None  # waits for the write in flight
            if failed is not None:  # raised from here it would hide the error that stopped the loop
                print(f"warning: a batch's files were not written ({one_line(failed)}): rerun to make them",
                      file=sys.stderr, flush=True)
            raise
        if pending is not None:
            pending.result()
    bar.close()
