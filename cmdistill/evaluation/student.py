"""``test.py``: a training run's student samples (docs/method.md §8: multistep consistency sampling with its LoRA)
from the teacher's noise, scored against the teacher's samples (docs/method.md §9). ``--checkpoints`` evaluates
several sets of weights of the run, each logged at its training step.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import results
from ..data import empty_caption_note
from ..errors import UserError, exit_on_user_error
from ..files import sha256
from ..models import DEFAULT_LORA_TARGETS, LORA_WEIGHT_NAME, SDXL_BASE, add_lora, load_lora_into
from ..run_folder import CONFIG_NAME
from ..schedule import check_sampling_steps
from ..trackers import check_trackers
from . import scoring
from .driver import Job, process_state, quality, resolved_config, run_jobs
from .flags import absolute, caption_count, check_compile_flags, common_parser, resolve_size_and_grid, warn
from .generate import student_sampler
from .inputs import InitNoise, read_captions_file, read_json
from .references import (check_teacher_images, check_teacher_latents, read_teacher_latents, reference_mismatches,
                         teacher_folder, teacher_format)
from .store import CAPTIONS_NAME, EVAL_CONFIG_NAME, LATENTS_NAME, SampleStore
from .weights import check_lora_file, resolve_lora, select_checkpoints, weights_step


def student_parser() -> argparse.ArgumentParser:
    p = common_parser("Student samples: multistep consistency sampling with the LoRA of a training run, from the "
                      "teacher's noise, scored against the teacher's samples.",
                      "the training run's folder (required): it holds the LoRA; the samples and results go there too",
                      student=True)
    g = p.add_argument_group("student sampling")
    g.add_argument("--train_data_dir", default=None,
                   help="the teacher reference folder, .../train_gen_images/{N}_steps/{w}_gscale of "
                        "test_teacher.py (required)")
    g.add_argument("--allow_reference_mismatch", action="store_true",
                   help="score against references made with another N, w, resolution or noise than the student "
                        "(a warning instead of an error)")
    g.add_argument("--lora_weights", default="auto",
                   help="'auto' (final weights, else the latest checkpoint), 'final', 'latest', a checkpoint-* "
                        "name or a folder")
    g.add_argument("--checkpoints", default=None,
                   help="evaluate weights over training instead of --lora_weights: 'all' (every checkpoint-<step> "
                        "and the final weights, the run's last step), 'latest' (the last step's weights) or "
                        "training steps 'N,M'; each is logged at its training step (metrics/<metric>/<K>_steps), "
                        "and a rerun skips those already evaluated")
    g.add_argument("--lora_scale", type=float, default=1.0, help="multiplier of the LoRA update")
    g.add_argument("--fuse_lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the LoRA into the UNet weights (faster; as the reference)")
    g.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="numbers of consistency sampling steps, each evaluated")
    g.add_argument("--num_original_inference_steps", type=int, default=None,
                   help="grid size N (default: training_config.json's num_discr_timesteps, else the references')")
    g.add_argument("--timestep_scaling_factor", type=float, default=None,
                   help="boundary-condition scaling (default: training_config.json's, else 10)")
    g.add_argument("--lora_rank", type=int, default=None, help="LoRA rank (default: training_config.json's, else 64)")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha (default: training_config.json's, else 64)")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="modules with LoRA adapters (default: training_config.json's, else the training default)")
    g.add_argument("--guidance_scale", type=float, default=0.0, help="must be 0: the student is never guided")
    return p


@exit_on_user_error
def student_main(argv=None) -> list[dict]:
    args = student_parser().parse_args(argv)
    check_compile_flags(args)
    if args.output_dir is None:
        raise UserError("--output_dir: give the training run's output folder (it holds the LoRA)")
    out = Path(args.output_dir)
    check_trackers(args.report_to)
    if args.checkpoints:
        selected = select_checkpoints(out, args.checkpoints)
    else:
        lora_dir, weights = resolve_lora(out, args.lora_weights)
        selected = [(lora_dir, weights, weights_step(out, weights))]
    lora_dir = selected[-1][0]
    if args.guidance_scale != 0:
        raise UserError("--guidance_scale must be 0: the student samples unguided")
    teacher_dir = teacher_folder(args.train_data_dir)
    notes = []  # warnings, printed once the inputs are known to be valid
    train_cfg = read_json(lora_dir / CONFIG_NAME) or read_json(out / CONFIG_NAME)
    if not train_cfg:
        notes.append(f"no {CONFIG_NAME} in '{out}': LoRA and grid settings fall back to flags and paper defaults")
    t_cfg = read_json(teacher_dir / EVAL_CONFIG_NAME)
    t_args, t_id = t_cfg.get("args", {}), t_cfg.get("identity", {})
    if not t_id:
        notes.append(f"no {EVAL_CONFIG_NAME} in the teacher folder '{teacher_dir}': its resolution and noise cannot be "
                     "checked against the student's")

    # Defaults: flag > training config > the teacher folder's config > paper.
    def pick(flag, train_key, teacher_key, default):
        for v in (flag, train_cfg.get(train_key), t_args.get(teacher_key) if teacher_key else None):
            if v is not None:
                return v
        return default

    args.pretrained_teacher_model = pick(args.pretrained_teacher_model, "pretrained_teacher_model",
                                         "pretrained_teacher_model", SDXL_BASE)
    args.pretrained_vae_model_name_or_path = pick(args.pretrained_vae_model_name_or_path,
                                                  "pretrained_vae_model_name_or_path",
                                                  "pretrained_vae_model_name_or_path", None)
    n_from = ("--num_original_inference_steps" if args.num_original_inference_steps is not None else
              f"num_discr_timesteps of {CONFIG_NAME}" if "num_discr_timesteps" in train_cfg else
              "--num_original_inference_steps (the references' N)")
    N = int(pick(args.num_original_inference_steps, "num_discr_timesteps", "num_original_inference_steps", 100))
    args.num_original_inference_steps = N  # eval_config.json records the resolved flags
    args.timestep_scaling_factor = float(pick(args.timestep_scaling_factor, "timestep_scaling_factor", None, 10.0))
    args.lora_rank = int(pick(args.lora_rank, "lora_rank", None, 64))
    args.lora_alpha = float(pick(args.lora_alpha, "lora_alpha", None, 64))
    args.lora_target_modules = list(pick(args.lora_target_modules, "lora_target_modules", None, DEFAULT_LORA_TARGETS))
    # The noise and the resolution default to the references' (a one-to-one comparison needs the same);
    # a noise file given here fixes the resolution itself.
    if args.resolution is None and args.init_noise is None:
        args.resolution = t_id.get("resolution", t_args.get("resolution"))
    for key in ("seed", "init_noise"):
        if getattr(args, key) is None:
            setattr(args, key, t_id.get(key, t_args.get(key)))
    args.seed = 24 if args.seed is None else args.seed
    args.init_noise = absolute(args.init_noise)
    resolve_size_and_grid(args, N, n_from)

    if args.captions_file:
        captions = read_captions_file(args.captions_file)
    elif (teacher_dir / CAPTIONS_NAME).is_file():
        captions = json.loads((teacher_dir / CAPTIONS_NAME).read_text(encoding="utf-8"))
    else:
        raise UserError(f"no {CAPTIONS_NAME} in the teacher folder '{teacher_dir}': pass the captions it was "
                        "generated from with --captions_file")
    count = caption_count(args, captions)
    notes.append(empty_caption_note(captions[:count], teacher_dir / CAPTIONS_NAME))
    init = InitNoise(args.seed, args.resolution, len(captions), args.init_noise)

    diffs = reference_mismatches(t_id, teacher_dir, train_cfg, args, init)
    if diffs:
        fix = (f"test_teacher.py --num_original_inference_steps {train_cfg.get('num_discr_timesteps', N)}"
               + (f" --guidance_scale {float(train_cfg['w'])}" if "w" in train_cfg else "")
               + f" --resolution {args.resolution}"
               + (f" --init_noise {args.init_noise}" if args.init_noise else f" --seed {args.seed}"))
        msg = f"the teacher references '{teacher_dir}' do not match this student: {'; '.join(diffs)}"
        if not args.allow_reference_mismatch:
            raise UserError(f"{msg}: pass references made with the student's settings ({fix}) as --train_data_dir, "
                            "or add --allow_reference_mismatch to score anyway")
        notes.append(f"{msg} (--allow_reference_mismatch)")
    # The teacher's samples: images are required (each decoded once here), latents.pt only for the ODE error.
    t_fmt = teacher_format(teacher_dir, t_id)

    def teacher_image(i: int) -> Path:
        return teacher_dir / f"{i}.{t_fmt}"

    check_teacher_images(teacher_image, count, args.resolution)
    t_latents = teacher_dir / LATENTS_NAME
    if t_latents.is_file():
        check_teacher_latents(t_latents, count, args.resolution)
    else:
        notes.append(f"no {LATENTS_NAME} in the teacher folder '{teacher_dir}': the ODE solving error is skipped")
    for K in args.num_inference_steps:
        check_sampling_steps(K, N)
    for d, _, _ in selected:
        check_lora_file(d / LORA_WEIGHT_NAME)
    state = process_state()
    for note in notes if state.is_main_process else []:
        if note:
            warn(note)

    c = args.timestep_scaling_factor

    def score_fn(store):
        def score(n):
            ref = [teacher_image(i) for i in range(n)]
            metrics = scoring.pixel_errors([store.image_path(i) for i in range(n)], ref)
            if t_latents.is_file():
                metrics["ode_error"] = scoring.ode_error(store.latents(n), read_teacher_latents(t_latents)[:n])
            # Teacher-image features are cached beside them, for every student scored against them.
            cache = args.metrics_cache_dir or (teacher_dir / "metrics_cache" if os.access(teacher_dir, os.W_OK)
                                               else out / "metrics_cache")
            return {**quality(args, store, ref, captions[:n], n, state.device, cache), **metrics}
        return score

    def attach_lora_fn(lora_dir):
        def attach_lora(unet):
            add_lora(unet, args.lora_rank, args.lora_alpha, 0.0, args.lora_target_modules)
            load_lora_into(unet, lora_dir)
            if args.lora_scale != 1.0:
                unet.set_adapters(["default"], weights=[args.lora_scale])
            if args.fuse_lora:
                unet.fuse_lora()  # merges at the scale set above
        return attach_lora

    jobs = []
    recorded = results.load(out)
    for lora_dir, weights, train_step in selected:
        jobs += student_jobs(args, state, out, lora_dir, weights, train_step, N, c, init, train_cfg, teacher_dir,
                             teacher_image, score_fn, attach_lora_fn(lora_dir), recorded, count)
    if not jobs:
        if state.is_main_process:
            print(f"every selected checkpoint of '{out}' is evaluated already: nothing to do (see "
                  f"{out / results.METRICS_NAME})", flush=True)
        state.destroy_process_group()
        return []
    return run_jobs(args, state, jobs, captions, count, init)


def student_jobs(args, state, out, lora_dir, weights, train_step, N, c, init, train_cfg, teacher_dir, teacher_image,
                 score_fn, attach, recorded, count) -> list[Job]:
    """The jobs of one set of weights, one per number of sampling steps; with --checkpoints, none for a
    setting that metrics.json records for the same weights, captions and references (a rerun skips it)."""
    tag = weights + ("" if args.lora_scale == 1.0 else f"_lora{args.lora_scale}")
    # N under the names its readers know: the samples' identity (eval_config.json) as training_config.json names
    # it, the metrics.json row as the flag (results, summary and the toy study read that column).
    base_identity = {"kind": "student", "model": args.pretrained_teacher_model,
                     "vae": args.pretrained_vae_model_name_or_path, "revision": args.revision,
                     "teacher_revision": args.teacher_revision, "lora_sha256": sha256(lora_dir / LORA_WEIGHT_NAME),
                     "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                     "lora_target_modules": args.lora_target_modules, "lora_scale": args.lora_scale,
                     "fuse_lora": args.fuse_lora, "num_discr_timesteps": N, "timestep_scaling_factor": c,
                     "resolution": args.resolution, "weight_dtype": args.weight_dtype,
                     "image_format": args.image_format, **init.fingerprint()}

    jobs = []
    for K in dict.fromkeys(args.num_inference_steps):
        store = SampleStore(out / "train_gen_images" / tag / f"{K}_steps", args.resolution, args.image_format)
        identity = {**base_identity, "num_inference_steps": K}
        jobs.append(Job(
            store=store, identity=identity,
            config=resolved_config(args, identity, state, lora_folder=str(lora_dir.resolve()),
                                    teacher_folder=str(teacher_dir.resolve())),
            desc=f"student {tag} K={K}", setting=f"student/{tag}/{K}_steps",
            row={"kind": "student", "method": train_cfg.get("objective"), "weights": weights,
                 "training_step": train_step, "lora_sha256": identity["lora_sha256"],
                 "lora_scale": args.lora_scale, "num_inference_steps": K, "num_original_inference_steps": N,
                 "timestep_scaling_factor": c, "resolution": args.resolution, "seed": args.seed,
                 "image_format": args.image_format, "teacher_folder": str(teacher_dir)},
            tb_group=f"student_{tag}", tb_step=K, attach=attach, train_step=train_step,
            unet_calls=K,
            make_sampler=lambda m, K=K: student_sampler(m, N, K, args.seed, c, args.compile == "on",
                                                        channels_last=args.compile_channels_last),
            score=score_fn(store),
            grid=lambda n, store=store: [[teacher_image(i) for i in range(min(n, args.num_log_images))],
                                         [store.image_path(i) for i in range(min(n, args.num_log_images))]]))

    if args.checkpoints and not args.overwrite:
        def finished(job):
            r = recorded.get(job.setting, {})
            return (r.get("lora_sha256") == job.identity["lora_sha256"] and r.get("num_images") == count
                    and r.get("teacher_folder") == str(teacher_dir) and r.get("seed") == args.seed
                    and job.store.folder.is_dir() and len(job.store.done(range(count))) == count)
        done = [j for j in jobs if finished(j)]
        if done and state.is_main_process:
            print(f"{weights}: {len(done)} of {len(jobs)} settings already evaluated, skipped", flush=True)
        jobs = [j for j in jobs if not any(j is d for d in done)]
    return jobs
