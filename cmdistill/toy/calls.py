"""The program calls of a study on the toy world, shared by the demo (``cmdistill.demo``) and the toy sweep
(``cmdistill.toy.sweep``): the world's build, the precompute, the teacher references (``test_teacher.py``), a
training run (``train_cm.py`` / ``train_direct_cm.py``) and its evaluation (``test.py``), each with the arguments a
user would give the program; and the flags of the recipe that both studies take.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models import LORA_WEIGHT_NAME
from ..solvers import SOLVERS
from .build import world_paths
from .runner import Call

# Sampling and decoding batches of the evaluations: a VAE decode of 16 toy images at a time runs about twice as
# fast on a CPU as one of 100 (its activations stay in cache); the UNet is as fast at 100 as at more.
EVAL_BATCH, DECODE_BATCH = 100, 16


def recipe_parser() -> argparse.ArgumentParser:
    """The flags that the demo shares with the toy sweep: world, recipe, evaluation, workers."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("toy world and recipe")
    g.add_argument("--world", default="toy/world", help="toy world folder (built if missing)")
    g.add_argument("--reduced_world", action="store_true", help="build the small CI world if it must be built")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (spread of the table)")
    g.add_argument("--train_batch_size", type=int, default=16)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--lora_rank", type=int, default=16)
    g.add_argument("--num_discr_timesteps", type=int, default=10, help="N of the grid (paper: 100)")
    g.add_argument("--w", type=float, default=3.0, help="teacher guidance, Imagen form")
    g.add_argument("--solver", default="ddim", choices=list(SOLVERS))
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_prompts", type=int, default=256, help="captions of the evaluation")
    g.add_argument("--eval_seed", type=int, default=0, help="seed of the shared initial noise")
    g = p.add_argument_group("processes")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes running the programs side by side (default: one per core; 0: this "
                        "process, one program after the other)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads of each worker (each program's numbers depend on it, not on --workers)")
    g.add_argument("--checkpoint_every", type=_count, default=100,
                   help="training steps between a run's checkpoints (the latest two are kept; 0: none): a stopped "
                        "study resumes a run from its last one (checkpoints change no number; a resumed Direct CM "
                        "run matches an unbroken one up to rounding)")
    return p


def _count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 or more")
    return n


def world_call(a, log: Path) -> Call | None:
    """The build of the toy world, or None when its teacher, encoder and data are present (the build would
    skip every stage whose output is present with the same settings; the repository ships the trained teacher
    and encoder, the images are regenerated from the seed in seconds)."""
    P = world_paths(a.world)
    if all(p.exists() for p in (P["teacher"] / "model_index.json", P["encoder"], P["data"] / "metadata.csv")):
        return None
    return Call("-m cmdistill.toy", ["build", "--out", a.world, *(["--reduced"] if a.reduced_world else [])], log,
                "toy world build")


def _common(a, N: int, w: float) -> list:
    P = world_paths(a.world)
    return ["--pretrained_teacher_model", P["teacher"], "--train_data_dir", P["data"], "--resolution", 64,
            "--num_discr_timesteps", N, "--w", w, "--solver", a.solver]


def _metric_flags(a) -> list:
    return ["--dgm_metrics", "fd", "--dgm_models", "toy", "--instance_metrics", "toy_caption_acc",
            "--metrics_weights_dir", world_paths(a.world)["encoder"]]


def precompute_call(a, precomputed: Path, log: Path) -> Call:
    """Latents and text embeddings of the training set, once for every run (they depend on neither N nor w)."""
    return Call("-m cmdistill.precompute", [*_common(a, a.num_discr_timesteps, a.w)[:6], "--center_crop",
                                            "--mixed_precision", "no", "--precomputed_dir", precomputed], log,
                "precompute")


def teacher_call(a, tdir: Path, N: int, w: float, log: Path) -> Call:
    P = world_paths(a.world)
    return Call("test_teacher.py", ["--pretrained_teacher_model", P["teacher"], "--train_data_dir", P["data"],
                                    "--output_dir", tdir, "--resolution", 64, "--scheduler", a.solver,
                                    "--num_original_inference_steps", N, "--guidance_scale", w,
                                    "--max_prompts", a.num_prompts, "--seed", a.eval_seed, "--batch_size", EVAL_BATCH,
                                    "--vae_decode_batch_size", DECODE_BATCH, *_metric_flags(a)], log,
                f"teacher references N={N} w={w:g}")


def reference_folder(tdir: Path, N: int, w: float) -> Path:
    return Path(tdir) / "train_gen_images" / f"{N}_steps" / f"{float(w)}_gscale"


def train_call(a, rdir: Path, objective: str, seed: int, steps: int, N: int, w: float, precomputed: Path,
               log: Path) -> Call:
    return Call(f"train_{objective}.py", [
        *_common(a, N, w), "--output_dir", rdir, "--seed", seed, "--center_crop", "--train_batch_size",
        a.train_batch_size, "--max_train_steps", steps, "--learning_rate", a.learning_rate, "--lora_rank", a.lora_rank,
        "--lora_alpha", a.lora_rank, "--checkpointing_steps", min(steps, a.checkpoint_every),
        "--checkpoints_total_limit", 2, "--validation_steps", 0, "--mixed_precision", "no", "--precomputed_dir",
        precomputed, "--resume_from_checkpoint", "latest"], log,
        f"train_{objective}.py seed {seed}")


def trained(rdir: Path, steps: int) -> bool:
    """A finished run (final weights of its last step): reused as is, since resuming would save them again."""
    from ..evaluation.weights import final_step

    rdir = Path(rdir)
    return (rdir / LORA_WEIGHT_NAME).is_file() and (final_step(rdir) or 0) >= steps


def eval_call(a, rdir: Path, ref: Path, steps_list: list[int], log: Path) -> Call:
    return Call("test.py", ["--output_dir", rdir, "--train_data_dir", ref, "--num_inference_steps", *steps_list,
                            "--max_prompts", a.num_prompts, "--batch_size", EVAL_BATCH, "--vae_decode_batch_size",
                            DECODE_BATCH, *_metric_flags(a)], log, f"test.py {Path(rdir).name}")
