"""Evidence that the toy teacher is trained: its DDIM samples scored with the toy metrics.

The teacher samples exactly as the study's teacher reference does (docs/method.md §8): deterministic DDIM on
the N-grid from per-caption noise, Imagen-form guidance with zero unconditional embeddings. Each
score is set beside readings that make it interpretable: another set of real images, the VAE
reconstructions of the reference images (what a perfect UNet could reach), and an untrained UNet of
the same architecture behind the same trained VAE.
"""

from __future__ import annotations

import numpy as np
import torch

from ..guidance import GuidedEps, UNetEps
from ..models import encode_prompts
from ..noise import per_sample_noise
from ..sampling import teacher_sample
from ..schedule import Grid, NoiseSchedule
from ..solvers import ddim_step
from .encoders import caption_accuracy, encoder_outputs, frechet_distance
from .teacher import decode_latents, encode_posterior, sdxl_time_ids


@torch.no_grad()
def sample_teacher(teacher, captions: list[str], w: float, N: int = 50, seed: int = 0,
                   resolution: int = 64, unet=None, batch_size: int = 250) -> tuple[torch.Tensor, np.ndarray]:
    """DDIM samples of the (toy) teacher on the N-grid: (scaled latents, uint8 images). Caption i starts from the
    noise of (seed, i) (docs/method.md §8, docs/method.md §8.3). ``unet`` replaces the teacher's UNet (e.g. an untrained one)."""
    unet = unet if unet is not None else teacher.unet
    sched = NoiseSchedule.from_scheduler(teacher.scheduler)
    grid = Grid(sched.T, N)
    side = resolution // 8
    dev = next(unet.parameters()).device
    lat = []
    for i in range(0, len(captions), batch_size):
        caps = captions[i:i + batch_size]
        pe, po = encode_prompts(caps, teacher.tokenizers, teacher.text_encoders)
        cond = {"prompt_embeds": pe, "text_embeds": po, "time_ids": sdxl_time_ids(len(caps), resolution)}
        cond = {k: v.to(dev) for k, v in cond.items()}
        x_T = per_sample_noise(seed, range(i, i + len(caps)), (unet.config.in_channels, side, side)).to(dev)
        eps = GuidedEps(UNetEps(unet, torch.float32), w, batched=True)
        lat.append(teacher_sample(ddim_step, eps, x_T, cond, sched, grid).cpu())
    lat = torch.cat(lat)
    return lat, decode_latents(teacher.vae, lat)


def toy_scores(encoder, images, captions: list[str], ref_features: np.ndarray) -> dict:
    """``fd_toy`` against reference features and mean ``toy_caption_acc`` of images for their captions."""
    feats, _ = encoder_outputs(encoder, images)
    return {"fd_toy": frechet_distance(feats, ref_features),
            "toy_caption_acc": float(caption_accuracy(encoder, images, captions).mean())}


@torch.no_grad()
def denoising_mse(teacher, latents: torch.Tensor, captions: list[str], unet=None, resolution: int = 64,
                  timesteps=(50, 250, 500, 750, 950), seed: int = 0) -> float:
    """The training loss on given clean (scaled) latents: mean over ``timesteps`` of
    ||eps_theta(alpha_t x0 + sigma_t eps, t, c) - eps||^2, noise of (seed, caption index). An untrained
    UNet scores about 1 (or worse); a trained one far less -- the check that does not go through the VAE."""
    unet = unet if unet is not None else teacher.unet
    dev = next(unet.parameters()).device
    sched = NoiseSchedule.from_scheduler(teacher.scheduler)
    pe, po = encode_prompts(captions, teacher.tokenizers, teacher.text_encoders)
    cond = {"prompt_embeds": pe.to(dev), "text_embeds": po.to(dev),
            "time_ids": sdxl_time_ids(len(captions), resolution).to(dev)}
    eps_fn = UNetEps(unet, torch.float32)
    x0 = latents.float().to(dev)
    losses = []
    for j, t in enumerate(timesteps):
        eps = per_sample_noise(seed, range(len(captions)), tuple(x0.shape[1:]), stream=100 + j).to(dev)
        tt = torch.full((len(captions),), int(t))
        losses.append(float(((eps_fn(sched.add_noise(x0, eps, tt), tt, cond) - eps) ** 2).mean()))
    return float(np.mean(losses))


def _latent_stats(lat: torch.Tensor) -> dict:
    return {"latent_mean": float(lat.mean()), "latent_std": float(lat.std())}


def evaluate_teacher(teacher, encoder, images: np.ndarray, captions: list[str], holdout: tuple | None = None,
                     ws=(1.0, 3.0), N: int = 50, seed: int = 0, resolution: int = 64,
                     untrained_unet=None, log=print) -> dict:
    """Toy metrics of the teacher's samples for ``captions`` (reference: the real ``images`` of those
    captions, docs/method.md §9), for each guidance scale in ``ws``; the untrained UNet at the first and last w.
    Readings beside them: ``real_holdout`` (another real sample, ``holdout`` = (images, captions), with
    other captions: the FD of two independent real sets of this size; samples made for the reference's
    own captions can score below it), ``vae_reconstruction`` (the ceiling of caption accuracy behind
    this VAE), the statistics of the sampled latents against the real ones, and the denoising loss of
    both UNets on the real latents."""
    ref, _ = encoder_outputs(encoder, images)
    out = {"num_captions": len(captions), "num_steps": N, "seed": seed}  # eval.json: N as "num_steps"
    if holdout is not None:
        out["real_holdout"] = toy_scores(encoder, holdout[0], holdout[1], ref)
    mean, _ = encode_posterior(teacher.vae, images)
    real_lat = mean * teacher.vae.config.scaling_factor
    recon = decode_latents(teacher.vae, real_lat)
    out["vae_reconstruction"] = {**toy_scores(encoder, recon, captions, ref), **_latent_stats(real_lat)}
    log(f"  real held-out images: {out.get('real_holdout')}  VAE reconstructions: {out['vae_reconstruction']}")
    out["denoising_mse"] = {"trained": denoising_mse(teacher, real_lat, captions, resolution=resolution, seed=seed)}
    if untrained_unet is not None:
        out["denoising_mse"]["untrained"] = denoising_mse(teacher, real_lat, captions, untrained_unet, resolution,
                                                          seed=seed)
    log(f"  denoising loss on the real latents: {out['denoising_mse']}")
    out["trained"], out["untrained"] = {}, {}
    for w in ws:
        lat, imgs = sample_teacher(teacher, captions, w, N, seed, resolution)
        out["trained"][f"w={w:g}"] = {**toy_scores(encoder, imgs, captions, ref), **_latent_stats(lat)}
        log(f"  trained teacher   w={w:g}: {out['trained'][f'w={w:g}']}")
    if untrained_unet is not None:
        for w in sorted({ws[0], ws[-1]}):
            lat, imgs = sample_teacher(teacher, captions, w, N, seed, resolution, unet=untrained_unet)
            out["untrained"][f"w={w:g}"] = {**toy_scores(encoder, imgs, captions, ref), **_latent_stats(lat)}
            log(f"  untrained teacher w={w:g}: {out['untrained'][f'w={w:g}']}")
    return out
