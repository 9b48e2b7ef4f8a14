"""The evaluation (docs/method.md §8-§9) on the tiny offline pipeline, on the CPU.

The samplers are checked against straightforward float64 re-implementations of docs/method.md §4, §5 and §8
written here; the programs end to end (files, resume, sharding over two processes, bad input).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cmdistill import results
from cmdistill.evaluation.init_noise import init_noise_main
from cmdistill.evaluation.student import student_main
from cmdistill.evaluation.teacher import teacher_main
from cmdistill.evaluation.weights import resolve_lora
from cmdistill.evaluation.generate import conditioning, load_models, student_sampler, teacher_sampler
from cmdistill.evaluation.inputs import InitNoise
from cmdistill.models import DEFAULT_LORA_TARGETS, add_lora, encode_prompts, load_teacher, save_lora
from cmdistill.noise import per_sample_noise

from conftest import ROOT, TINY_CAPTIONS, free_port

RES, N, W, SEED = 64, 10, 3.0, 24
SHAPE = (4, RES // 8, RES // 8)
NO_METRICS = ["--dgm_metrics", "none", "--instance_metrics", "none"]
SAMPLES = Path("train_gen_images") / f"{N}_steps" / f"{W}_gscale"


# ---------------------------------------------------------------------------------------------
# Independent float64 reference samplers (docs/method.md §2-§5, §8)

BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
ACP = torch.cumprod(1 - BETAS, 0)


def alpha(t):
    return 1.0 if t == 0 else float(ACP[t - 1].sqrt())


def sigma(t):
    return 0.0 if t == 0 else float((1 - ACP[t - 1]).sqrt())


def beta(t):
    return 1000 * float(BETAS[t - 1])


def sdxl_cond(models, captions):
    pe, pooled = encode_prompts(captions, models.tokenizers, models.text_encoders)
    return pe, pooled, torch.tensor([[RES, RES, 0, 0, RES, RES]] * len(captions), dtype=torch.float32)


@torch.no_grad()
def unet_eps(unet, x, t, pe, pooled, tid):
    out = unet(x.float(), torch.full((x.shape[0],), t), encoder_hidden_states=pe,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": tid})
    return out.sample.double()


def reference_teacher(unet, cond, x, solver, n, w):
    """A plain loop over t = T, T-k, ..., k with Imagen CFG against zero embeddings."""
    pe, pooled, tid = cond

    def eps(x, t):
        c = unet_eps(unet, x, t, pe, pooled, tid)
        u = unet_eps(unet, x, t, torch.zeros_like(pe), torch.zeros_like(pooled), tid)
        return u + w * (c - u)

    k, x = 1000 // n, x.double()
    for t in range(1000, 0, -k):
        s = t - k
        e = eps(x, t)
        if solver == "ddim":
            x = alpha(s) * (x - sigma(t) * e) / alpha(t) + sigma(s) * e
            continue
        f = -0.5 * beta(t) * x + 0.5 * beta(t) / sigma(t) * e
        x_pred = x + (s - t) / 1000 * f
        if solver == "euler":
            x = x_pred
        else:  # heun, with the coefficients of timestep value 1 at s = 0
            e_s, c = eps(x_pred, s), max(s, 1)
            f_s = -0.5 * beta(c) * x_pred + 0.5 * beta(c) / sigma(c) * e_s
            x = x + 0.5 * (s - t) / 1000 * (f + f_s)
    return x


def reference_student(unet, cond, x, timesteps, indices):
    """Multistep consistency sampling with f(x, t) = c_skip x + c_out x0_hat (sigma_data 0.5, c = 10)."""
    pe, pooled, tid = cond

    def f(x, t):
        e = unet_eps(unet, x, t, pe, pooled, tid)
        ct = 10.0 * t
        return 0.25 / (ct**2 + 0.25) * x + ct / math.sqrt(ct**2 + 0.25) * (x - sigma(t) * e) / alpha(t)

    x = x.double()
    for j, t in enumerate(timesteps):
        x0 = f(x, t)
        if j + 1 < len(timesteps):
            s = timesteps[j + 1]
            x = alpha(s) * x0 + sigma(s) * per_sample_noise(SEED, indices, SHAPE, stream=j + 1).double()
    return x0


def assert_close(ours, ref):
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_args(pipeline):
    return SimpleNamespace(pretrained_teacher_model=str(pipeline), pretrained_vae_model_name_or_path=None,
                           revision=None, teacher_revision=None, weight_dtype="fp32")


@pytest.fixture(scope="module")
def teacher_models(tiny_pipeline):
    return load_models(model_args(tiny_pipeline), torch.device("cpu"))


@pytest.fixture(scope="module")
def student_unet(tiny_pipeline):
    """The tiny UNet with a perturbed rank-4 LoRA: the ground truth the saved weights must reproduce."""
    unet = load_teacher(str(tiny_pipeline)).unet
    add_lora(unet, 4, 4, 0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet


def write_training_run(unet, pipeline, out: Path) -> Path:
    (out / "checkpoint-2").mkdir(parents=True)
    save_lora(unet, out / "checkpoint-2")
    save_lora(unet, out)
    cfg = {"lora_rank": 4, "lora_alpha": 4, "lora_target_modules": list(DEFAULT_LORA_TARGETS),
           "num_discr_timesteps": N, "timestep_scaling_factor": 10.0, "pretrained_teacher_model": str(pipeline),
           "pretrained_vae_model_name_or_path": None, "resolution": RES, "objective": "cm", "w": W}
    (out / "training_config.json").write_text(json.dumps(cfg))
    return out


def teacher_argv(pipeline, data, out, *extra):
    return ["--pretrained_teacher_model", str(pipeline), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", str(RES), "--num_original_inference_steps", str(N), "--guidance_scale", str(W),
            "--batch_size", "2", *NO_METRICS, *map(str, extra)]


@pytest.fixture(scope="module")
def teacher_out(tiny_pipeline, tiny_image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher-ddim"
    teacher_main(teacher_argv(tiny_pipeline, tiny_image_folder, out))
    return out


@pytest.fixture(scope="module")
def student_out(student_unet, tiny_pipeline, teacher_out, tmp_path_factory):
    out = write_training_run(student_unet, tiny_pipeline, tmp_path_factory.mktemp("run") / "cm")
    student_main(["--output_dir", str(out), "--train_data_dir", str(teacher_out / SAMPLES),
                  "--num_inference_steps", "1", "2", "--batch_size", "3", *NO_METRICS])
    return out


def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")}


def expect_user_error(main, argv, capsys, *fragments):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for f in fragments:
        assert f in err[0], err[0]


# ---------------------------------------------------------------------------------------------
# Noise


def test_per_caption_noise_is_independent_of_batching_and_file(tmp_path, tiny_image_folder):
    together = per_sample_noise(SEED, range(5), SHAPE)
    for i in range(5):
        assert torch.equal(together[i], per_sample_noise(SEED, [i], SHAPE)[0])
    assert not torch.equal(per_sample_noise(SEED, [0], SHAPE, stream=1), together[:1])
    path = init_noise_main(["--output", str(tmp_path / "noise.pt"), "--train_data_dir", str(tiny_image_folder),
                            "--resolution", str(RES), "--seed", str(SEED)])
    table = torch.load(path)
    assert table.shape == (5, *SHAPE) and torch.equal(table, together)
    from_file = InitNoise(SEED, RES, 5, str(path))
    assert torch.equal(from_file([4, 1]), InitNoise(SEED, RES, 5)([4, 1]))


# ---------------------------------------------------------------------------------------------
# Samplers against the independent implementations


@pytest.mark.parametrize("solver", ["ddim", "euler", "heun"])
def test_teacher_sampler_matches_reference(teacher_models, solver):
    idx, n = [0, 3], 5
    x_T = per_sample_noise(SEED, idx, SHAPE)
    caps = [TINY_CAPTIONS[i] for i in idx]
    ours = teacher_sampler(teacher_models, solver, n, W)(x_T, conditioning(teacher_models, caps, RES), idx,
                                                        lambda f: None)
    assert_close(ours, reference_teacher(teacher_models.unet, sdxl_cond(teacher_models, caps), x_T, solver, n, W))


def test_teacher_program_latents_match_reference(teacher_models, teacher_out):
    latents = torch.load(teacher_out / SAMPLES / "latents.pt")
    assert latents.shape == (5, *SHAPE)
    ref = reference_teacher(teacher_models.unet, sdxl_cond(teacher_models, TINY_CAPTIONS),
                            per_sample_noise(SEED, range(5), SHAPE), "ddim", N, W)
    assert_close(latents, ref)


def test_student_program_matches_consistency_sampling(student_unet, teacher_models, student_out):
    cond = sdxl_cond(teacher_models, TINY_CAPTIONS)
    x_T = per_sample_noise(SEED, range(5), SHAPE)
    for k, timesteps in ((1, [1000]), (2, [1000, 500])):
        latents = torch.load(student_out / "train_gen_images" / "final" / f"{k}_steps" / "latents.pt")
        assert_close(latents, reference_student(student_unet, cond, x_T, timesteps, list(range(5))))


def test_student_sampler_is_deterministic_and_batch_independent(teacher_models):
    sample = student_sampler(teacher_models, N, 2, SEED, 10.0)
    idx = [0, 1, 2]
    x_T = per_sample_noise(SEED, idx, SHAPE)
    cond = conditioning(teacher_models, TINY_CAPTIONS[:3], RES)
    a = sample(x_T, cond, idx, lambda f: None)
    assert torch.equal(a, sample(x_T, cond, idx, lambda f: None))
    one = torch.cat([sample(x_T[i:i + 1], conditioning(teacher_models, [TINY_CAPTIONS[i]], RES), [i], lambda f: None)
                     for i in idx])
    torch.testing.assert_close(one, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The programs end to end


def test_teacher_program_files(teacher_out, teacher_models):
    """{i}.jpg, byte for byte what PIL's default save (quality 75) makes of the decoded latents, as the
    paper's image.save(f"{i}.jpg"); no cropped copies of the real images (the raw files are the reference)."""
    import io

    from cmdistill.evaluation.generate import decode

    folder = teacher_out / SAMPLES
    latents = torch.load(folder / "latents.pt")
    for i, im in enumerate(decode(teacher_models.vae, latents, 5)):
        buf, q75 = io.BytesIO(), io.BytesIO()
        im.save(buf, format="JPEG")
        im.save(q75, format="JPEG", quality=75)
        assert (folder / f"{i}.jpg").read_bytes() == buf.getvalue() == q75.getvalue()
        assert not (folder / f"{i}.png").exists()
    assert not (teacher_out / "real_images").exists()
    assert not (folder / "shards").exists()
    assert json.loads((folder / "captions.json").read_text()) == TINY_CAPTIONS
    cfg = json.loads((folder / "eval_config.json").read_text())
    assert cfg["args"]["scheduler"] == "ddim" and cfg["identity"]["guidance_scale"] == W
    assert cfg["args"]["compile"] == "auto" and cfg["compile"] == "auto: off (no GPU)"  # --compile's default, decided
    row = results.load(teacher_out)[f"teacher/ddim/{N}_steps/{W}_gscale"]
    assert row["kind"] == "teacher" and row["num_images"] == 5
    assert len((teacher_out / "results.csv").read_text().strip().splitlines()) == 2
    assert list((teacher_out / "logs" / "evaluation").glob("events.out.tfevents.*"))


def test_student_program_files_and_scores(student_out, teacher_out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher = teacher_out / SAMPLES
    data = results.load(student_out)
    assert set(data) == {"student/final/1_steps", "student/final/2_steps"}
    for k in (1, 2):
        folder = student_out / "train_gen_images" / "final" / f"{k}_steps"
        row = data[f"student/final/{k}_steps"]
        assert row["method"] == "cm" and row["num_inference_steps"] == k and row["num_images"] == 5
        s, t = torch.load(folder / "latents.pt").double(), torch.load(teacher / "latents.pt").double()
        assert row["ode_error"] == pytest.approx(((s - t) ** 2).flatten(1).mean(1).mean().item(), rel=1e-9)
        px = [np.mean((np.asarray(Image.open(folder / f"{i}.jpg"), float) / 255 -
                       np.asarray(Image.open(teacher / f"{i}.jpg"), float) / 255) ** 2) for i in range(5)]
        assert row["pixel_mse"] == pytest.approx(np.mean(px))
        assert json.loads((folder / "eval_config.json").read_text())["identity"]["num_inference_steps"] == k
    assert len((student_out / "results.csv").read_text().strip().splitlines()) == 3
    ea = EventAccumulator(str(student_out / "logs" / "evaluation"))
    ea.Reload()
    assert "student_final/ode_error" in ea.Tags()["scalars"]
    assert "student_final/comparison" in ea.Tags()["images"]
    assert [e.step for e in ea.Scalars("student_final/ode_error")] == [1, 2]


def test_results_table(teacher_out, student_out, capsys):
    results.main([str(teacher_out), str(student_out)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["Model", "Steps", "Seeds"] and "ODE error" in out[0] and "PSNR" in out[0]
    assert out[2].startswith(f"Teacher (DDIM, N={N}, w={W})") and out[2].rstrip().endswith("teacher-ddim")
    assert out[3].split()[:3] == ["CM", "1", "1"] and out[4].split()[:2] == ["CM", "2"]
    ode = results.load(student_out)["student/final/1_steps"]["ode_error"]
    assert f"{ode:.4g}" in out[3]


def test_results_accumulate_and_replace(tmp_path):
    results.record(tmp_path, "a", {"kind": "teacher", "fid": 1.0})
    results.record(tmp_path, "b", {"kind": "student", "fid": 2.0, "extra": "x"})
    results.record(tmp_path, "a", {"kind": "teacher", "fid": 3.0})
    assert {k: v["fid"] for k, v in results.load(tmp_path).items()} == {"a": 3.0, "b": 2.0}
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0].endswith(",extra")


def test_rerun_skips_finished_work_and_redoes_missing(tiny_pipeline, tiny_image_folder, teacher_out, capsys):
    folder = teacher_out / SAMPLES
    before, latents = mtimes(folder), torch.load(folder / "latents.pt")
    teacher_main(teacher_argv(tiny_pipeline, tiny_image_folder, teacher_out))
    assert "5 of this process's 5 captions already done" in capsys.readouterr().out
    assert mtimes(folder) == before
    (folder / "3.jpg").unlink()
    full = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(full[:len(full) // 2])  # truncated: its header still reads
    teacher_main(teacher_argv(tiny_pipeline, tiny_image_folder, teacher_out, "--batch_size", 5))
    after = mtimes(folder)
    assert {k for k in after if after[k] != before.get(k)} == {"1.jpg", "3.jpg"}
    assert (folder / "1.jpg").read_bytes() == full
    assert_close(torch.load(folder / "latents.pt"), latents)


def test_batches_are_written_behind_the_next_and_a_stop_keeps_them(teacher_models, tmp_path, monkeypatch,
                                                                     capsys):
    """generate() writes a batch's files on a writer thread while the next batch is sampled: a run stopped in
    sampling has every batch sampled before on disk (the write in flight finishes); a failed write stops the run
    at the next batch with its own error."""
    from cmdistill.evaluation.generate import generate
    from cmdistill.evaluation.store import SampleStore

    sampled = []

    def sample(x_T, cond, idx, tick, stop_at=3):
        sampled.append(list(idx))
        if len(sampled) == stop_at:
            raise KeyboardInterrupt
        return x_T

    def noise(idx):
        return torch.randn(len(idx), 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(idx[0]))

    store = SampleStore(tmp_path / "stopped", RES)
    with pytest.raises(KeyboardInterrupt):
        generate(store, list(range(5)), TINY_CAPTIONS, noise, sample, teacher_models, 2, 2, "t", False)
    assert sampled == [[0, 1], [2, 3], [4]] and store.done(range(5)) == {0, 1, 2, 3}

    sampled.clear()
    store = SampleStore(tmp_path / "failed", RES)
    written = []

    def write_batch(idx, *a, **k):
        written.append(idx)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_batch", write_batch)
    with pytest.raises(OSError, match="No space left"):
        generate(store, list(range(5)), TINY_CAPTIONS, noise, lambda *a: sample(*a, stop_at=0), teacher_models, 2,
                 2, "t", False)
    assert sampled == [[0, 1], [2, 3]] and written == [[0, 1]]  # the error surfaced before a third batch

    sampled.clear()  # a failed write while the run stops for another reason: that reason is raised, the write said
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        generate(store, list(range(5)), TINY_CAPTIONS, noise, lambda *a: sample(*a, stop_at=2), teacher_models, 2,
                 2, "t", False)
    err = capsys.readouterr().err
    assert "warning: a batch's files were not written (OSError: [Errno 28] No space left on device)" in err


def test_compile_decision_counts_the_unet_calls_the_run_plans(tiny_pipeline, tiny_image_folder, tmp_path,
                                                              monkeypatch, capsys):
    """--compile auto is decided on the UNet calls planned: a teacher batch makes N x the solver's evaluations per
    step x the guidance passes; student jobs K per batch, with a set of weights per run of jobs on one LoRA."""
    from cmdistill.evaluation.driver import planned_work
    from cmdistill.fast import plan

    seen, real = [], plan.resolve_sampling
    monkeypatch.setattr(plan, "resolve_sampling", lambda args, kind, device, calls, loads=1:
                        seen.append((kind, calls, loads)) or real(args, kind, device, calls, loads))
    for w, passes in ((1, 1), (W, 2)):  # w = 1: no unconditional pass
        teacher_main(teacher_argv(tiny_pipeline, tiny_image_folder, tmp_path / f"heun{w}", "--scheduler", "heun",
                                  "--guidance_scale", w, "--max_prompts", 3))
        assert seen.pop() == ("teacher", 2 * N * 2 * passes, 1)  # 2 batches of at most 2, Heun's 2 evaluations
    assert "--compile auto: off (no GPU)" in capsys.readouterr().out

    a, b = object(), object()  # two LoRAs
    jobs = [SimpleNamespace(unet_calls=k, attach=lora) for k, lora in ((1, a), (2, a), (4, b), (8, a))]
    work = [(job, list(range(n))) for job, n in zip(jobs, (5, 4, 1, 2))]
    assert planned_work(work, 2) == (3 * 1 + 2 * 2 + 1 * 4 + 1 * 8, 3)  # a, then b, then a again: loaded 3 times
    assert planned_work([], 2) == (0, 0)


def test_rerun_with_other_settings_needs_overwrite(tiny_pipeline, tiny_image_folder, teacher_out, capsys):
    expect_user_error(teacher_main, teacher_argv(tiny_pipeline, tiny_image_folder, teacher_out, "--seed", 25), capsys,
                      "other settings", "seed", "--overwrite")


def test_lora_scale_zero_is_the_teacher(teacher_models, student_out, teacher_out):
    student_main(["--output_dir", str(student_out), "--train_data_dir", str(teacher_out / SAMPLES),
                  "--num_inference_steps", "1", "--lora_scale", "0", "--max_prompts", "2", *NO_METRICS])
    latents = torch.load(student_out / "train_gen_images" / "final_lora0.0" / "1_steps" / "latents.pt")
    ref = reference_student(teacher_models.unet, sdxl_cond(teacher_models, TINY_CAPTIONS[:2]),
                            per_sample_noise(SEED, range(2), SHAPE), [1000], [0, 1])
    assert latents.shape[0] == 2
    assert_close(latents, ref)
    assert "student/final_lora0.0/1_steps" in results.load(student_out)


def test_teacher_folder_without_latents_skips_the_ode_error(student_out, teacher_out, tmp_path, capsys):
    import shutil

    folder = tmp_path / "teacher_images_only"
    shutil.copytree(teacher_out / SAMPLES, folder, ignore=shutil.ignore_patterns("latents.pt", "metrics_cache"))
    rows = student_main(["--output_dir", str(student_out), "--train_data_dir", str(folder), "--num_inference_steps",
                         "1", "--max_prompts", "2", *NO_METRICS])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ODE solving error is skipped" in warnings[0]
    assert "ode_error" not in rows[0] and {"pixel_mse", "psnr"} <= set(rows[0])


def test_lora_weights_selection(student_out, tmp_path):
    assert resolve_lora(student_out, "auto") == (student_out, "final")
    assert resolve_lora(student_out, "latest") == (student_out / "checkpoint-2", "checkpoint-2")
    assert resolve_lora(student_out, "checkpoint-2")[1] == "checkpoint-2"
    run = tmp_path / "only_ckpt"
    (run / "checkpoint-7").mkdir(parents=True)
    (run / "checkpoint-7" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (run / "checkpoint-12").mkdir()  # no weights: not a candidate
    assert resolve_lora(run, "auto") == (run / "checkpoint-7", "checkpoint-7")


def test_two_processes_write_the_same_files_as_one(tiny_pipeline, tiny_image_folder, teacher_out, tmp_path):
    """scripts/test_teacher.sh with NUM_GPUS=2 (two CPU processes, gloo) and an init_noise.pt file."""
    noise = init_noise_main(["--output", str(tmp_path / "init_noise.pt"), "--num_captions", "5",
                             "--resolution", str(RES)])
    out = tmp_path / "two"
    env = dict(os.environ, NUM_GPUS="2", MODEL_NAME=str(tiny_pipeline), VAE_PATH="",
               TRAIN_DATA_DIR=str(tiny_image_folder), OUTPUT_DIR=str(out), INIT_NOISE=str(noise),
               NUM_ORIGINAL_INFERENCE_STEPS=str(N), GUIDANCE_SCALE=str(W), RESOLUTION=str(RES), WEIGHT_DTYPE="fp32",
               BATCH_SIZE="2", DGM_METRICS="none", INSTANCE_METRICS="none", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), ACCELERATE_ARGS=f"--main_process_port {free_port()}")  # tests run side by side
    r = subprocess.run(["bash", str(ROOT / "scripts" / "test_teacher.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--multi_gpu --num_processes 2" in r.stderr
    one, two = teacher_out / SAMPLES, out / SAMPLES
    assert json.loads((two / "eval_config.json").read_text())["num_processes"] == 2
    assert_close(torch.load(two / "latents.pt"), torch.load(one / "latents.pt"))
    for i in range(5):
        a, b = (np.asarray(Image.open(d / f"{i}.jpg"), dtype=int) for d in (one, two))
        assert np.abs(a - b).mean() <= 0.5


def test_student_script_reruns_nothing_when_done(student_out, teacher_out):
    env = dict(os.environ, NUM_GPUS="0", OUTPUT_DIR=str(student_out), TEACHER_DIR=str(teacher_out / SAMPLES),
               NUM_INFERENCE_STEPS="1 2", WEIGHT_DTYPE="fp32", DGM_METRICS="none", INSTANCE_METRICS="none",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    before = mtimes(student_out / "train_gen_images" / "final" / "2_steps")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("already done") == 2
    assert mtimes(student_out / "train_gen_images" / "final" / "2_steps") == before


class Colour(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def colour_preprocess(im):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(im.convert("RGB").resize((16, 16)))  # squashed full frame, no crop


@pytest.fixture
def colour_metrics(monkeypatch):
    """cmdistill.metrics with a small registered FD extractor (6-d colour statistics, so that no 2048-d
    matrix square root runs on the CPU) and the tiny random-weight CLIP / aesthetic networks."""
    metrics = pytest.importorskip("cmdistill.metrics")
    metrics.register_feature_extractor("colour", lambda *, device, weights_dir: metrics.FeatureExtractor(
        name="colour", model=Colour(), preprocess=colour_preprocess, dim=6, identity="colour-v1",
        preprocess_id="16px"))
    monkeypatch.setenv("CMDISTILL_METRICS_RANDOM_WEIGHTS", "tiny")
    monkeypatch.setenv("CMDISTILL_METRICS_WORKERS", "0")
    return metrics, ["--dgm_models", "colour", "--dgm_metrics", "fd", "--instance_metrics", "clip_score",
                     "aesthetic", "--dgm_metrics_batch_size", "4"]


def colour_features(paths):
    return np.stack([Colour()(colour_preprocess(Image.open(p))[None])[0].numpy() for p in paths])


def test_metrics_are_recorded(tiny_pipeline, tiny_image_folder, teacher_out, student_out, colour_metrics, capsys):
    """FD from the saved files against the raw real images; CLIP / aesthetic scores recorded (here from the
    files, with a warning: these samples were generated without instance metrics)."""
    from cmdistill.metrics import frechet_distance

    metrics, flags = colour_metrics
    keys = {"fd_colour", "clip_score", "aesthetic_score"}
    teacher_main(teacher_argv(tiny_pipeline, tiny_image_folder, teacher_out) + flags)
    assert "were not stored at generation" in capsys.readouterr().err
    row = results.load(teacher_out)[f"teacher/ddim/{N}_steps/{W}_gscale"]
    assert keys <= set(row) and all(math.isfinite(row[k]) for k in keys)
    assert row["real_reference"] == "raw" and row["image_format"] == "jpg"
    real = sorted(tiny_image_folder.glob("*.jpg"))  # the raw, non-square files
    gen = [teacher_out / SAMPLES / f"{i}.jpg" for i in range(5)]
    assert row["fd_colour"] == pytest.approx(frechet_distance(colour_features(real), colour_features(gen)), rel=1e-6)
    assert list((teacher_out / "metrics_cache").glob("ref_colour_*"))  # real-image features, cached
    student_main(["--output_dir", str(student_out), "--train_data_dir", str(teacher_out / SAMPLES),
                  "--num_inference_steps", "1", *flags])
    row = results.load(student_out)["student/final/1_steps"]
    assert keys | {"ode_error"} <= set(row) and all(math.isfinite(row[k]) for k in keys)
    assert list((teacher_out / SAMPLES / "metrics_cache").glob("ref_colour_*"))  # teacher-image features


def test_instance_metrics_read_the_in_memory_images(tiny_pipeline, tiny_image_folder, teacher_models, colour_metrics,
                                                    tmp_path, capsys):
    """Generated with instance metrics: the CLIP features of the images before JPEG are stored with the
    samples and score CLIP / aesthetic; FD reads the JPEG files. The crop of the real images is opt-in."""
    from cmdistill.evaluation.generate import decode
    from cmdistill.evaluation.store import FEATURES_NAME

    metrics, flags = colour_metrics
    out = tmp_path / "t"
    teacher_main(teacher_argv(tiny_pipeline, tiny_image_folder, out, "--max_prompts", 2, "--real_image_crop")
                 + flags)
    assert "were not stored" not in capsys.readouterr().err
    folder = out / SAMPLES
    stored = torch.load(folder / FEATURES_NAME)["clip"]
    assert stored["indices"].tolist() == [0, 1]
    images = decode(teacher_models.vae, torch.load(folder / "latents.pt"), 2)
    memory = metrics.image_features(images, ["clip"])["clip"]
    assert stored["identity"] == memory["identity"]
    np.testing.assert_allclose(stored["features"].numpy(), memory["features"], rtol=1e-5, atol=1e-6)
    files = metrics.image_features([Image.open(folder / f"{i}.jpg") for i in range(2)], ["clip"])["clip"]
    assert not np.allclose(files["features"], memory["features"], rtol=1e-5, atol=1e-6)  # JPEG changed them
    row = results.load(out)[f"teacher/ddim/{N}_steps/{W}_gscale"]
    expected = metrics.compute_metrics([folder / f"{i}.jpg" for i in range(2)], None, TINY_CAPTIONS[:2],
                                       dgm_metrics=(), instance_metrics=("clip_score",),
                                       gen_features={"clip": memory["features"]})
    assert row["clip_score"] == pytest.approx(expected["clip_score"], rel=1e-5)
    assert row["real_reference"] == "crop"
    for i in range(2):
        with Image.open(out / "real_images" / f"{RES}px" / f"{i}.png") as im:
            assert im.size == (RES, RES)  # the non-square real images, resized and center-cropped


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def test_bad_inputs_give_one_line_errors(tiny_pipeline, tiny_image_folder, teacher_out, tmp_path, capsys):
    args = lambda *extra: teacher_argv(tiny_pipeline, tiny_image_folder, tmp_path / "t", *extra)  # noqa: E731
    expect_user_error(teacher_main, teacher_argv(tiny_pipeline, tmp_path / "nope", tmp_path / "t"), capsys,
                      "--train_data_dir", "does not exist")
    expect_user_error(teacher_main, args("--caption_column", "caption"), capsys, "--caption_column 'caption'",
                      "file_name, text")
    torch.save(torch.zeros(3, *SHAPE), tmp_path / "rows.pt")
    expect_user_error(teacher_main, args("--init_noise", tmp_path / "rows.pt"), capsys, "3 rows", "5 captions")
    torch.save(torch.zeros(5, 4, 4, 4), tmp_path / "shape.pt")
    expect_user_error(teacher_main, args("--init_noise", tmp_path / "shape.pt"), capsys, "(4, 4, 4)", "(4, 8, 8)")
    expect_user_error(teacher_main, ["--output_dir", tmp_path / "t"], capsys, "--train_data_dir", "--captions_file")

    empty = tmp_path / "empty_run"
    empty.mkdir()
    expect_user_error(student_main, ["--output_dir", empty, "--train_data_dir", teacher_out / SAMPLES], capsys,
                      "no LoRA weights")
    expect_user_error(student_main, ["--output_dir", tmp_path / "missing", "--train_data_dir", teacher_out / SAMPLES],
                      capsys, "does not exist")
    (empty / "pytorch_lora_weights.safetensors").write_bytes(b"")
    expect_user_error(student_main, ["--output_dir", empty, "--train_data_dir", tmp_path / "nope"], capsys,
                      "run test_teacher.py first")
    expect_user_error(student_main, ["--output_dir", empty, "--train_data_dir", teacher_out], capsys,
                      "pass one of its sample folders")
    capsys.readouterr()


def _broken_teacher(teacher_out, tmp_path, broken):
    import shutil

    folder = tmp_path / "teacher_copy"
    shutil.copytree(teacher_out / SAMPLES, folder, ignore=shutil.ignore_patterns("metrics_cache"))
    broken(folder)
    return folder


def _run_copy(student_unet, tiny_pipeline, tmp_path, **cfg):
    out = write_training_run(student_unet, tiny_pipeline, tmp_path / "run")
    path = out / "training_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **cfg}))
    return out


def _nan_lora(out):
    from safetensors.torch import load_file, save_file

    for d in (out, out / "checkpoint-2"):
        sd = load_file(d / "pytorch_lora_weights.safetensors")
        sd[next(iter(sd))][0] = float("nan")
        save_file(sd, d / "pytorch_lora_weights.safetensors")
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


ERROR_CASES = {
    # name: (program, argv builder(ctx), fragments of the one error line)
    "teacher: missing data folder": ("teacher", lambda c: teacher_argv(c.pipe, c.tmp / "nope", c.tmp / "t"),
                                     ["--train_data_dir", "does not exist"]),
    "teacher: N not dividing the timesteps": (
        "teacher", lambda c: teacher_argv(c.pipe, c.data, c.tmp / "t") + ["--num_original_inference_steps", "7"],
        ["--num_original_inference_steps 7", "1000 train timesteps"]),
    "teacher: init noise of another size": (
        "teacher", lambda c: teacher_argv(c.pipe, c.data, c.tmp / "t", "--init_noise", c.noise32),
        ["--init_noise", "noise32.pt", "--resolution 64", "drop --resolution"]),
    "teacher: corrupt latents.pt of a rerun": (
        "teacher", lambda c: teacher_argv(c.pipe, c.data, c.copy_teacher_out(
            lambda f: (f / "latents.pt").write_bytes(b"not a tensor"))),
        ["latents.pt", "cannot be read", "delete it"]),
    "student: corrupt latents.pt": (
        "student", lambda c: c.student(c.teacher(lambda f: (f / "latents.pt").write_bytes(b"\x00" * 64))),
        ["latents.pt", "cannot be read", "test_teacher.py"]),
    "student: truncated teacher image": (
        "student", lambda c: c.student(c.teacher(lambda f: _truncate(f / "3.jpg"))),
        ["3.jpg", "truncated or corrupt", "test_teacher.py"]),
    "student: corrupt eval_config.json": (
        "student", lambda c: c.student(c.teacher(lambda f: (f / "eval_config.json").write_text("{"))),
        ["eval_config.json", "not readable JSON"]),
    "student: NaN LoRA": ("student", lambda c: c.student(run=_nan_lora(c.run())),
                          ["pytorch_lora_weights.safetensors", "non-finite", "--lora_weights"]),
    "student: unreadable LoRA": (
        "student", lambda c: c.student(run=c.run(lambda r: (r / "pytorch_lora_weights.safetensors").write_bytes(b"x"))),
        ["pytorch_lora_weights.safetensors", "cannot be read", "--lora_weights"]),
    "student: references of another N and w": (
        "student", lambda c: c.student(run=c.run(num_discr_timesteps=20, w=9.0)),
        ["N 10 (references) vs 20", "w 3.0 (references) vs 9.0", "--guidance_scale 9.0",
         "--allow_reference_mismatch"]),
    "student: other noise seed": ("student", lambda c: c.student(extra=["--seed", "25"]),
                                  ["initial noise seed 24 (references) vs seed 25", "--train_data_dir"]),
    "student: other resolution": ("student", lambda c: c.student(extra=["--resolution", "32"]),
                                  ["resolution 64 (references) vs 32", "--train_data_dir"]),
    "student: init noise of another size": ("student", lambda c: c.student(extra=["--init_noise", c.noise32]),
                                            ["resolution 64 (references) vs 32", "--init_noise"]),
    "student: N not dividing the timesteps": (
        "student", lambda c: c.student(extra=["--num_original_inference_steps", "7", "--allow_reference_mismatch"]),
        ["--num_original_inference_steps 7", "1000 train timesteps"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_classes_are_one_line_before_loading(case, tiny_pipeline, tiny_image_folder, teacher_out, student_unet,
                                                   tmp_path, capsys, monkeypatch):
    """Each bad input: exit status 2, one line naming the file or flag and the fix, no traceback, and no
    model loaded (the loader is replaced by one that fails the test)."""
    import cmdistill.evaluation.driver as cli

    def no_load(*a, **k):
        raise AssertionError("models loaded before the input was checked")

    monkeypatch.setattr(cli, "load_models", no_load)
    program, build, fragments = ERROR_CASES[case]
    torch.save(torch.zeros(5, 4, 4, 4), tmp_path / "noise32.pt")

    def copy_teacher_out(broken):
        import shutil

        out = tmp_path / "teacher_out"
        shutil.copytree(teacher_out, out)
        broken(out / SAMPLES)
        return out

    def run(broken=None, **cfg):
        out = _run_copy(student_unet, tiny_pipeline, tmp_path, **cfg)
        if broken:
            broken(out)
        return out

    def student(folder=None, run=None, extra=()):
        run = run or _run_copy(student_unet, tiny_pipeline, tmp_path)
        return ["--output_dir", run, "--train_data_dir", folder or teacher_out / SAMPLES, "--num_inference_steps",
                "1", *NO_METRICS, *extra]

    ctx = SimpleNamespace(pipe=tiny_pipeline, data=tiny_image_folder, tmp=tmp_path, noise32=tmp_path / "noise32.pt",
                          teacher=lambda broken: _broken_teacher(teacher_out, tmp_path, broken), run=run,
                          student=student, copy_teacher_out=copy_teacher_out)
    expect_user_error(teacher_main if program == "teacher" else student_main, build(ctx), capsys, *fragments)


def test_reference_mismatch_can_be_allowed(student_unet, tiny_pipeline, teacher_out, tmp_path, capsys):
    run = write_training_run(student_unet, tiny_pipeline, tmp_path / "run")
    student_main(["--output_dir", str(run), "--train_data_dir", str(teacher_out / SAMPLES), "--seed", "25",
                  "--num_inference_steps", "1", "--max_prompts", "1", "--allow_reference_mismatch", *NO_METRICS])
    err = capsys.readouterr().err
    assert "initial noise seed 24 (references) vs seed 25" in err and "--allow_reference_mismatch" in err


# ---------------------------------------------------------------------------------------------
# Flags, defaults, captions


def test_every_flag_has_help_and_shows_its_default():
    import re

    from cmdistill.evaluation.init_noise import init_noise_parser
    from cmdistill.evaluation.student import student_parser
    from cmdistill.evaluation.teacher import teacher_parser

    for parser in (teacher_parser(), student_parser(), init_noise_parser()):
        text = parser.format_help()
        for action in parser._actions:
            assert action.help and action.help.strip(), action.option_strings
            if action.default not in (None, False) and action.option_strings and action.dest != "help":
                assert f"{action.option_strings[0]}" in text
        assert not re.search(r"\d\s*(s|min|GiB|ms)\b|H100|H200|img/s", text), text
        assert text.count("(default:") >= sum(a.default not in (None, "==SUPPRESS==") for a in parser._actions) - 1
    own = {a.dest for a in student_parser()._actions} - {a.dest for a in teacher_parser()._actions}
    assert {"lora_weights", "allow_reference_mismatch"} <= own
    assert "real_image_crop" not in {a.dest for a in student_parser()._actions}
    assert "compile_freezing" not in {a.dest for a in student_parser()._actions}


def test_resolution_defaults_to_the_init_noise_file_then_the_model(tiny_pipeline, tmp_path):
    from cmdistill.evaluation.flags import resolve_size_and_grid

    def resolved(**kw):
        args = SimpleNamespace(pretrained_teacher_model=str(tiny_pipeline), pretrained_vae_model_name_or_path=None,
                               revision=None, teacher_revision=None, **{"resolution": None, "init_noise": None, **kw})
        resolve_size_and_grid(args, N, "--num_original_inference_steps")
        return args.resolution

    assert resolved() == RES  # the tiny UNet's sample_size 8 x the VAE factor 8
    torch.save(torch.zeros(5, 4, 4, 4), tmp_path / "noise32.pt")
    assert resolved(init_noise=str(tmp_path / "noise32.pt")) == 32


def test_old_png_samples_need_overwrite_or_png(tmp_path):
    from cmdistill.errors import UserError
    from cmdistill.evaluation.store import SampleStore

    store = SampleStore(tmp_path, RES, "png")
    store.write_config({"identity": {"seed": 24}}, ["a"])  # written before --image_format existed
    store.write_batch([0], torch.zeros(1, *SHAPE), [Image.new("RGB", (RES, RES))])
    store.check_config({"seed": 24, "image_format": "png"}, ["a"], False)
    with pytest.raises(UserError, match="image_format: .png. -> .jpg.*--overwrite.*--image_format png"):
        SampleStore(tmp_path, RES).check_config({"seed": 24, "image_format": "jpg"}, ["a"], False)


def test_empty_captions_stay_empty_and_are_counted(tmp_path):
    from cmdistill.data import empty_caption_note
    from cmdistill.evaluation.inputs import read_captions_file, read_metadata

    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": null}\n'
                                             '{"file_name": "b.jpg", "text": "a dog"}\n')
    captions, _ = read_metadata(tmp_path)
    assert captions == ["", "a dog"]
    (tmp_path / "caps.json").write_text('[null, "", "a cat"]')
    assert read_captions_file(tmp_path / "caps.json") == ["", "", "a cat"]
    assert empty_caption_note(["", " ", "a"], "caps") == '2 of 3 captions of caps are empty: they are kept as empty ' \
                                                         'prompts ("")'
    assert empty_caption_note(["a"], "caps") is None


def test_checkpoints_are_evaluated_and_logged_at_their_training_steps(student_unet, tiny_pipeline, teacher_out,
                                                                      tmp_path, capsys):
    """test.py --checkpoints all: every checkpoint-<step> and the final weights (the run's last step), each
    logged at its training step; a rerun skips them; unknown steps and trackers are one-line errors."""
    import importlib.util

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = write_training_run(student_unet, tiny_pipeline, tmp_path / "cm")  # checkpoint-2 and the final weights
    (out / "checkpoint-4").mkdir()
    save_lora(student_unet, out / "checkpoint-4")
    (out / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    argv = ["--output_dir", str(out), "--train_data_dir", str(teacher_out / SAMPLES), "--num_inference_steps", "1",
            "2", "--max_prompts", "2", "--batch_size", "2", *NO_METRICS, "--checkpoints"]
    student_main(argv + ["all"])
    ea = EventAccumulator(str(out / "logs" / "evaluation"))
    ea.Reload()
    for K in (1, 2):
        assert [e.step for e in ea.Scalars(f"metrics/ode_error/{K}_steps")] == [2, 4, 6]
    assert sorted(e.step for e in ea.Scalars("student_final/ode_error")) == [1, 2]  # against sampling steps
    assert "student_checkpoint-4/comparison" in ea.Tags()["images"]
    assert "student_final/captions/text_summary" in ea.Tags()["tensors"]  # the captions as text
    assert {"plots/metrics_vs_steps", "plots/metrics_vs_training_step"} <= set(ea.Tags()["images"])
    assert (out / "logs" / "plots" / "metrics_vs_training_step.png").stat().st_size > 1000
    rows = results.load(out)
    assert {r["weights"]: r["training_step"] for r in rows.values()} == {"checkpoint-2": 2, "checkpoint-4": 4,
                                                                         "final": 6}
    capsys.readouterr()
    student_main(argv + ["2,6"])  # a rerun: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    expect_user_error(student_main, argv + ["3"], capsys, "no weights of step 3", "there are: 2, 4, 6")
    if importlib.util.find_spec("wandb") is None:
        expect_user_error(student_main, argv + ["all", "--report_to", "wandb"], capsys, "wandb is not installed")
