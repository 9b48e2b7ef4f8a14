"""Loading the SDXL teacher, the LoRA student (adding, saving, loading, exporting it), SDXL text conditioning
(docs/method.md §1).

One UNet lives in memory: with its LoRA adapter disabled it *is* the teacher (``fast.base_view``: the same
weights seen without the adapter layers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, one_line

DEFAULT_LORA_TARGETS = ("to_q to_k to_v to_out.0 proj_in proj_out ff.net.0.proj ff.net.2 conv1 conv2 "
                        "conv_shortcut downsamplers.0.conv upsamplers.0.conv time_emb_proj").split()
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # the paper's teacher, the default of every program


def _hint(path: str) -> str:
    if os.path.isdir(path) or path.startswith(("/", "./", "../", "~")):
        return f"check that '{path}' is a diffusers folder (saved with save_pretrained)"
    return (f"'{path}' is not a local folder and could not be fetched from the hub (offline?): download it "
            f"where you have network (`hf download {path}`) and set HF_HOME, or pass a local folder")


def resolve_model_path(path: str, revision: str | None = None, cache_dir: str | None = None,
                       flag: str = "--pretrained_teacher_model") -> str:
    """A local folder as is; a hub id from the local cache when it is there; otherwise check quickly
    that the hub is reachable, so that an offline machine gets one clear line instead of minutes
    of retries."""
    if os.path.isdir(os.path.expanduser(path)) or path.startswith(("/", "./", "../", "~")):
        if not os.path.exists(os.path.expanduser(path)):
            raise UserError(f"{flag}: folder '{path}' does not exist")
        return os.path.expanduser(path)
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{flag}: {_hint(path)} (HF_HUB_OFFLINE is set)")
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        raise UserError(f"{flag}: {_hint(path)}") from None
    return path


def from_pretrained(cls, path: str, subfolder: str | None = None, flag: str = "--pretrained_teacher_model",
                    **kwargs):
    """``cls.from_pretrained`` with a one-line error naming the fix when the weights are missing."""
    if path.startswith(("/", "./", "../")) and not os.path.exists(path):
        raise UserError(f"{flag}: folder '{path}' does not exist")
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        what = f"{path}" + (f" (subfolder '{subfolder}')" if subfolder else "")
        raise UserError(f"{flag}: cannot load {cls.__name__} from {what}: {_hint(path)} "
                        f"[{one_line(e, 160)}]") from None


@dataclass
class Teacher:
    tokenizers: list
    text_encoders: list
    vae: object
    unet: object
    scheduler: object


def load_teacher(model: str, vae_path: str | None = None, revision: str | None = None,
                 teacher_revision: str | None = None, cache_dir: str | None = None, load_unet: bool = True) -> Teacher:
    """Load the SDXL components from a hub id or a local pipeline folder (docs/method.md §1)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = resolve_model_path(model, teacher_revision, cache_dir)
    if vae_path:
        vae_path = resolve_model_path(vae_path, revision, cache_dir, flag="--pretrained_vae_model_name_or_path")
    kw = dict(revision=teacher_revision, cache_dir=cache_dir)
    tok1 = from_pretrained(CLIPTokenizer, model, "tokenizer", **kw)
    tok2 = from_pretrained(CLIPTokenizer, model, "tokenizer_2", **kw)
    te1 = from_pretrained(CLIPTextModel, model, "text_encoder", **kw)
    te2 = from_pretrained(CLIPTextModelWithProjection, model, "text_encoder_2", **kw)
    if vae_path:
        vae = from_pretrained(AutoencoderKL, vae_path, None, flag="--pretrained_vae_model_name_or_path",
                              revision=revision, cache_dir=cache_dir)
    else:
        vae = from_pretrained(AutoencoderKL, model, "vae", **kw)
    unet = from_pretrained(UNet2DConditionModel, model, "unet", **kw) if load_unet else None
    sched = from_pretrained(DDPMScheduler, model, "scheduler", **kw)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserError(f"--pretrained_teacher_model {model}: the UNet is not SDXL-conditioned "
                        "(addition_embed_type must be 'text_time')")
    for m in (te1, te2, vae, unet):
        if m is None:
            continue
        m.requires_grad_(False)
        m.eval()
    return Teacher([tok1, tok2], [te1, te2], vae, unet, sched)


@torch.no_grad()
def encode_prompts(captions: list[str], tokenizers, text_encoders) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning (docs/method.md §1): penultimate hidden states of both encoders concatenated,
    and the pooled (projected) output of the second encoder."""
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_sizes, crop_top_lefts, target_size) -> torch.Tensor:
    """SDXL micro-conditioning (docs/method.md §1): original (h, w) + crop top-left (y, x) + target (h, w)."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, dtype=torch.float32)


def add_lora(unet, rank: int = 64, alpha: float = 64, dropout: float = 0.0, targets=DEFAULT_LORA_TARGETS):
    """Attach the student's LoRA adapter (docs/method.md §1). B is initialised to zero, so the student starts
    as the teacher."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))
    return unet


def tuner_layers(unet) -> list:
    """The UNet's PEFT adapter layers (LoRA-wrapped convolutions and linears)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def lora_state_dict(unet) -> dict:
    # PEFT-format keys (lora_A / lora_B): diffusers' loader maps every one of them back. (The older
    # "lora.down/up" naming from convert_state_dict_to_diffusers loses the attention projections
    # when read back by load_lora_weights in diffusers 0.42.)
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def lora_metadata(unet, adapter: str = "default") -> dict:
    """The adapter's ``LoraConfig`` (rank, alpha, target modules, ...) as a dict: what diffusers stores in a
    LoRA file so that ``load_lora_weights`` rebuilds the adapter with the trained alpha (without it, diffusers
    assumes alpha = rank). Sets become sorted lists, so that the same adapter always writes the same bytes
    (a set's order changes from process to process)."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v
            for k, v in unet.peft_config[adapter].to_dict().items()}


def save_lora(unet, directory: str | Path) -> None:
    """Write the LoRA in the diffusers format that ``StableDiffusionXLPipeline.load_lora_weights`` reads, with
    the adapter metadata (``lora_metadata``) in the safetensors header."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(str(directory), unet_lora_layers=lora_state_dict(unet),
                                                safe_serialization=True,
                                                unet_lora_adapter_metadata=lora_metadata(unet))
    canonical_header(Path(directory) / LORA_WEIGHT_NAME)


def canonical_header(path: str | Path) -> None:
    """Rewrite a safetensors file's JSON header in place with its keys sorted: safetensors writes the header's
    entries (and the metadata's) in a hash order that changes from process to process, so the same weights would
    not always give the same bytes. Same length, same tensors and offsets: only the order of the entries."""
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
        if len(text) > n:  # (never: the same entries, compact) leave the file as written
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def read_lora_metadata(directory: str | Path) -> dict | None:
    """The UNet adapter's ``LoraConfig`` fields stored by :func:`save_lora` in ``directory``'s LoRA file; None
    for a file written without them."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(Path(directory) / LORA_WEIGHT_NAME), "pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    return {k[len("unet."):]: v for k, v in json.loads(raw).items() if k.startswith("unet.")} or None


def load_lora_into(unet, directory: str | Path) -> None:
    """Load LoRA weights written by :func:`save_lora` into a UNet that already has the adapter."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    directory = Path(directory)
    if not (directory / LORA_WEIGHT_NAME).is_file():
        raise UserError(f"no LoRA weights ({LORA_WEIGHT_NAME}) in '{directory}': train first, or point "
                        "to a checkpoint-* folder or the training --output_dir")
    meta = read_lora_metadata(directory)
    mine = unet.peft_config["default"]
    if meta is not None and (meta.get("r"), float(meta.get("lora_alpha"))) != (mine.r, float(mine.lora_alpha)):
        raise UserError(f"the LoRA in '{directory}' has rank {meta.get('r')} and alpha {meta.get('lora_alpha')}, "
                        f"not {mine.r} and {mine.lora_alpha}: pass --lora_rank {meta.get('r')} --lora_alpha "
                        f"{meta.get('lora_alpha')}")
    sd, _ = StableDiffusionXLPipeline.lora_state_dict(str(directory))
    sd = {k.replace("unet.", "", 1): v for k, v in sd.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(sd), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"LoRA weights in '{directory}' do not fit this UNet "
                        f"(e.g. {result.unexpected_keys[0]}): wrong --lora_target_modules or teacher?")
    require_finite_lora(unet, directory / LORA_WEIGHT_NAME)


def lora_is_finite(weights) -> bool:
    """Whether every LoRA weight is finite: ``weights`` is a model with adapters (its ``lora_`` parameters) or a
    dict / iterable of tensors (e.g. a loaded LoRA file)."""
    if isinstance(weights, torch.nn.Module):
        tensors = [p for n, p in weights.named_parameters() if "lora_" in n]
    else:
        tensors = list(weights.values()) if isinstance(weights, dict) else list(weights)
    flags: dict = {}  # one reduction and one host sync per device, not one per tensor
    for t in tensors:
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def require_finite_lora(unet, source) -> None:
    """A one-line error naming ``source`` when the LoRA weights loaded into ``unet`` are not all finite."""
    if not lora_is_finite(unet):
        raise UserError(f"the LoRA weights in {source} are not finite (NaN or inf: the run diverged): use an "
                        "earlier checkpoint-* folder of that run")


PEFT_SUBFOLDER = "peft"


def write_peft_adapter(lora_dir: str | Path, dest: str | Path | None = None,
                       base_model: str | None = None) -> Path:
    """Write the LoRA of ``lora_dir`` (a :func:`save_lora` folder: a run's --output_dir or a checkpoint) as a
    PEFT adapter, ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names, in ``dest``
    (default ``lora_dir/peft``): ``PeftModel.from_pretrained(unet, dest)`` loads it. The same tensors as the
    diffusers file, whose header supplies the config; ``base_model`` goes to ``base_model_name_or_path``."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    lora_dir = Path(lora_dir)
    meta = read_lora_metadata(lora_dir)
    if meta is None:
        raise UserError(f"{lora_dir / LORA_WEIGHT_NAME} carries no adapter metadata (written before it was "
                        "recorded): its alpha is unknown, so it cannot be exported for PEFT")
    config = LoraConfig(**meta)
    config.base_model_name_or_path, config.inference_mode = base_model, True
    sd, _ = StableDiffusionXLPipeline.lora_state_dict(str(lora_dir))
    # A PeftModel wraps the UNet as base_model.model; its files omit the adapter name.
    weights = {"base_model.model." + k[len("unet."):]: v.contiguous() for k, v in sd.items() if k.startswith("unet.")}
    dest = Path(dest) if dest is not None else lora_dir / PEFT_SUBFOLDER
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dest))
    save_file(weights, str(dest / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    canonical_header(dest / SAFETENSORS_WEIGHTS_NAME)
    return dest
