"""The step's inputs from a batch of data (docs/method.md §1, §7): SDXL conditioning from the text encoders, VAE
latents (or both from the precomputed cache), each sample's start index and noise, x_t.

Randomness (timesteps, noise, VAE sampling) is a pure function of the seed and each sample's position in the data
stream (``noise.Stream``), so the result does not depend on how the global batch is split over processes.
"""

from __future__ import annotations

import torch

from . import models
from .fast import to_device
from .noise import Stream, generator_for, per_sample_noise
from .schedule import Grid, NoiseSchedule


class Encoders:
    """The text encoders and the VAE on ``device``: conditioning, the VAE posterior and its sample."""

    def __init__(self, tokenizers, text_encoders, vae, device, dtype: torch.dtype, resolution: int,
                 vae_encode_batch_size: int = 8, seed: int = 0):
        self.tokenizers, self.text_encoders, self.vae = tokenizers, text_encoders, vae
        self.device, self.dtype, self.resolution = torch.device(device), dtype, resolution
        self.vae_encode_batch_size, self.seed = vae_encode_batch_size, seed

    @classmethod
    def on_device(cls, teacher, args, device, dtype: torch.dtype) -> "Encoders":
        """``teacher``'s text encoders and VAE (``models.load_teacher``) moved to ``device`` in ``dtype``, with the
        flags' resolution, VAE batch and seed: the stock SDXL VAE overflows in fp16, so it stays fp32 unless an
        fp16-safe VAE was given (as the reference)."""
        vae_dtype = torch.float32 if args.pretrained_vae_model_name_or_path is None else dtype
        for m, d in [(teacher.vae, vae_dtype)] + [(te, dtype) for te in teacher.text_encoders]:
            m.to(device) if d == torch.float32 else m.to(device, dtype=d)
        return cls(teacher.tokenizers, teacher.text_encoders, teacher.vae, device, dtype, args.resolution,
                   args.vae_encode_batch_size, args.seed)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> list:
        return [*self.text_encoders, self.vae]

    def conditioning(self, batch) -> dict:
        prompt_embeds, pooled = models.encode_prompts(batch["captions"], self.tokenizers, self.text_encoders)
        ids = models.time_ids(batch["original_sizes"], batch["crop_top_lefts"], (self.resolution,) * 2)
        return {"prompt_embeds": to_device(prompt_embeds, self.device, self.dtype),
                "text_embeds": to_device(pooled, self.device, self.dtype),
                "time_ids": to_device(ids, self.device, self.dtype)}

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior (unscaled latents)."""
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        mean, std = [], []
        for chunk in pixels.split(self.vae_encode_batch_size):
            dist = self.vae.encode(chunk).latent_dist
            mean.append(dist.mean)
            std.append(dist.std)
        return torch.cat(mean), torch.cat(std)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, positions) -> torch.Tensor:
        """Scaled posterior sample mean + std * z, z drawn per sample from (seed, stream position)."""
        dev = self.device
        mean, std = to_device(mean, dev).float(), to_device(std, dev).float()
        z = to_device(per_sample_noise(self.seed, positions, tuple(mean.shape[1:]), stream=Stream.VAE), dev)
        return (mean + std * z) * self.vae.config.scaling_factor


def prepare(batch, encoders: Encoders, sched: NoiseSchedule, grid: Grid, seed: int) -> dict:
    """A micro-batch's inputs (``cmdistill.step``'s prepared batch, without its ``key``): x_t at each sample's start
    index, its timesteps and conditioning, the positions and the count of skipped images."""
    positions = batch["positions"]
    if "mean" in batch:  # precomputed (cmdistill.precompute): no VAE encoder, no text encoders
        latents = encoders.sample_latents(batch["mean"], batch["std"], positions)
        cond = {k: to_device(batch[k], encoders.device, encoders.dtype)
                for k in ("prompt_embeds", "text_embeds", "time_ids")}
    else:
        latents = encoders.sample_latents(*encoders.posterior(batch["pixel_values"]), positions)
        cond = encoders.conditioning(batch)
    start = torch.cat([torch.randint(0, grid.N, (1,), generator=generator_for(seed, Stream.TIMESTEP, p))
                       for p in positions])
    noise = to_device(per_sample_noise(seed, positions, tuple(latents.shape[1:]), stream=Stream.NOISE), latents.device)
    t = grid.timestep(start)
    return {"x_t": sched.add_noise(latents, noise, t), "t": t, "start": start, "cond": cond,
            "positions": positions, "skipped": batch["skipped"]}
