"""Precomputed VAE posteriors and text embeddings of the training set.

``python -m cmdistill.precompute`` (or ``scripts/precompute.sh``; the flags are the training flags that the
cached numbers depend on) encodes every
training image once (VAE posterior mean and std, at the crop the training run would take in its
first epoch) and every caption (both SDXL text embeddings and time_ids). Training finds the cache
by a key of everything the numbers depend on (teacher, VAE, revisions, resolution, crop policy and
seed, interpolation, dtype, the data) and then runs neither the VAE encoder nor the text encoders.
The posterior is sampled at training time from the same per-sample noise, so a run on the cache
computes what a run without it computes, except that a random crop is drawn once per image
instead of once per epoch (the paper's 250 x 16 samples see each of its 10,274 images at most once).
Written in atomic shards: an interrupted precompute resumes; several processes share the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from .files import atomic_write

logger = logging.getLogger("cmdistill")
CACHE_VERSION = 2  # 2: the data key covers the images' bytes, not their paths and sizes
SHARD_SIZE = 256
META = "meta.json"


SAMPLE_BYTES = 16 * 1024  # fingerprinted bytes at each end of an image file (the whole file when it is smaller)


def content_digest(path: str | None = None, data: bytes | None = None) -> str:
    """Size and a hash of an image's bytes: the whole file up to 2 x SAMPLE_BYTES, else its first and last
    SAMPLE_BYTES (an edit confined to the middle of a large file is not seen)."""
    h = hashlib.blake2b(digest_size=16)
    if data is not None:
        size = len(data)
        h.update(data if size <= 2 * SAMPLE_BYTES else data[:SAMPLE_BYTES] + data[-SAMPLE_BYTES:])
    else:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f.read(SAMPLE_BYTES if size > 2 * SAMPLE_BYTES else 2 * SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                f.seek(size - SAMPLE_BYTES)
                h.update(f.read(SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()}"


def data_fingerprint(ds, image_column: str, caption_column: str) -> str:
    """Hash of the captions and the images (their bytes: ``content_digest``) in order."""
    from .data import caption_text

    h = hashlib.sha256(str(len(ds)).encode())
    for row in ds.select_columns([image_column, caption_column]):
        img = row[image_column]
        if isinstance(img, dict) and img.get("bytes"):
            ident = content_digest(data=img["bytes"])
        elif isinstance(img, dict) and img.get("path") and os.path.isfile(img["path"]):
            ident = content_digest(img["path"])
        else:
            ident = str(img.get("path") if isinstance(img, dict) else img)
        h.update(ident.encode() + b"\0" + caption_text(row[caption_column]).encode() + b"\0")
    return h.hexdigest()


def cache_key(args, fingerprint: str, dtype: torch.dtype) -> dict:
    return {"version": CACHE_VERSION, "teacher": args.pretrained_teacher_model, "teacher_revision": args.teacher_revision,
            "vae": args.pretrained_vae_model_name_or_path, "revision": args.revision, "resolution": args.resolution,
            "interpolation": args.interpolation_type, "center_crop": args.center_crop,
            "crop_seed": None if args.center_crop else args.seed, "random_flip": args.random_flip,
            "dtype": str(dtype), "data": fingerprint}


def cache_dir_for(args, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(args.precomputed_dir) / digest


def shard_path(directory: Path, s: int) -> Path:
    return directory / f"shard-{s:05d}.safetensors"


class PrecomputedDataset(torch.utils.data.Dataset):
    """Items of the cache, addressed like ``data.SDXLImageCaptions`` by (epoch, index, position)."""

    def __init__(self, directory: Path, n: int):
        self.directory, self.n = directory, n
        self._open: dict = {}

    def __len__(self):
        return self.n

    def _row(self, index: int) -> dict:
        from safetensors import safe_open

        s, r = divmod(index, SHARD_SIZE)
        if s not in self._open:
            self._open = {s: safe_open(str(shard_path(self.directory, s)), framework="pt")}
        f = self._open[s]
        return {k: f.get_slice(k)[r : r + 1][0] for k in f.keys()}

    def __getitem__(self, key):
        _, index, position = key
        return {**self._row(index), "position": position, "skipped": 0}


def collate_precomputed(items):
    out = {k: torch.stack([i[k] for i in items]) for k in items[0] if k not in ("position", "skipped")}
    out["positions"] = [i["position"] for i in items]
    out["skipped"] = 0
    return out


def find_cache(args, dataset, dtype: torch.dtype):
    """The valid cache for this run, or None (with one log line saying how to make it)."""
    if getattr(args, "no_precomputed", False):
        return None
    key = cache_key(args, data_fingerprint(dataset.ds, args.image_column, args.caption_column), dtype)
    d = cache_dir_for(args, key)
    meta = d / META
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        logger.info("using precomputed latents and text embeddings from %s", d)
        return PrecomputedDataset(d, len(dataset))
    logger.info("no precomputed latents for this data/model/resolution/crop (run scripts/precompute.sh with the "
                "same flags to skip the VAE and text encoders in every step)")
    return None


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from . import models
    from .args import precompute_parser, training_parser, validate_args
    from .data import collate, count_long_captions, training_dataset
    from .errors import exit_on_user_error
    from .inputs import Encoders
    from .progress import quiet_libraries, track
    from .run_folder import check_run_inputs, write_json_atomic

    @exit_on_user_error
    def run():
        own = precompute_parser().parse_args(argv)
        # The loader's other settings stay at the training defaults (they do not touch the cached numbers); its
        # run folder is the cache folder.
        args = training_parser("cm").parse_args([])
        vars(args).update(vars(own), output_dir=own.precomputed_dir, report_to="none", no_precomputed=True)
        validate_args(args)
        check_run_inputs(args)
        acc = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        quiet_libraries()
        set_seed(args.seed)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        data = training_dataset(args, acc.is_main_process)
        teacher = models.load_teacher(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path,
                                      args.revision, args.teacher_revision, args.cache_dir, load_unet=False)
        if acc.is_main_process:
            count_long_captions(data.ds[args.caption_column], teacher.tokenizers[0])
        enc = Encoders.on_device(teacher, args, acc.device, dtype)  # as training places them
        key = cache_key(args, data_fingerprint(data.ds, args.image_column, args.caption_column), dtype)
        d = cache_dir_for(args, key)
        d.mkdir(parents=True, exist_ok=True)
        n = len(data)
        shards = [s for s in range(math.ceil(n / SHARD_SIZE)) if s % acc.num_processes == acc.process_index]
        todo = [s for s in shards if not shard_path(d, s).is_file()]
        for s in track(todo, "precompute shards", "shard", enabled=acc.is_local_main_process):
            keys = [(0, i, i) for i in range(s * SHARD_SIZE, min(n, (s + 1) * SHARD_SIZE))]
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, keys), collate_fn=collate,
                                                 batch_size=args.vae_encode_batch_size,
                                                 num_workers=args.dataloader_num_workers)
            parts = {"mean": [], "std": [], "prompt_embeds": [], "text_embeds": [], "time_ids": []}
            for batch in loader:
                mean, std = enc.posterior(batch["pixel_values"])
                cond = enc.conditioning(batch)
                for k, v in (("mean", mean), ("std", std), *cond.items()):
                    parts[k].append(v.to("cpu", dtype))
            from safetensors.torch import save_file

            shard = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            atomic_write(shard_path(d, s), lambda tmp: save_file(shard, str(tmp)))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(d / META, {"key": key, "num_samples": n, "shard_size": SHARD_SIZE})
            print(f"precomputed {n} samples in {d}")

    run()


if __name__ == "__main__":
    main()
