"""Tiny SDXL-architecture pipelines with random weights, built offline from configs.

Used by the tests and the toy world: the same components as SDXL (UNet with ``text_time``
conditioning, CLIPTextModel + CLIPTextModelWithProjection, AutoencoderKL with 8x downsampling,
a 1000-step scaled_linear scheduler) and the REAL CLIP tokenizer, built from the BPE vocabulary
that open_clip_torch ships. Saved with ``save_pretrained`` so that the scripts load it through the
very ``from_pretrained`` path that users take with ``stabilityai/stable-diffusion-xl-base-1.0``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to code points >= 256.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(directory: str | Path) -> Path:
    """Write ``vocab.json`` / ``merges.txt`` of OpenAI's CLIP tokenizer from open_clip's shipped BPE file,
    and save a ``CLIPTokenizer`` (``<|startoftext|>`` / ``<|endoftext|>``, ``model_max_length=77``)."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77,
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        unk_token="<|endoftext|>")
    tok.save_pretrained(directory)
    return directory


def tiny_sdxl_components(seed: int = 0, text_dim: int = 32, unet_channels=(32, 64), sample_size: int = 8,
                         layers_per_block: int = 1):
    """Random-weight SDXL-architecture components (text dims 2x``text_dim``, 8x VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(unet_channels), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1), cross_attention_dim=2 * text_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_dim, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, layers_per_block=1, sample_size=64, scaling_factor=0.13025,
    )
    te1, te2 = small_text_encoders(text_dim, 2 * text_dim, "gelu")
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, scheduler=sdxl_scheduler())


def small_text_encoders(hidden: int, intermediate: int, act: str):
    """SDXL's two text encoders (CLIP-L style, and bigG style with a projection) at a small width, over the
    real CLIP vocabulary (49,408 tokens, 77 positions); random weights from the current torch seed."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4, num_hidden_layers=3,
               vocab_size=49408, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
               bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


def sdxl_scheduler():
    """SDXL base's training noise schedule (scaled-linear betas 0.00085..0.012, epsilon, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False)


def save_pipeline(directory: str | Path, components: dict) -> Path:
    """Save components as an SDXL pipeline folder (``model_index.json`` + subfolders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    directory = Path(directory)
    tok_dir = write_clip_tokenizer(directory / "_tokenizer_build")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionXLPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], text_encoder_2=components["text_encoder_2"],
        tokenizer=tok, tokenizer_2=tok, unet=components["unet"],
        scheduler=EulerDiscreteScheduler.from_config(components["scheduler"].config),
    )
    pipe.save_pretrained(directory)
    import shutil

    shutil.rmtree(tok_dir)
    return directory


def build_tiny_pipeline(directory: str | Path, seed: int = 0, **kw) -> Path:
    """Build and save a random-weight tiny SDXL pipeline; returns its folder."""
    return save_pipeline(directory, tiny_sdxl_components(seed=seed, **kw))
