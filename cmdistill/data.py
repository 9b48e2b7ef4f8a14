"""Training data: LAION-Aesthetics image folders (``metadata.csv`` with ``file_name,text``), any
``datasets`` image folder or hub dataset with image/caption columns, and SDXL size/crop
conditioning (docs/method.md §1, §7).

The data stream is a pure function of (seed, position): position p is sample
``perm_{p // n}[p % n]`` of the epoch permutation seeded by (seed, epoch). Process r of P takes
positions ``b*P*B + r*B ... + B`` of global batch b. Resuming from ``samples_seen`` therefore
continues exactly where training stopped, on any number of processes; and since the training
step draws each sample's timestep and noise from (seed, position), P processes with batch B
compute the same global batch as one process with batch P*B.
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from .errors import UserError, one_line
from .noise import generator_for

logger = logging.getLogger(__name__)
MIN_IMAGE_SIDE = 8  # px: a smaller image is skipped like an unreadable one (and counted)
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def caption_text(value) -> str:
    """The caption of a data row, one rule for training and evaluation: a missing caption (an empty field of
    metadata.csv reads as None; NaN from pandas) is the empty string, never the text "None"."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value if isinstance(value, str) else str(value)


def check_image_folder(train_data_dir: str) -> None:
    """Before any model loads: ``--train_data_dir`` exists and has a metadata file, and a ``metadata.csv`` has
    the same number of fields on every row as in its header (an unquoted comma in a caption adds one)."""
    import csv

    if not os.path.isdir(train_data_dir):
        what = "is a file, not a folder" if os.path.exists(train_data_dir) else "does not exist"
        raise UserError(f"--train_data_dir '{train_data_dir}' {what} (get LAION-11k with "
                        "`bash scripts/get_laion_data.sh preprocessed_11k`)")
    found = [os.path.join(root, f) for root, _, files in os.walk(train_data_dir) for f in files
             if f in METADATA_FILES]
    if not found:
        raise UserError(f"--train_data_dir '{train_data_dir}' has no metadata.csv: write one with the header "
                        "file_name,text and one row per image")
    for path in found:
        if not path.endswith(".csv"):
            continue
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = csv.reader(f)
                header = next(rows, None)
                if not header or "file_name" not in header:
                    raise UserError(f"{path}: the first line must be the header file_name,text (found "
                                    f"{','.join(header or [])!r})")
                for row in rows:
                    if row and len(row) != len(header):
                        raise UserError(f"{path} line {rows.line_num}: {len(row)} fields where the header has "
                                        f"{len(header)}: put captions that contain commas in double quotes")
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{path} is not a readable UTF-8 CSV file ({one_line(e)})") from None


def empty_caption_note(captions, source=None) -> str | None:
    """One line counting the empty captions (blank after ``caption_text``) of ``source``, or None if there are
    none; training and evaluation alike keep them as empty prompts."""
    captions = list(captions)
    n = sum(1 for v in captions if not caption_text(v).strip())
    of = f" of {source}" if source else ""
    return f'{n} of {len(captions)} captions{of} are empty: they are kept as empty prompts ("")' if n else None


def count_long_captions(captions, tokenizer, at_most: int = 100_000) -> int:
    """Captions longer than the tokenizer's window (77 tokens for CLIP), which the text encoders truncate; said
    once in the log. Only the first ``at_most`` are tokenized."""
    limit = tokenizer.model_max_length
    captions = [caption_text(c) for _, c in zip(range(at_most), captions)]
    n = 0
    for i in range(0, len(captions), 1024):
        ids = tokenizer(captions[i : i + 1024], truncation=False, verbose=False)["input_ids"]
        n += sum(len(x) > limit for x in ids)
    if n:
        logger.warning("%d of %d captions are longer than %d tokens: truncated to %d, as SDXL's text encoders do",
                       n, len(captions), limit, limit)
    return n


def load_caption_dataset(train_data_dir=None, dataset_name=None, dataset_config_name=None, image_column="image",
                         caption_column="text", cache_dir=None, max_train_samples=None):
    """A ``datasets.Dataset`` with undecoded images (so that corrupt files can be skipped)."""
    import datasets

    if train_data_dir:
        check_image_folder(train_data_dir)
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split="train", cache_dir=cache_dir)
        except Exception as e:  # datasets raises many kinds here; all are input problems
            raise UserError(f"--train_data_dir '{train_data_dir}' is not a readable image folder with "
                            f"metadata.csv (file_name,text): {one_line(e)}") from None
    elif dataset_name:
        try:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, split="train", cache_dir=cache_dir)
        except Exception as e:
            raise UserError(f"--dataset_name {dataset_name}: cannot load it ({one_line(e, 160)}); offline? download "
                            "it where you have network, or pass --train_data_dir with an image folder + "
                            "metadata.csv") from None
    else:
        raise UserError("give --train_data_dir (an image folder with metadata.csv) or --dataset_name")
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in ds.column_names:
            raise UserError(f"{flag} '{col}' is not a column of the data set; its columns are: "
                            f"{', '.join(ds.column_names)}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    if max_train_samples is not None:
        ds = ds.select(range(min(max_train_samples, len(ds))))
    if len(ds) == 0:
        raise UserError("the training data set is empty")
    return ds


def open_image(value) -> Image.Image:
    """Decode an undecoded ``datasets`` image ({'bytes', 'path'}), a path or a PIL image to RGB."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        img = Image.open(value)
    img.load()
    return img.convert("RGB")


class SDXLImageCaptions(torch.utils.data.Dataset):
    """Resize (shorter side), crop, flip, normalise to [-1, 1], with SDXL micro-conditioning.

    Items are addressed by (epoch, index, position) so that crops and flips are deterministic per sample.
    A corrupt image is replaced by the next readable one; the item reports how many it skipped.
    """

    def __init__(self, ds, image_column="image", caption_column="text", resolution=1024,
                 interpolation="bilinear", center_crop=False, random_flip=False, seed=0):
        from torchvision.transforms import InterpolationMode

        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        try:
            self.interpolation = InterpolationMode[interpolation.upper()]
        except KeyError:
            raise UserError(f"--interpolation_type {interpolation!r}: choose one of "
                            f"{', '.join(m.name.lower() for m in InterpolationMode)}") from None

    def __len__(self):
        return len(self.ds)

    def _load(self, index):
        row = self.ds[index]
        img = open_image(row[self.image_column])
        if min(img.size) < MIN_IMAGE_SIDE:
            raise ValueError(f"the image is {img.width}x{img.height} px, under the {MIN_IMAGE_SIDE} px minimum")
        return img, caption_text(row[self.caption_column])

    def __getitem__(self, key):
        import torchvision.transforms.functional as TF

        epoch, index, position = key
        skipped = 0
        while True:
            try:
                img, caption = self._load(index)
                break
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                skipped += 1
                warnings.warn(f"skipping unreadable image #{index} ({one_line(e)})")
                if skipped >= len(self.ds):
                    raise UserError("no readable image in the training data (of at least "
                                    f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px)") from None
                index = (index + 1) % len(self.ds)
        res = self.resolution
        orig = (img.height, img.width)
        img = TF.resize(img, res, interpolation=self.interpolation)
        g = generator_for(self.seed, epoch, index, 7)
        if self.center_crop:
            top, left = max(0, round((img.height - res) / 2)), max(0, round((img.width - res) / 2))
        else:
            top = int(torch.randint(0, img.height - res + 1, (1,), generator=g))
            left = int(torch.randint(0, img.width - res + 1, (1,), generator=g))
        resized_width = img.width
        img = TF.crop(img, top, left, res, res)
        if self.random_flip and float(torch.rand((), generator=g)) < 0.5:
            img = TF.hflip(img)
            left = resized_width - left - res  # the crop's left edge in the mirrored image
        x = TF.normalize(TF.to_tensor(img), [0.5], [0.5])
        return {"pixel_values": x, "caption": caption, "original_size": orig, "crop_top_left": (top, left),
                "skipped": skipped, "position": position}


def collate(items):
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
            "captions": [i["caption"] for i in items],
            "original_sizes": [i["original_size"] for i in items],
            "crop_top_lefts": [i["crop_top_left"] for i in items],
            "skipped": sum(i["skipped"] for i in items),
            "positions": [i["position"] for i in items]}


class StreamBatchSampler(torch.utils.data.Sampler):
    """Infinite per-process batches of (epoch, index, position) keys from the seeded sample stream."""

    def __init__(self, n: int, batch_size: int, num_processes: int = 1, rank: int = 0, seed: int = 0,
                 start_position: int = 0):
        self.n, self.B, self.P, self.rank, self.seed = n, batch_size, num_processes, rank, seed
        self.start = start_position
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch):
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=generator_for(self.seed, epoch, 11))}
        return self._perm_cache[epoch]

    def key(self, position: int):
        epoch = position // self.n
        return epoch, int(self._perm(epoch)[position % self.n]), position

    def __iter__(self):
        pos = self.start
        while True:
            first = pos + self.rank * self.B
            yield [self.key(p) for p in range(first, first + self.B)]
            pos += self.P * self.B


def make_dataloader(dataset, batch_size, num_processes, rank, seed, start_position, num_workers, collate_fn=collate):
    sampler = StreamBatchSampler(len(dataset), batch_size, num_processes, rank, seed, start_position)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


def training_dataset(args, main_process: bool = True) -> SDXLImageCaptions:
    """The training data of the flags (``--train_data_dir`` / ``--dataset_name``, columns, resolution, crop, flip,
    seed); the main process says in the log how many captions are empty."""
    ds = load_caption_dataset(args.train_data_dir, args.dataset_name, args.dataset_config_name, args.image_column,
                              args.caption_column, args.cache_dir, args.max_train_samples)
    note = empty_caption_note(ds[args.caption_column]) if main_process else None
    if note:
        logger.warning(note)
    return SDXLImageCaptions(ds, args.image_column, args.caption_column, args.resolution, args.interpolation_type,
                             args.center_crop, args.random_flip, args.seed)
