"""A resumable folder of generated samples: ``{i}.jpg`` (or ``{i}.png``) and ``latents.pt`` (row i = caption i).

Images are saved as the paper's scripts save them: ``PIL.Image.save("{i}.jpg")``, i.e. JPEG at PIL's
default quality 75; PNG on request. Every batch is written atomically: its images first, then one
shard file with its latent rows (and the features of the in-memory images that the instance metrics
need), which commits the batch. A caption counts as done when its latent row exists and its image
decodes completely at the right size, so a rerun after a crash, a truncated file or with more
captions does only what is left. At the end the main process merges the shards into ``latents.pt``
(and ``instance_features.pt``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_save_image, atomic_torch_save, atomic_write_text

EVAL_CONFIG_NAME = "eval_config.json"
LATENTS_NAME = "latents.pt"
CAPTIONS_NAME = "captions.json"
FEATURES_NAME = "instance_features.pt"
IMAGE_FORMATS = ("jpg", "png")
# Identity keys added after samples were first written, with the value those older samples had.
LEGACY_IDENTITY = {"image_format": "png"}


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise UserError(f"'{path}' cannot be read ({type(e).__name__}: truncated or corrupt): delete it and rerun "
                        "to regenerate its samples (or pass --overwrite)") from None


def image_complete(path: Path, size: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` decodes completely (a truncated or corrupt file does not), at ``size`` if given."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if size is not None and im.size != tuple(size):
                return False
            im.load()  # decodes every byte: PIL raises on a truncated file (LOAD_TRUNCATED_IMAGES is off)
        return True
    except (OSError, ValueError, SyntaxError):
        return False


class SampleStore:
    def __init__(self, folder: str | Path, resolution: int, image_format: str = "jpg"):
        if image_format not in IMAGE_FORMATS:
            raise UserError(f"--image_format {image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}")
        self.folder = Path(folder)
        self.shard_dir = self.folder / "shards"
        self.resolution = resolution
        self.image_format = image_format

    def image_path(self, i: int) -> Path:
        return self.folder / f"{i}.{self.image_format}"

    # -- the resume check ----------------------------------------------------------------------

    def check_config(self, identity: dict, captions: list[str], overwrite: bool) -> bool:
        """Whether existing samples must be cleared before generating: ``overwrite`` was asked.
        Samples made with other settings, or for other captions at the same indices, are an error
        unless ``overwrite``; more captions than before are fine. Reads only, so every process agrees."""
        if not self.has_samples():
            return False
        if overwrite:
            return True
        path = self.folder / EVAL_CONFIG_NAME
        old = json.loads(path.read_text())["identity"] if path.is_file() else {}
        old = {**{k: v for k, v in LEGACY_IDENTITY.items() if old}, **old}
        new = json.loads(json.dumps(identity))
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        cpath = self.folder / CAPTIONS_NAME
        old_caps = json.loads(cpath.read_text()) if cpath.is_file() else []
        changed = next((i for i, (a, b) in enumerate(zip(old_caps, captions)) if a != b), None)
        if changed is not None:
            diff.append(f"caption {changed}: {old_caps[changed][:40]!r} -> {captions[changed][:40]!r}")
        if diff:
            keep = f" (or --image_format {old['image_format']} to keep them)" if old.get("image_format") != \
                new.get("image_format") else ""
            raise UserError(f"'{self.folder}' holds samples made with other settings ({'; '.join(diff[:3])}): pass "
                            f"--overwrite to regenerate them{keep}, or choose another --output_dir")
        return False

    def has_samples(self) -> bool:
        return (self.folder / LATENTS_NAME).is_file() or any(self.shard_dir.glob("*.pt"))

    def reset(self) -> None:
        """Main process: delete the samples (images, latents, shards)."""
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        for p in self.folder.iterdir():
            if p.suffix in (".png", ".jpg", ".pt") or p.name.endswith(".tmp"):
                p.unlink()

    def write_config(self, config: dict, captions: list[str]) -> None:
        """Main process: the run's resolved configuration and its captions, beside the samples."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / EVAL_CONFIG_NAME, json.dumps(config, indent=2, default=str) + "\n")
        atomic_write_text(self.folder / CAPTIONS_NAME, json.dumps(captions, ensure_ascii=False) + "\n")

    def stored_indices(self) -> set[int]:
        """Indices with a latent row in ``latents.pt`` or a shard (memory-mapped: rows are not read)."""
        done: set[int] = set()
        if (self.folder / LATENTS_NAME).is_file():
            done.update(range(len(_load(self.folder / LATENTS_NAME))))
        for f in self.shard_dir.glob("*.pt"):
            done.update(_load(f)["indices"].tolist())
        return done

    def done(self, indices) -> set[int]:
        """Of ``indices``, those whose latent row AND image (complete, at the right size) are written."""
        from concurrent.futures import ThreadPoolExecutor

        stored = self.stored_indices()
        res = (self.resolution, self.resolution)
        candidates = [i for i in indices if i in stored]
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
            ok = pool.map(lambda i: image_complete(self.image_path(i), res), candidates)
            return {i for i, good in zip(candidates, ok) if good}

    # -- writing ---------------------------------------------------------------------------------

    def write_batch(self, indices: list[int], latents: torch.Tensor, images, features: dict | None = None) -> None:
        """Images first, then the shard that commits them (each file written atomically). ``features``:
        ``{extractor: {"identity": str, "features": [B, D]}}`` of the in-memory images."""
        for i, im in zip(indices, images):
            atomic_save_image(im, self.image_path(i))
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        shard = self.shard_dir / f"{indices[0]:07d}-{uuid.uuid4().hex[:8]}.pt"
        feats = {k: {"identity": v["identity"], "features": torch.as_tensor(v["features"]).float()}
                 for k, v in (features or {}).items()}
        atomic_torch_save({"indices": torch.tensor(indices), "latents": latents.detach().float().cpu(),
                           "features": feats}, shard)

    def merge(self) -> int:
        """Main process: fold the shards into ``latents.pt`` (its longest complete prefix of rows);
        returns the number of rows. Shards whose rows all landed there are deleted."""
        path = self.folder / LATENTS_NAME
        rows: dict[int, torch.Tensor] = {}
        if path.is_file():
            old = _load(path)
            rows.update(enumerate(old))
        shards = sorted(self.shard_dir.glob("*.pt"))
        feats = self.instance_features() if shards else {}
        for f in shards:
            d = _load(f)
            rows.update(zip(d["indices"].tolist(), d["latents"]))
            for name, v in d.get("features", {}).items():
                if feats.get(name, {}).get("identity") != v["identity"]:
                    feats[name] = {"identity": v["identity"], "rows": {}}
                feats[name]["rows"].update(zip(d["indices"].tolist(), v["features"]))
        n = 0
        while n in rows:
            n += 1
        if shards and n:
            atomic_torch_save(torch.stack([rows[i] for i in range(n)]).float().contiguous(), path)
        if feats:
            atomic_torch_save({name: {"identity": v["identity"], "indices": torch.tensor(sorted(v["rows"])),
                                      "features": torch.stack([v["rows"][i] for i in sorted(v["rows"])])}
                               for name, v in feats.items() if v["rows"]}, self.folder / FEATURES_NAME)
        for f in shards:
            if max(_load(f)["indices"].tolist()) < n:
                f.unlink()
        if self.shard_dir.is_dir() and not any(self.shard_dir.iterdir()):
            self.shard_dir.rmdir()
        return n

    def instance_features(self) -> dict:
        """``{extractor: {"identity": str, "rows": {index: features}}}`` of the merged ``instance_features.pt``."""
        path = self.folder / FEATURES_NAME
        if not path.is_file():
            return {}
        return {name: {"identity": v["identity"], "rows": dict(zip(v["indices"].tolist(), v["features"]))}
                for name, v in _load(path).items()}

    def latents(self, count: int) -> torch.Tensor:
        """Rows 0..count-1 of the merged ``latents.pt``."""
        return _load(self.folder / LATENTS_NAME)[:count].float()
