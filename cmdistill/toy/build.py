"""Build the toy world into one folder, stage by stage, each stage skipped when already built.

    <out>/data/train/     PNGs + metadata.csv (file_name,text) + attributes.csv   (LAION-11k layout)
    <out>/data/holdout/   a second real sample of the same world (read beside the toy metrics)
    <out>/encoder/        the toy metric CNN (toy_encoder.safetensors + config.json)
    <out>/work/vae/       the trained AutoencoderKL (intermediate; also inside the teacher)
    <out>/teacher/        the SDXL pipeline folder: cmdistill.models.load_teacher(<out>/teacher)
    <out>/eval.json       toy metrics of the teacher (trained vs untrained, w = 1 vs w > 1)
    <out>/build.json      the resolved configuration and the time of every stage

Each stage writes into a temporary folder renamed into place when complete and records the
configuration it was built with (``stage.json``); a rerun skips the stages whose recorded
configuration matches and refuses to mix stages built with different ones. The repository
commits the expensive outputs of the default build (teacher, encoder, eval.json, build.json);
in a clone, ``build`` regenerates only the data (seconds, same bytes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_dir

STAGE_FILE = "stage.json"


@dataclass
class BuildConfig:
    seed: int = 0
    num_images: int = 4000          # training images (captions) of the world
    num_holdout: int = 500          # other real images, for the floors of the toy metrics
    resolution: int = 64            # 64 px -> 8 x 8 x 4 latents
    vae_steps: int = 1500
    vae_batch_size: int = 32
    encoder_steps: int = 600
    encoder_batch_size: int = 64
    teacher_steps: int = 6000
    batch_size: int = 64            # UNet batch
    lr: float = 1e-3                # UNet learning rate (cosine decay, EMA 0.999 of the weights is saved)
    threads: int = 2                # torch CPU threads (1 on a machine shared with other jobs: two OpenMP
                                    # threads competing for busy cores run these small networks far slower)
    device: str = "cpu"             # where the networks train ("cuda" for quick experiments; not deterministic
                                    # across devices, so not part of any stage's settings)
    eval_num: int = 500             # captions scored in eval.json (0: skip the evaluation)
    eval_steps: int = 50            # DDIM steps of the evaluation samples
    eval_ws: tuple = field(default=(1.0, 3.0, 9.0))

    # Which fields each stage depends on: a stage is rebuilt only when these differ.
    STAGES = {"data": ("seed", "num_images", "num_holdout", "resolution"),
              "encoder": ("seed", "num_images", "resolution", "encoder_steps", "encoder_batch_size"),
              "vae": ("seed", "num_images", "resolution", "vae_steps", "vae_batch_size"),
              "teacher": ("seed", "num_images", "resolution", "vae_steps", "vae_batch_size", "teacher_steps",
                          "batch_size", "lr"),
              "eval": ("seed", "num_images", "resolution", "vae_steps", "vae_batch_size", "teacher_steps",
                       "batch_size", "lr", "encoder_steps", "encoder_batch_size", "eval_num", "eval_steps",
                       "eval_ws")}

    def key(self, stage: str) -> dict:
        d = asdict(self)
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in self.STAGES[stage]}


def _done(path: Path, key: dict) -> bool:
    """True when ``path`` was built with ``key``; UserError when it was built with another."""
    marker = path / STAGE_FILE if path.is_dir() else path
    if not path.exists():
        return False
    if not marker.is_file():
        raise UserError(f"'{path}' exists but was not built by cmdistill.toy: remove it or choose another --out")
    got = json.loads(marker.read_text())
    got = got.get("key", got)
    if got != key:
        diff = {k: (got.get(k), v) for k, v in key.items() if got.get(k) != v}
        raise UserError(f"'{path}' was built with other settings (built, asked): {diff}; remove it or choose "
                        "another --out")
    return True


def _mark(directory: Path, key: dict, **extra) -> None:
    (directory / STAGE_FILE).write_text(json.dumps({"key": key, **extra}, indent=1))


def world_paths(out: str | Path) -> dict:
    out = Path(out)
    return {"data": out / "data" / "train", "holdout": out / "data" / "holdout", "encoder": out / "encoder",
            "vae": out / "work" / "vae", "teacher": out / "teacher", "eval": out / "eval.json",
            "build": out / "build.json"}


def build(out: str | Path, cfg: BuildConfig | None = None, log=print) -> dict:
    """Build (or complete) the toy world in ``out``; returns build.json's content."""
    from . import data as D
    from . import encoders as E
    from . import teacher as T

    cfg = cfg or BuildConfig()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    P = world_paths(out)
    record = json.loads(P["build"].read_text()) if P["build"].is_file() else {}
    record["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    times = record.setdefault("stage_seconds", {})
    t_all = time.time()

    def stage(name, path, fn):
        key = cfg.key(name)
        if _done(path, key):
            log(f"[{name}] present in {path}, skipped")
            return
        log(f"[{name}] building {path}")
        t0 = time.time()
        extra = fn() or {}
        times[name] = round(time.time() - t0, 1)
        record.setdefault("stage_info", {})[name] = extra
        log(f"[{name}] done in {times[name]:.1f} s")
        P["build"].write_text(json.dumps(record, indent=1))

    # 1. data ------------------------------------------------------------------------------
    def make_data():
        with atomic_dir(P["data"].parent) as tmp:
            D.write_dataset(tmp / "train", cfg.seed, cfg.num_images, cfg.resolution, split="train")
            D.write_dataset(tmp / "holdout", cfg.seed, cfg.num_holdout, cfg.resolution, split="holdout")
            _mark(tmp, cfg.key("data"))

    stage("data", P["data"].parent, make_data)

    cache = {}

    def train_set():
        if "train" not in cache:
            paths, caps, labels = D.read_dataset(P["data"])
            cache["train"] = (D.load_images(paths), caps, labels)
        return cache["train"]

    # 2. toy metric encoder ----------------------------------------------------------------
    def make_encoder():
        images, _, labels = train_set()
        model = E.train_encoder(images, labels, steps=cfg.encoder_steps, batch_size=cfg.encoder_batch_size,
                                seed=cfg.seed, resolution=cfg.resolution, device=cfg.device, log=log).cpu()
        hp, _, hl = D.read_dataset(P["holdout"])
        acc = E.attribute_accuracy(model, D.load_images(hp), hl)
        log(f"  encoder accuracy on held-out real images: {acc}")
        with atomic_dir(P["encoder"]) as tmp:
            E.save_encoder(model, tmp, {"holdout_accuracy": acc})
            _mark(tmp, cfg.key("encoder"))
        return {"holdout_accuracy": acc}

    stage("encoder", P["encoder"], make_encoder)

    # 3. VAE -------------------------------------------------------------------------------
    def make_vae():
        images, _, _ = train_set()
        vae = T.teacher_components(cfg.seed, cfg.resolution)["vae"].to(cfg.device)
        stats = T.train_vae(vae, images, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, seed=cfg.seed, log=log)
        vae.cpu()
        log(f"  {stats}")
        with atomic_dir(P["vae"]) as tmp:
            vae.save_pretrained(tmp)
            _mark(tmp, cfg.key("vae"), stats=stats)
        return stats

    if _done(P["teacher"], cfg.key("teacher")):
        log(f"[vae] inside the built teacher {P['teacher']}, skipped")   # e.g. a clone with the committed world
    else:
        stage("vae", P["vae"], make_vae)

    # 4. teacher UNet + pipeline -----------------------------------------------------------
    def make_teacher():
        from diffusers import AutoencoderKL

        from ..models import encode_prompts
        from ..tiny import save_pipeline

        images, caps, _ = train_set()
        comps = T.teacher_components(cfg.seed, cfg.resolution)
        comps["vae"] = AutoencoderKL.from_pretrained(P["vae"]).eval().to(cfg.device)
        toks = T.load_tokenizers(out / "work" / "tokenizer")
        pe, po = [], []
        for i in range(0, len(caps), 500):
            a, b = encode_prompts(caps[i:i + 500], toks, [comps["text_encoder"], comps["text_encoder_2"]])
            pe.append(a)
            po.append(b)
        mean, std = T.encode_posterior(comps["vae"], images)
        unet, stats = T.train_unet(comps["unet"].to(cfg.device), mean, std, torch.cat(pe), torch.cat(po),
                                   comps["vae"].config.scaling_factor, cfg.resolution, steps=cfg.teacher_steps,
                                   batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, log=log)
        comps["unet"], comps["vae"] = unet.cpu(), comps["vae"].cpu()
        with atomic_dir(P["teacher"]) as tmp:
            save_pipeline(tmp, comps)
            _mark(tmp, cfg.key("teacher"), stats=stats)
        return stats

    stage("teacher", P["teacher"], make_teacher)

    # 5. evidence: toy metrics of the trained vs the untrained teacher -----------------------
    def make_eval():
        from ..models import load_teacher
        from .evaluate import evaluate_teacher

        images, caps, _ = train_set()
        n = min(cfg.eval_num, len(caps))
        hp, hc, _ = D.read_dataset(P["holdout"])
        k = min(n, len(hc))
        teacher = load_teacher(str(P["teacher"]))
        teacher.unet.to(cfg.device)
        teacher.vae.to(cfg.device)
        untrained = T.teacher_components(cfg.seed, cfg.resolution)["unet"].to(cfg.device)
        res = evaluate_teacher(teacher, E.load_encoder(P["encoder"]), images[:n], caps[:n],
                               holdout=(D.load_images(hp[:k]), hc[:k]), ws=tuple(cfg.eval_ws),
                               N=cfg.eval_steps, seed=cfg.seed, resolution=cfg.resolution,
                               untrained_unet=untrained, log=log)
        res["key"] = cfg.key("eval")
        P["eval"].write_text(json.dumps(res, indent=1))

    if cfg.eval_num > 0:
        stage("eval", P["eval"], make_eval)

    record["total_seconds_this_run"] = round(time.time() - t_all, 1)
    P["build"].write_text(json.dumps(record, indent=1))
    return record
