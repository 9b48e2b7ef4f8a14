"""What a run records and publishes: secrets never, the final LoRA in every loadable form, its model card.

- Redaction by rule: a setting whose name looks like a secret (token, secret, password, key, ...) and any
  string that looks like a Hugging Face token (``hf_...``) are replaced by ``<redacted>`` in the recorded
  configuration (``training_config.json`` and its checkpoint copies, the trackers' hparams) and in log lines.
- ``save_final``: the final LoRA with its adapter metadata (diffusers), the same LoRA as a PEFT adapter
  (``peft/``), the sampler's scheduler config (``scheduler/``) and a model card (``README.md``).
- ``push_run``: a PRIVATE repository unless asked otherwise, and only the files of ``upload_files`` (never a
  checkpoint or a configuration), after checking that none holds a token.

    python -m cmdistill.hub card runs/cm                 # rewrite the model card (with metrics.json if present)
    python -m cmdistill.hub push runs/cm --hub_model_id me/cm-sdxl [--hub_public] [--push_logs]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path

from . import models
from .errors import UserError, exit_on_user_error, one_line
from .files import atomic_write
from .run_folder import CONFIG_NAME, METRICS_NAME

REDACTED = "<redacted>"
CARD_NAME = "README.md"
SCHEDULER_SUBFOLDER = "scheduler"
LICENSES = {models.SDXL_BASE: "openrail++"}
_SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "key", "apikey", "credential", "credentials",
                 "auth", "bearer"}
_SECRET_ENDINGS = ("token", "secret", "password", "apikey")
# Hugging Face user/org tokens (hf_ + 34 letters and digits; older api_org_ ones).
_HF_TOKEN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{20,}")
_HF_TOKEN_BYTES = re.compile(rb"(?:hf|api_org)_[A-Za-z0-9]{20,}")


# --- redaction ---------------------------------------------------------------------------------------

def is_secret_name(name: str) -> bool:
    """A setting named like a secret: a word of its name (split at _ - . and spaces) is token, secret,
    password, key, auth, credential(s)... or ends in token/secret/password/apikey (``hub_token``, ``api_key``,
    ``wandb_apikey``); ``tokenizer_name`` or ``max_tokens`` are not."""
    words = [w for w in re.split(r"[_\-.\s]+", str(name).lower()) if w]
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_ENDINGS) for w in words)


def redact_text(text: str, secrets=()) -> str:
    """``text`` with Hugging Face tokens and the given secret values replaced by ``<redacted>``."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    return _HF_TOKEN.sub(REDACTED, text)


def secret_values(obj) -> list[str]:
    """The string values of settings named like secrets, anywhere in a nested dict/list."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_name(k) and isinstance(v, str) and v:
                found.append(v)
            found += secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += secret_values(v)
    return found


def redact(obj, secrets=None):
    """A copy of a nested dict/list/str with every secret removed: a secret-named setting that is set becomes
    ``<redacted>`` (unset ones stay None/empty), and secret values and HF tokens are cut out of every string."""
    if secrets is None:
        secrets = secret_values(obj)
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(k) and v not in (None, "", False) else redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites a log record whose message holds a secret or an HF token."""

    def __init__(self, secrets=()):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = redact_text(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(secrets=()) -> RedactingFilter:
    """Attach a :class:`RedactingFilter` to every handler configured now (the root's and the libraries')."""
    flt = RedactingFilter(secrets)
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            h.filters = [f for f in h.filters if not isinstance(f, RedactingFilter)] + [flt]
    return flt


def recordable_config(args) -> dict:
    """The run's settings (an argparse namespace or dict) as they may be written anywhere: redacted, and the
    secret values kept out of the log lines from now on."""
    config = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    install_log_redaction(secret_values(config))
    return redact(config)


# --- token and pushing -------------------------------------------------------------------------------

def resolve_token(token: str | None) -> str | None:
    """``--hub_token`` if given, else ``HF_TOKEN`` or the token of ``hf auth login`` (huggingface_hub's rule)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def check_push_args(args) -> None:
    """Fail before training, not after it, when ``--push_to_hub`` could not upload."""
    if not getattr(args, "push_to_hub", False):
        return
    if resolve_token(args.hub_token) is None:
        raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN "
                        "(--hub_token also works, but shows in the process list and shell history)")
    if args.hub_token:
        logging.getLogger("cmdistill").warning("--hub_token on the command line is visible to other users of this "
                                               "machine; prefer HF_TOKEN or `hf auth login` (it is never recorded)")


def upload_files(run_dir: str | Path, include_logs: bool = False, logging_dir: str = "logs") -> list[str]:
    """The files of a run that ``push_run`` uploads, relative to ``run_dir``: the final LoRA, its PEFT adapter,
    the scheduler config and the model card; with ``include_logs`` also ``train_log.jsonl`` and the TensorBoard
    folder. Never checkpoints, optimizer states or ``training_config.json``."""
    run_dir = Path(run_dir)
    names = [models.LORA_WEIGHT_NAME, CARD_NAME, f"{models.PEFT_SUBFOLDER}/adapter_config.json",
             f"{models.PEFT_SUBFOLDER}/adapter_model.safetensors", f"{SCHEDULER_SUBFOLDER}/scheduler_config.json"]
    files = [n for n in names if (run_dir / n).is_file()]
    if include_logs:
        files += [n for n in ["train_log.jsonl"] if (run_dir / n).is_file()]
        logs = run_dir / logging_dir
        if logs.is_dir():
            files += sorted(p.relative_to(run_dir).as_posix() for p in logs.rglob("*") if p.is_file())
    return files


def _check_no_secret(run_dir: Path, files: list[str], token: str | None) -> None:
    for name in files:
        data = (run_dir / name).read_bytes()
        if (token and token.encode() in data) or _HF_TOKEN_BYTES.search(data):
            raise UserError(f"--push_to_hub: {run_dir / name} holds what looks like a Hugging Face token; "
                            "nothing was uploaded: delete the token from the file (or drop --push_logs)")


def push_run(run_dir: str | Path, repo_id: str | None = None, token: str | None = None, public: bool = False,
             include_logs: bool = False, logging_dir: str = "logs") -> str:
    """Upload ``upload_files(run_dir)`` to ``repo_id`` (default: the folder's name under the token's account),
    creating it PRIVATE unless ``public``; returns the repository id. An existing repository keeps its
    visibility."""
    from huggingface_hub import create_repo, upload_folder

    run_dir = Path(run_dir)
    if not (run_dir / models.LORA_WEIGHT_NAME).is_file():
        raise UserError(f"no {models.LORA_WEIGHT_NAME} in '{run_dir}': nothing to push (train to the end first)")
    files = upload_files(run_dir, include_logs, logging_dir)
    token = resolve_token(token)
    _check_no_secret(run_dir, files, token)
    try:
        repo = create_repo(repo_id or run_dir.resolve().name, token=token, private=not public, exist_ok=True).repo_id
        if (run_dir / CONFIG_NAME).is_file():  # the card's snippets name the repository
            write_model_card(run_dir, repo_id=repo)
        upload_folder(repo_id=repo, folder_path=str(run_dir), token=token,
                      allow_patterns=[glob.escape(f) for f in files],
                      commit_message="Upload the distilled LoRA (cmdistill)")
    except Exception as e:
        msg = redact_text(one_line(e, 160), [token] if token else [])
        raise UserError(f"--push_to_hub failed ({msg}); the weights are saved in {run_dir}: "
                        f"push later with `python -m cmdistill.hub push {run_dir}`") from None
    logging.getLogger("cmdistill").info("pushed %d files to %s (%s)", len(files), repo, "public" if public else
                                        "private unless it existed")
    return repo


# --- the final LoRA and its model card ---------------------------------------------------------------

def save_final(unet, run_dir: str | Path, betas, config: dict) -> None:
    """Write the finished run's files into ``run_dir`` (each replaced at once, never half-written): the LoRA
    with its adapter metadata, ``peft/`` (PEFT adapter), ``scheduler/`` (the sampler for stock pipelines, N
    and the boundary scaling of this run) and the model card ``README.md``."""
    from .scheduler import MultistepConsistencyScheduler

    run_dir = Path(run_dir)
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    models.save_lora(unet, tmp)
    models.write_peft_adapter(tmp, tmp / models.PEFT_SUBFOLDER, base_model=_hub_id(config.get("pretrained_teacher_model")))
    MultistepConsistencyScheduler.for_training_run(
        betas, int(config.get("num_discr_timesteps", 100)),
        float(config.get("timestep_scaling_factor", 10.0))).save_pretrained(str(tmp / SCHEDULER_SUBFOLDER))
    for entry in sorted(tmp.iterdir()):
        target = run_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    write_model_card(run_dir, config)


def _hub_id(name) -> str | None:
    """``name`` if it reads as a hub repository id (not a local folder), else None."""
    if not isinstance(name, str) or os.path.exists(name) or name.startswith(("/", ".", "~")):
        return None
    return name if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def _metrics_section(metrics: dict) -> str:
    rows = [r for r in metrics.values() if isinstance(r, dict) and r.get("kind") == "student"]
    if not rows:
        return ""
    cols = [("weights", "weights"), ("steps", "num_inference_steps"), ("images", "num_images"), ("FID", "fid"),
            ("FD-DINO", "fd_dinov2"), ("CLIP", "clip_score"), ("aesthetic", "aesthetic_score"),
            ("ODE error", "ode_error"), ("pixel MSE", "pixel_mse")]
    cols = [(h, k) for h, k in cols if any(k in r for r in rows)]
    rows.sort(key=lambda r: (str(r.get("weights")), r.get("num_inference_steps") or 0))
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |" for r in rows]
    return ("\n## Evaluation\n\nMeasured by `test.py` (multistep consistency sampling on the grid of training, "
            "against the teacher's ODE solutions from the same noise; ODE error: latent MSE to them):\n\n"
            + "\n".join(lines) + "\n")


def model_card(config: dict, metrics: dict | None = None, repo_id: str | None = None):
    """The model card (a ``huggingface_hub.ModelCard``) of a run from its recorded configuration; its snippets
    load from ``repo_id`` (default: ``--hub_model_id`` if recorded)."""
    from huggingface_hub import ModelCard, ModelCardData

    c = config
    teacher, vae = c.get("pretrained_teacher_model"), c.get("pretrained_vae_model_name_or_path")
    base = _hub_id(teacher)
    objective = {"cm": "CM (consistency distillation)", "direct_cm": "Direct CM"}.get(c.get("objective"),
                                                                                        str(c.get("objective")))
    data = ModelCardData(base_model=base, library_name="diffusers", license=LICENSES.get(base),
                         pipeline_tag="text-to-image",
                         tags=["lora", "text-to-image", "diffusers", "stable-diffusion-xl", "consistency-distillation",
                               "cmdistill", (c.get("objective") or "cm").replace("_", "-")])
    n = int(c.get("num_discr_timesteps", 100))
    steps = c.get("num_inference_steps") or [1, 2, 4]
    k = max(s for s in steps if s <= n) if any(s <= n for s in steps) else 1
    base_ref = base or "<the teacher SDXL pipeline>"
    here = repo_id or _hub_id(c.get("hub_model_id")) or "<this repository or folder>"
    vae_line = (f'vae = AutoencoderKL.from_pretrained("{vae}", dtype=torch.float16)\n'
                if _hub_id(vae) else "")
    vae_arg = ", vae=vae" if vae_line else ""
    settings = [("objective", objective), ("teacher", base or "a local model folder"),
                ("VAE", _hub_id(vae) or ("the teacher's" if vae is None else "a local VAE")),
                ("solver", c.get("solver")), ("N (grid intervals)", n),
                ("w (teacher guidance, Imagen form)", c.get("w")), ("loss", c.get("loss_type")),
                ("training steps", c.get("max_train_steps")), ("global batch size", c.get("global_batch_size")),
                ("learning rate", c.get("learning_rate")), ("resolution", c.get("resolution")),
                ("LoRA rank / alpha", f"{c.get('lora_rank')} / {c.get('lora_alpha')}"),
                ("timestep scaling", c.get("timestep_scaling_factor")), ("seed", c.get("seed"))]
    table = "\n".join(f"| {k_} | {_fmt(v)} |" for k_, v in settings)
    body = f"""
# {objective} student of {base or 'an SDXL teacher'} (LoRA)

A LoRA for the SDXL UNet distilled with the {objective} objective of *Inconsistencies In Consistency Models:
Better ODE Solving Does Not Imply Better Samples* (Vouitsis et al.,
[arXiv 2411.08954](https://arxiv.org/abs/2411.08954)), trained with cmdistill, an open re-implementation of the
paper's training and evaluation. It samples in a few steps without guidance (guidance scale 0).

| setting | value |
|---|---|
{table}

## Usage

Multistep consistency sampling, as the paper evaluates it (K steps on the N = {n} grid of training), in the
stock diffusers pipeline with cmdistill's scheduler (`pip install -e .` in a cmdistill checkout; this run's
settings are in `scheduler/`):

```python
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from cmdistill.scheduler import MultistepConsistencyScheduler

{vae_line}pipe = StableDiffusionXLPipeline.from_pretrained("{base_ref}"{vae_arg}, dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{here}")
pipe.scheduler = MultistepConsistencyScheduler.from_pretrained("{here}", subfolder="scheduler")
image = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=0).images[0]
```

The same weights as a PEFT adapter, for the base model's UNet (without `load_lora_weights`):
`PeftModel.from_pretrained(unet, "{here}", subfolder="peft")`. The LoRA file carries its adapter metadata (rank, alpha, target modules), so
`load_lora_weights` rebuilds the trained scale.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}{_metrics_section(metrics or {})}")


def write_model_card(run_dir: str | Path, config: dict | None = None, repo_id: str | None = None) -> Path | None:
    """Write ``run_dir/README.md`` from ``training_config.json`` (or ``config``) and, when present,
    ``metrics.json``. Returns its path, or None for a folder that is not a training run."""
    run_dir = Path(run_dir)
    if config is None:
        path = run_dir / CONFIG_NAME
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
    metrics_path = run_dir / METRICS_NAME
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    card = model_card(redact(config), metrics, repo_id)
    atomic_write(run_dir / CARD_NAME, lambda tmp: card.save(str(tmp)))
    return run_dir / CARD_NAME


def update_model_card(run_dir: str | Path) -> Path | None:
    """Rewrite the model card of a training run with its evaluation results (``metrics.json``, written by
    test.py); a folder without ``training_config.json`` (e.g. a teacher's) is left alone."""
    return write_model_card(run_dir)


# --- command line ------------------------------------------------------------------------------------

@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cmdistill.hub", description="Model card and upload of a run.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("card", help="(re)write RUN_DIR/README.md from training_config.json and metrics.json")
    c.add_argument("run_dir")
    u = sub.add_parser("push", help="upload the final LoRA, its PEFT adapter, scheduler config and card")
    u.add_argument("run_dir")
    u.add_argument("--hub_model_id", default=None, help="default: the folder's name")
    u.add_argument("--hub_token", default=None, help="default: HF_TOKEN or `hf auth login`")
    u.add_argument("--hub_public", action="store_true", help="create a public repository (default: private)")
    u.add_argument("--push_logs", action="store_true", help="also upload train_log.jsonl and logs/")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise UserError(f"'{run_dir}' has no {CONFIG_NAME}: give a training run's --output_dir")
    if write_model_card(run_dir) and a.cmd == "card":
        print(run_dir / CARD_NAME)
    if a.cmd == "push":
        logging_dir = json.loads((run_dir / CONFIG_NAME).read_text()).get("logging_dir") or "logs"
        print(push_run(run_dir, a.hub_model_id, a.hub_token, a.hub_public, a.push_logs, logging_dir))


if __name__ == "__main__":
    main()
