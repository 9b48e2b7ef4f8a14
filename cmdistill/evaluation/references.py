"""The teacher references ``test.py`` scores a student against (a ``test_teacher.py`` sample folder,
.../train_gen_images/{N}_steps/{w}_gscale): the folder, whether its settings match the student's, and its
images and latents, all checked before any model loads.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..run_folder import CONFIG_NAME
from .inputs import InitNoise, image_size, latent_shape
from .store import image_complete


def teacher_folder(path: str | None) -> Path:
    """The folder of --train_data_dir, refused with the fix when it is not a sample folder."""
    if not path:
        raise UserError("--train_data_dir: give the teacher reference folder "
                        "(.../train_gen_images/{N}_steps/{w}_gscale written by test_teacher.py)")
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--train_data_dir: folder '{folder}' does not exist (run test_teacher.py first)")
    if not any(folder.glob("0.*")) and (folder / "train_gen_images").is_dir():
        found = sorted(str(p) for p in (folder / "train_gen_images").glob("*/*") if p.is_dir())
        raise UserError(f"--train_data_dir '{folder}' is a test_teacher.py output folder; pass one of its sample "
                        f"folders: {', '.join(found) or 'none yet'}")
    return folder


def teacher_format(folder: Path, identity: dict) -> str:
    """The file format of the teacher's samples: its config's, else that of its first image."""
    if identity:
        return identity.get("image_format", "png")  # folders written before the option held PNGs
    return "png" if (folder / "0.png").is_file() and not (folder / "0.jpg").is_file() else "jpg"


def check_teacher_images(image: Callable[[int], Path], count: int, resolution: int) -> None:
    """Images 0..count-1 (``image(i)``) present, complete and of the resolution; each is decoded once."""
    res = (resolution, resolution)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        ok = list(pool.map(lambda i: image_complete(image(i), res), range(count)))
    if not all(ok):
        bad = ok.index(False)
        p = image(bad)
        size = image_size(p)
        what = ("missing" if not p.is_file() else "unreadable" if size is None else
                f"{size[0]}x{size[1]} px, not {res[0]}x{res[1]}" if size != res else "truncated or corrupt")
        raise UserError(f"teacher image '{p}' is {what} (caption {bad} of {count}): complete the references with "
                        "test_teacher.py (it regenerates missing and broken images), or pass --max_prompts")


def check_teacher_latents(path: Path, count: int, resolution: int) -> None:
    """The references' latents.pt: rows for ``count`` captions of the resolution's latent shape."""
    tl = read_teacher_latents(path)
    if tuple(tl.shape[1:]) != latent_shape(resolution):
        raise UserError(f"{path} holds latents of shape {tuple(tl.shape[1:])}, not "
                        f"{latent_shape(resolution)} of --resolution {resolution}")
    if tl.shape[0] < count:
        raise UserError(f"{path} has {tl.shape[0]} rows for {count} captions (is its run unfinished?): "
                        "complete it with test_teacher.py, or pass --max_prompts")


def read_teacher_latents(path: Path) -> torch.Tensor:
    try:
        t = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise UserError(f"teacher latents '{path}' cannot be read ({type(e).__name__}: truncated or corrupt): delete "
                        "it and rerun test_teacher.py to regenerate the references") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        raise UserError(f"teacher latents '{path}' is not a [num_captions, 4, H/8, W/8] tensor: delete it and rerun "
                        "test_teacher.py to regenerate the references")
    return t


def reference_mismatches(t_id: dict, teacher_dir: Path, train_cfg: dict, args, init: InitNoise) -> list[str]:
    """The settings in which the teacher references differ from the student's: N (its training grid), w (its
    training guidance), resolution and initial noise; read from the references' eval_config.json (or, for a
    folder without one, N and w from its path .../{N}_steps/{w}_gscale)."""
    ref_N, ref_w, ref_res = t_id.get("num_steps"), t_id.get("guidance_scale"), t_id.get("resolution")
    if not t_id:
        m = re.search(r"(\d+)_steps/([0-9.]+)_gscale$", teacher_dir.resolve().as_posix())
        ref_N, ref_w = (int(m[1]), float(m[2])) if m else (None, None)
    src = f"the student's {CONFIG_NAME}" if train_cfg else "the student's flags"
    stu_N = train_cfg.get("num_discr_timesteps", args.num_original_inference_steps)
    stu_w = train_cfg.get("w")
    diffs = []
    if ref_N is not None and int(ref_N) != int(stu_N):
        diffs.append(f"N {ref_N} (references) vs {stu_N} ({src})")
    if ref_w is not None and stu_w is not None and float(ref_w) != float(stu_w):
        diffs.append(f"w {float(ref_w)} (references) vs {float(stu_w)} ({src})")
    if ref_res is not None and int(ref_res) != args.resolution:
        diffs.append(f"resolution {ref_res} (references) vs {args.resolution} (--resolution / --init_noise)")
    elif "seed" in t_id:
        ref_file = t_id.get("init_noise")
        ref = t_id.get("init_noise_row0") if ref_file else InitNoise(t_id["seed"], args.resolution, 1).digest()
        if ref is None or abs(float(ref) - init.digest()) > 1e-6 * max(1.0, abs(float(ref))):
            name = lambda f, s: f"--init_noise {f}" if f else f"seed {s}"  # noqa: E731
            diffs.append(f"initial noise {name(ref_file, t_id['seed'])} (references) vs "
                         f"{name(args.init_noise, args.seed)} (student)")
    return diffs
