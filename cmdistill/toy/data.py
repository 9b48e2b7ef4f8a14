"""The toy world's captioned images: one coloured shape on a plain background, drawn from a seed.

A stand-in for LAION-11k (docs/method.md §7) that the project generates itself: an image folder with
``metadata.csv`` (columns ``file_name,text``), plus ``attributes.csv`` beside it holding the
ground-truth attribute labels that the toy metrics need. Every image is a pure function of
(seed, split, index), so the set is reproducible byte for byte and any prefix of it is the
same whatever ``num_images`` is.

Caption grammar (each caption names shape, colour and position; size and background are left
out now and then, so that some attributes are free and guidance has something to decide):
``a [small|large] <colour> <shape> <position phrase>[ on a <background> background]``.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "purple": (140, 60, 190)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128)}
# 3 x 3 positions, row-major from the top left; the phrase each takes in a caption.
POSITIONS = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
             "left": "on the left", "center": "in the center", "right": "on the right",
             "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right"}
# Half-extent of the shape as a fraction of the image side: a large shape spans ~3 latent pixels
# (8x VAE), a small one ~2 -- smaller shapes come out of a small VAE as shapeless blobs.
SIZES = {"small": 0.11, "large": 0.19}
CENTRES = (0.25, 0.5, 0.75)                    # cell centres along each axis, inset so that shapes stay whole
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS), "size": tuple(SIZES),
              "background": tuple(BACKGROUNDS)}
P_OMIT = 0.15                                  # chance that a caption leaves out the size / the background
SUPERSAMPLE = 4                                # draw at 4x and box-filter down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """The attributes of one image, the jitter that makes images of one description differ, and
    which optional attributes its caption names."""

    shape: str
    colour: str
    position: str
    size: str
    background: str
    dx: float           # offset of the centre within its cell, in fractions of the image side
    dy: float
    scale: float        # multiplies the size's half-extent
    tint: tuple         # per-channel offset of the shape's colour (small, keeps the colour name true)
    name_size: bool
    name_background: bool

    def labels(self) -> dict:
        return {k: getattr(self, k) for k in ATTRIBUTES}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    key = hashlib.blake2b(f"{int(seed)}/{split}/{int(index)}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(key, "little"))


def sample_scene(seed: int, index: int, split: str = "train") -> Scene:
    """Scene ``index`` of ``split`` under ``seed``: attributes uniform and independent."""
    r = _rng(seed, split, index)
    pick = {k: v[int(r.integers(len(v)))] for k, v in ATTRIBUTES.items()}
    return Scene(**pick, dx=float(r.uniform(-0.02, 0.02)), dy=float(r.uniform(-0.02, 0.02)),
                 scale=float(r.uniform(0.9, 1.1)), tint=tuple(int(v) for v in r.integers(-15, 16, 3)),
                 name_size=bool(r.random() >= P_OMIT), name_background=bool(r.random() >= P_OMIT))


def caption(scene: Scene) -> str:
    size = f"{scene.size} " if scene.name_size else ""
    bg = f" on a {scene.background} background" if scene.name_background else ""
    return f"a {size}{scene.colour} {scene.shape} {POSITIONS[scene.position]}{bg}"


_POSITION_BY_PHRASE = {v: k for k, v in POSITIONS.items()}
_CAPTION_RE = re.compile(
    r"^a (?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes}) (?P<position>{positions})"
    r"(?: on a (?P<background>{backgrounds}) background)?$".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES),
        positions="|".join(sorted(map(re.escape, _POSITION_BY_PHRASE), key=len, reverse=True)),
        backgrounds="|".join(BACKGROUNDS)))


def parse_caption(text: str) -> dict:
    """The attributes a caption names, e.g. ``{"shape": "circle", "colour": "red", ...}``; attributes
    it leaves out are absent. Raises ValueError on a caption outside the toy grammar."""
    m = _CAPTION_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"not a toy-world caption: {text!r}")
    out = {k: v for k, v in m.groupdict().items() if v is not None}
    out["position"] = _POSITION_BY_PHRASE[out["position"]]
    return out


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` pixels a side."""
    S = resolution * SUPERSAMPLE
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    row, col = divmod(tuple(POSITIONS).index(scene.position), 3)
    cx, cy = (CENTRES[col] + scene.dx) * S, (CENTRES[row] + scene.dy) * S
    h = SIZES[scene.size] * scene.scale * S
    fill = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[scene.colour], scene.tint))
    if scene.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif scene.shape == "square":
        a = 0.85 * h                           # same area scale as the circle, roughly
        draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)], fill=fill)
    elif scene.shape == "cross":
        a = 0.35 * h
        draw.rectangle([cx - h, cy - a, cx + h, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - h, cx + a, cy + h], fill=fill)
    else:
        raise ValueError(scene.shape)
    return img.resize((resolution, resolution), Image.BOX)


def make_images(seed: int, num: int, resolution: int = 64, split: str = "train", start: int = 0):
    """``num`` scenes of ``split`` from ``start``: (uint8 array [num, H, W, 3], captions, scenes)."""
    scenes = [sample_scene(seed, start + i, split) for i in range(num)]
    arr = np.stack([np.asarray(render(s, resolution)) for s in scenes])
    return arr, [caption(s) for s in scenes], scenes


def write_dataset(directory: str | Path, seed: int = 0, num_images: int = 4000, resolution: int = 64,
                  split: str = "train") -> Path:
    """Write ``num_images`` PNGs, ``metadata.csv`` (``file_name,text``: the LAION-11k layout) and
    ``attributes.csv`` (``file_name`` + one column per attribute) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        scene = sample_scene(seed, i, split)
        name = f"{i:06d}.png"
        # Plain zlib PNG without metadata chunks: identical bytes for identical pixels.
        render(scene, resolution).save(directory / name, format="PNG", optimize=False, compress_level=6)
        rows.append((name, caption(scene), scene))
    with open(directory / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "text"])
        w.writerows((n, t) for n, t, _ in rows)
    with open(directory / "attributes.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", *ATTRIBUTES])
        w.writerows((n, *s.labels().values()) for n, _, s in rows)
    return directory


def read_dataset(directory: str | Path):
    """(file paths, captions, attribute dicts) of a folder written by :func:`write_dataset`."""
    directory = Path(directory)
    with open(directory / "metadata.csv", newline="", encoding="utf-8") as fh:
        meta = list(csv.DictReader(fh))
    labels = {}
    if (directory / "attributes.csv").is_file():
        with open(directory / "attributes.csv", newline="", encoding="utf-8") as fh:
            labels = {r.pop("file_name"): r for r in csv.DictReader(fh)}
    paths = [directory / r["file_name"] for r in meta]
    return paths, [r["text"] for r in meta], [labels.get(r["file_name"]) for r in meta]


def load_images(paths, resolution: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] from image files (resized, bilinear, when ``resolution`` is given)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BILINEAR)
            out.append(np.asarray(im))
    return np.stack(out)


def label_indices(labels: list[dict]) -> dict:
    """Attribute dicts -> {attribute: LongTensor-ready int array of class indices}."""
    return {k: np.array([ATTRIBUTES[k].index(lab[k]) for lab in labels]) for k in ATTRIBUTES}


__all__ = ["ATTRIBUTES", "Scene", "sample_scene", "caption", "parse_caption", "render", "make_images",
           "write_dataset", "read_dataset", "load_images", "label_indices"]
