"""The toy teacher: an SDXL-architecture pipeline small enough for a CPU, trained on the toy images.

Same components and conventions as SDXL base (docs/method.md §1): UNet with ``text_time`` conditioning,
CLIPTextModel + CLIPTextModelWithProjection with the real CLIP tokenizer, an 8x AutoencoderKL,
the 1000-step ``scaled_linear`` schedule, epsilon prediction. Trained here in two stages:

1. the VAE as an autoencoder (mean squared reconstruction error + a small KL), then
   ``scaling_factor`` set so that the scaled latents have unit standard deviation (SDXL's 0.13025
   plays the same role);
2. the UNet with the epsilon-prediction loss on the 1000-step schedule, conditioning dropout
   to ZERO prompt and pooled embeddings (the unconditional branch of docs/method.md §3), and SDXL
   time_ids with original = target = resolution, crop (0, 0).

The text encoders stay frozen at their random initialisation, as SDXL's stay frozen at their
pre-trained weights during distillation: a random CLIP transformer still maps different
captions to different embeddings (it is a residual network over distinct random token
vectors), and the UNet's cross-attention learns to read them. Training them would add two
networks to the backward pass of the UNet stage and buy nothing the study measures: the
students are distilled, and every metric computed, under the same frozen encoders.

Timestep convention: the UNet gets timestep VALUES t in 1..1000 and the noise level of index
t - 1 (docs/method.md §2), the convention every sampler and objective of the project uses; SDXL itself was
trained with diffusers' index convention (value t, level t), one step apart, which does not
matter for SDXL but would be a needless mismatch for a teacher trained here.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..schedule import NoiseSchedule

# Architecture defaults of the toy teacher (64 px images -> 8 x 8 x 4 latents).
TEACHER_ARCH = dict(
    text_dim=16,                      # hidden size of each text encoder: prompt_embeds 77 x 32, pooled 16
    unet_channels=(32, 64),           # 8 x 8 and 4 x 4 latent resolutions, cross-attention at both (1.1 M)
    attention_head_dim=(2, 4),        # heads per level
    layers_per_block=1,
    time_dim=8,                       # addition_time_embed_dim (SDXL: 256)
    vae_channels=(16, 32, 32, 32),    # 4 blocks = 3 downsamplers = 8x, as SDXL's VAE; 8 channels at full
                                      # resolution lose the colours, wider ones cost CPU time for little
)


def teacher_components(seed: int = 0, resolution: int = 64, **arch) -> dict:
    """Random-weight components of the toy teacher (the untrained teacher of the same ``seed``);
    ``arch`` overrides entries of :data:`TEACHER_ARCH`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..tiny import sdxl_scheduler, small_text_encoders

    unknown = set(arch) - set(TEACHER_ARCH)
    if unknown:
        raise TypeError(f"unknown architecture settings {sorted(unknown)}; known: {sorted(TEACHER_ARCH)}")
    a = {**TEACHER_ARCH, **arch}
    text_dim, unet_channels, time_dim = a["text_dim"], a["unet_channels"], a["time_dim"]
    if resolution % 32:
        raise ValueError(f"resolution {resolution} must be a multiple of 32 (8x VAE, then a 4x4 latent at least)")
    torch.manual_seed(seed)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=a["layers_per_block"],
        block_out_channels=tuple(unet_channels), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, attention_head_dim=tuple(a["attention_head_dim"]),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1,) * n, cross_attention_dim=2 * text_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_dim, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=tuple(a["vae_channels"]), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, layers_per_block=1, sample_size=resolution, scaling_factor=1.0,
    )
    te1, te2 = small_text_encoders(text_dim, 4 * text_dim, "quick_gelu")
    sched = sdxl_scheduler()
    for m in (unet, vae, te1, te2):
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, scheduler=sched)


def load_tokenizers(directory) -> list:
    """The real CLIP tokenizer (twice, as SDXL's two), written offline into ``directory``."""
    from transformers import CLIPTokenizer

    from ..tiny import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory))
    return [tok, tok]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _log(log, msg):
    if log is not None:
        log(msg)


# ----------------------------------------------------------------------------------- the VAE --

def train_vae(vae, images: np.ndarray, steps: int = 1500, batch_size: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-4, recon: str = "mse", seed: int = 0, log=print) -> dict:
    """Train the AutoencoderKL on uint8 images: reconstruction loss of a posterior sample (``recon``:
    mse, l1 or l1+mse) + ``kl_weight`` x the per-element KL to N(0, I). Then set ``scaling_factor`` =
    1 / std of the latents (posterior samples of every image), written into the VAE config as SDXL's
    is. Returns training statistics."""
    g = torch.Generator().manual_seed(seed)
    dev = next(vae.parameters()).device
    x_all = to_pixels(images)
    # Start the posterior narrow (std e^-3 = 0.05): with diffusers' default init (std 1) the latent
    # starts as pure noise, the decoder learns to ignore it and paints the average background for
    # hundreds of steps before the small shapes get encoded at all.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, min(100, steps // 10 + 1)))
    vae.train()
    t0, rec_ema = time.time(), None
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        x = x_all[idx].to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l_rec = {"l1": l1, "mse": F.mse_loss(rec, x), "l1+mse": l1 + F.mse_loss(rec, x)}[recon]
        l_kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        loss = l_rec + kl_weight * l_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        rec_ema = l1.item() if rec_ema is None else 0.98 * rec_ema + 0.02 * l1.item()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            _log(log, f"  vae step {step + 1}/{steps}  l1 {rec_ema:.4f}  kl {l_kl.item():.3f}  "
                      f"({time.time() - t0:.0f} s)")
    vae.eval()
    mean, std = encode_posterior(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=g)
    scale = 1.0 / float(z.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        recon = decode_latents(vae, mean[:256] * scale)
    return {"scaling_factor": scale, "latent_mean": float(z.mean() * scale),
            "posterior_std_over_latent_std": float(std.mean() / z.std()),
            "l1_reconstruction": float((to_pixels(recon) - to_pixels(images[:256])).abs().mean())}


@torch.no_grad()
def encode_posterior(vae, images: np.ndarray, batch_size: int = 256):
    """Unscaled posterior mean and std of every image (the UNet stage samples from these)."""
    means, stds = [], []
    dev = next(vae.parameters()).device
    for i in range(0, len(images), batch_size):
        post = vae.encode(to_pixels(images[i:i + batch_size]).to(dev)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Scaled latents -> uint8 images [N, H, W, 3] (as the pipeline decodes: z / scaling_factor)."""
    out = []
    dev = next(vae.parameters()).device
    for i in range(0, len(latents), batch_size):
        x = vae.decode(latents[i:i + batch_size].to(dev).float() / vae.config.scaling_factor).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------- the UNet --

def sdxl_time_ids(n: int, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning of a toy image: original = target = (resolution, resolution), crop (0, 0)."""
    from ..models import time_ids

    return time_ids([(resolution, resolution)] * n, [(0, 0)] * n, (resolution, resolution))


class EMA:
    """Exponential moving average of parameters, with the usual warm-up min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model, decay: float = 0.999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self, model):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - d)


def train_unet(unet, latent_mean: torch.Tensor, latent_std: torch.Tensor, prompt_embeds: torch.Tensor,
               pooled: torch.Tensor, scaling_factor: float, resolution: int, steps: int = 6000,
               batch_size: int = 64, lr: float = 1e-3, cond_dropout: float = 0.1, ema_decay: float = 0.999,
               seed: int = 0, log=print):
    """Epsilon-prediction training on the 1000-step schedule (docs/method.md §1, §2); returns the EMA UNet.

    x0 = scaling_factor x a posterior sample of the image's latent; t uniform in 1..1000;
    x_t = alpha_t x0 + sigma_t eps; loss = ||eps_theta(x_t, t, c) - eps||^2. With probability
    ``cond_dropout`` a sample's prompt AND pooled embeddings are set to zero tensors (docs/method.md §3)."""
    sched = NoiseSchedule.sdxl()
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    tids = sdxl_time_ids(batch_size, resolution).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, min(200, steps // 10 + 1)))
    ema = EMA(unet, ema_decay)
    unet.train()
    t0, loss_ema = time.time(), None
    for step in range(steps):
        idx = torch.randint(len(latent_mean), (batch_size,), generator=g)
        x0 = scaling_factor * (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g))
        t = torch.randint(1, sched.T + 1, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = sched.add_noise(x0, eps, t)
        keep = (torch.rand(batch_size, generator=g) >= cond_dropout).float()
        pe = (prompt_embeds[idx] * keep.view(-1, 1, 1)).to(dev)
        po = (pooled[idx] * keep.view(-1, 1)).to(dev)
        x_t, eps, t = x_t.to(dev), eps.to(dev), t.to(dev)
        pred = unet(x_t, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": po, "time_ids": tids},
                    return_dict=False)[0]
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lrs.step()
        ema.update(unet)
        loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            _log(log, f"  unet step {step + 1}/{steps}  loss {loss_ema:.4f}  ({time.time() - t0:.0f} s)")
    unet.eval()
    return ema.model, {"final_loss_ema": loss_ema}
