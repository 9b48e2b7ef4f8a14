"""What an evaluation reads: captions, the shared initial noise (docs/method.md §8), real reference images (docs/method.md §9)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from ..data import caption_text  # one rule for training and evaluation: a missing caption is ""
from ..errors import UserError, one_line
from ..files import atomic_save_image, atomic_torch_save
from ..noise import per_sample_noise

METADATA_FILES = ("metadata.csv", "metadata.jsonl")


# ---------------------------------------------------------------------------------------------
# Captions


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metadata(data_dir: str | Path, caption_column: str = "text", image_column: str | None = None,
                  flag: str = "--train_data_dir") -> tuple[list[str], list[Path] | None]:
    """Captions (and image paths, if ``image_column``) of an image folder with ``metadata.csv``
    (columns ``file_name,text`` in the paper's ``preprocessed_11k``) or ``metadata.jsonl``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{flag}: folder '{data_dir}' does not exist")
    if not any((data_dir / m).is_file() for m in METADATA_FILES) and (data_dir / "train").is_dir():
        data_dir = data_dir / "train"  # a data set folder with its split inside (as datasets' imagefolder reads it)
    meta = next((data_dir / m for m in METADATA_FILES if (data_dir / m).is_file()), None)
    if meta is None:
        raise UserError(f"{flag} '{data_dir}' has no {' or '.join(METADATA_FILES)} (an image folder with "
                        "columns file_name,text is expected)")
    rows = _read_table(meta)
    columns = list(rows[0]) if rows else []
    for col, name in ((caption_column, "--caption_column"), (image_column, "--image_column")):
        if col is not None and col not in columns:
            raise UserError(f"{name} '{col}' is not a column of {meta} (columns: {', '.join(columns) or 'none'})")
    captions = [caption_text(r[caption_column]) for r in rows]
    images = [data_dir / r[image_column] for r in rows] if image_column else None
    return captions, images


def read_captions_file(path: str | Path) -> list[str]:
    """A captions file: one caption a line (the reference's ``data/train_captions.txt``) or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--captions_file: '{path}' does not exist")
    if path.suffix == ".json":
        captions = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(captions, list):
            raise UserError(f"--captions_file {path}: a JSON file must hold a list of captions")
        return [caption_text(c) for c in captions]
    return path.read_text(encoding="utf-8").splitlines()


def read_json(path: Path) -> dict:
    """A JSON object a program wrote (training_config.json, eval_config.json): {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is not readable JSON ({type(e).__name__}): restore it, or delete it and rerun "
                        "the program that wrote it") from None
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------
# Initial noise (docs/method.md §8: teacher and student start from the same noise per caption)


def model_defaults(model: str, vae: str | None = None, revision: str | None = None,
                   teacher_revision: str | None = None) -> tuple[int, int]:
    """(image size, number of train timesteps) of a pipeline, from its config files only. The size is
    the pipeline's default: the UNet's ``sample_size`` times the VAE's downsampling factor
    (2 ** (number of VAE blocks - 1)), what ``StableDiffusionXLPipeline`` samples without ``height``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ..models import resolve_model_path

    path = resolve_model_path(model, teacher_revision)
    vae_path = resolve_model_path(vae, revision, flag="--pretrained_vae_model_name_or_path") if vae else None
    try:
        unet = UNet2DConditionModel.load_config(path, subfolder="unet", revision=teacher_revision)
        vae_cfg = (AutoencoderKL.load_config(vae_path, revision=revision) if vae_path else
                   AutoencoderKL.load_config(path, subfolder="vae", revision=teacher_revision))
        sched = DDPMScheduler.load_config(path, subfolder="scheduler", revision=teacher_revision)
    except (OSError, ValueError) as e:
        raise UserError(f"--pretrained_teacher_model '{model}': cannot read its unet / vae / scheduler config "
                        f"({one_line(e)}): is it an SDXL pipeline folder or hub id?") from None
    size = unet.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * 2 ** (len(vae_cfg["block_out_channels"]) - 1), int(sched.get("num_train_timesteps", 1000))


def latent_shape(resolution: int) -> tuple[int, int, int]:
    if resolution % 8:
        raise UserError(f"--resolution {resolution} must be a multiple of 8 (the VAE downsamples by 8)")
    return (4, resolution // 8, resolution // 8)


class InitNoise:
    """x_T of caption i: row i of an ``init_noise.pt`` file, or ``per_sample_noise(seed, [i], shape)``.

    Either way a pure function of the caption index, whatever the batch size or process count.
    The file is memory-mapped, so each process reads only its own rows.
    """

    def __init__(self, seed: int, resolution: int, num_captions: int, path: str | None = None):
        self.seed, self.shape, self.path = seed, latent_shape(resolution), path
        self.table = None
        if path is None:
            return
        table = read_noise_file(path)
        if table.shape[0] != num_captions:
            raise UserError(f"--init_noise {path} has {table.shape[0]} rows but there are {num_captions} captions: "
                            f"make a matching file (scripts/make_init_noise.py --num_captions {num_captions}) "
                            "or evaluate the captions it was made for")
        if tuple(table.shape[1:]) != self.shape:
            raise UserError(f"--init_noise {path} holds noise of shape {tuple(table.shape[1:])} ("
                            f"{noise_resolution(table)} px) but --resolution {resolution} needs {self.shape}: drop "
                            f"--resolution (the file fixes the size) or make the file with scripts/make_init_noise.py "
                            f"--resolution {resolution}")
        self.table = table

    def digest(self) -> float:
        """Sum of |x_T| of caption 0: the same number for a file and the seeded noise it holds."""
        return round(float(self([0])[0].double().abs().sum()), 6)

    def __call__(self, indices) -> torch.Tensor:
        if self.table is None:
            return per_sample_noise(self.seed, indices, self.shape)
        return self.table[torch.as_tensor(list(indices), dtype=torch.long)].float()

    def fingerprint(self) -> dict:
        """Identifies the noise for the resume check, without reading a whole multi-GB file."""
        if self.table is None:
            return {"seed": self.seed, "init_noise": None}
        # The first row only: a file made for more captions (same seed) keeps earlier samples valid.
        return {"seed": self.seed, "init_noise": os.path.abspath(self.path),
                "init_noise_row0": round(float(self.table[0].double().abs().sum()), 6)}


def read_noise_file(path: str) -> torch.Tensor:
    """The tensor of an ``--init_noise`` file (memory-mapped when possible); a one-line error otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"--init_noise: '{path}' does not exist (make it with scripts/make_init_noise.py)")
    try:
        try:
            table = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise UserError(f"--init_noise {path} cannot be read ({type(e).__name__}): make it again with "
                        "scripts/make_init_noise.py") from None
    if not isinstance(table, torch.Tensor) or table.ndim != 4:
        raise UserError(f"--init_noise {path}: expected a tensor [num_captions, 4, H/8, W/8]")
    return table


def noise_resolution(table: torch.Tensor) -> int:
    """The image size that noise ``[n, 4, h, w]`` is for (square images, VAE factor 8)."""
    return int(table.shape[-1]) * 8


def make_init_noise(path: str | Path, num_captions: int, resolution: int, seed: int, chunk: int = 256) -> Path:
    """Write ``[num_captions, 4, H/8, W/8]`` float32 noise, row i = ``per_sample_noise(seed, [i], ...)``:
    a run with the file and a run without it then start from the same noise."""
    shape = latent_shape(resolution)
    table = torch.empty((num_captions, *shape), dtype=torch.float32)
    for a in range(0, num_captions, chunk):
        b = min(a + chunk, num_captions)
        table[a:b] = per_sample_noise(seed, range(a, b), shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(table, path)
    return path


# ---------------------------------------------------------------------------------------------
# Real reference images (docs/method.md §9: the teacher is scored against the real training images)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None if it is missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def prepare_reference_image(src: Path, dst: Path, resolution: int, write: bool = True) -> Path:
    """The real image as the generator sees the resolution: shorter side resized to ``resolution``
    (bilinear, as the training transform) and center-cropped to a square. Images already at that
    size are used where they lie; the others are written once to ``dst`` (PNG, atomically)."""
    from PIL import Image

    if image_size(src) == (resolution, resolution):
        return src
    if image_size(dst) == (resolution, resolution) or not write:
        return dst
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    atomic_save_image(im, dst)
    return dst
