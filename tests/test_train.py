"""End to end: both training scripts on a tiny SDXL-architecture pipeline, on the CPU."""

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import logs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tiny_pipeline):
    """The session's tiny SDXL pipeline (tests/conftest.py; read only)."""
    return tiny_pipeline


def make_image_folder(folder: Path, n: int = 6, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = (rng.random((64 + 8 * i, 72, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append((f"{i}.png", f"a picture with number {i}"))
    for j in range(corrupt):
        (folder / f"bad{j}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        rows.append((f"bad{j}.png", "a broken picture"))
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs")


def run_main(script, *args, check=True):
    """``script``'s entry point (``cmdistill.train.main``) in-process, not in a new interpreter (seconds of imports
    each; the scripts themselves run in the multi-process tests below, tests/test_recipe.py and tests/test_demo.py):
    the exit status and what the run wrote to stderr (its log lines, warnings and one-line errors)."""
    import contextlib
    import io
    import warnings

    from cmdistill.train import main

    objective = {"train_cm.py": "cm", "train_direct_cm.py": "direct_cm"}[script]
    err, code = io.StringIO(), 0
    with logs() as lines, contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main(objective, [str(a) for a in args])
        except SystemExit as e:
            code = e.code
    stderr = "\n".join([*lines, *(str(w.message) for w in caught), err.getvalue()])
    if check and code != 0:
        raise AssertionError(f"{script} failed ({code}):\n{stderr[-3000:]}")
    return types.SimpleNamespace(returncode=code, stderr=stderr, stdout="")


def common(teacher_dir, data_dir, out, *extra):
    return ["--pretrained_teacher_model", teacher_dir, "--train_data_dir", data_dir, "--output_dir", out,
            "--resolution", 64, "--train_batch_size", 2, "--num_discr_timesteps", 10, "--lora_rank", 4,
            "--lora_alpha", 4, "--learning_rate", 1e-3, *extra]


def losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script,solver", [("train_cm.py", "heun"), ("train_direct_cm.py", "heun"),
                                           ("train_direct_cm.py", "euler")])
def test_script_trains_checkpoints_and_leaves_loadable_lora(teacher_dir, data_dir, tmp_path, script, solver):
    out = tmp_path / "run"
    run_main(script, *common(teacher_dir, data_dir, out, "--max_train_steps", 3, "--solver", solver,
                             "--checkpointing_steps", 2, "--validation_steps", 3, "--num_inference_steps", 1, 2))
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-2" / "training_state.pt").is_file()
    cfg = json.loads((out / "training_config.json").read_text())
    assert cfg["solver"] == solver and cfg["objective"] == script[len("train_"):-3]
    assert len(losses(out)) == 3 and all(np.isfinite(losses(out)))
    assert list((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_dir)
    x = torch.randn(1, 4, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 77, 64),
              added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.ones(1, 6) * 64})
    with torch.no_grad():
        before = pipe.unet(x, 500, **kw).sample
        pipe.load_lora_weights(str(out))
        after = pipe.unet(x, 500, **kw).sample
    assert not torch.allclose(before, after), "the trained LoRA did not change the UNet"
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(out / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=next(iter(pipe.unet.peft_config)))
    assert len(loaded) == len(saved) and any("attn1.to_q" in k for k in loaded)
    for k, v in loaded.items():
        torch.testing.assert_close(v, saved["unet." + k])


def run_two_processes(script, *args):
    """The script on 2 CPU processes (gloo), as `accelerate launch` would start it on 2 GPUs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(ROOT / script), *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise AssertionError(f"{script} on 2 processes failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def test_direct_cm_on_two_processes_matches_one_process_with_the_same_global_batch(teacher_dir, data_dir, tmp_path):
    """Direct CM (per-sample loop, shrinking active sets): 2 gloo processes x batch 1 == 1 process x batch 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--max_train_steps", 2, "--checkpointing_steps", 0, "--validation_steps", 0, "--report_to", "none")
    run_main("train_direct_cm.py", *common(teacher_dir, data_dir, one, *extra))
    args = common(teacher_dir, data_dir, two, *extra)
    args[args.index("--train_batch_size") + 1] = 1
    r = run_two_processes("train_direct_cm.py", *args)
    assert "1 per device x 2 processes" in r.stderr
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)


def test_resume_and_process_count_reproduce_the_uninterrupted_run(teacher_dir, data_dir, tmp_path):
    """4 steps on 1 process with batch 2 == 2 steps on 2 processes with batch 1 each (same global batch),
    then resumed from `latest` on 1 process: same losses, same final LoRA."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("--checkpointing_steps", 2, "--validation_steps", 0, "--report_to", "none")
    run_main("train_cm.py", *common(teacher_dir, data_dir, full, "--max_train_steps", 4, *extra))
    two = common(teacher_dir, data_dir, part, "--max_train_steps", 2, *extra)
    two[two.index("--train_batch_size") + 1] = 1
    r = run_two_processes("train_cm.py", *two)
    assert "2 per device" not in r.stderr and "1 per device x 2 processes" in r.stderr
    np.testing.assert_allclose(losses(part), losses(full)[:2], rtol=1e-4)
    r = run_main("train_cm.py", *common(teacher_dir, data_dir, part, "--max_train_steps", 4,
                                        "--resume_from_checkpoint", "latest",
                                        "--allow_config_change", "max_train_steps", *extra))
    assert "resuming from" in r.stderr + r.stdout
    np.testing.assert_allclose(losses(part), losses(full), rtol=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(full / "pytorch_lora_weights.safetensors"), load_file(part / "pytorch_lora_weights.safetensors")
    # All-reduce sums gradients in another order than one process does; Adam's g / sqrt(v) turns those
    # last-bit differences into visible ones on parameters whose gradients are ~0.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)


def test_checkpoint_rotation_and_gradient_accumulation(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "rot"
    run_main("train_direct_cm.py", *common(teacher_dir, data_dir, out, "--max_train_steps", 4,
                                           "--checkpointing_steps", 1, "--checkpoints_total_limit", 2,
                                           "--gradient_accumulation_steps", 2, "--validation_steps", 0,
                                           "--report_to", "none", "--solver", "ddim"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    state = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=False)
    assert state["global_step"] == 4 and state["samples_seen"] == 4 * 2 * 2


def test_corrupt_image_is_skipped_with_a_warning_and_counted(teacher_dir, tmp_path):
    data = make_image_folder(tmp_path / "bad", n=3, corrupt=2)
    out = tmp_path / "out"
    r = run_main("train_cm.py", *common(teacher_dir, data, out, "--max_train_steps", 4, "--validation_steps", 0,
                                        "--report_to", "none", "--checkpointing_steps", 0,
                                        "--max_train_samples", 5))  # every warning recorded
    assert "skipping unreadable image" in r.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_images"] >= 1
    assert all(r["step_s"] > 0 for r in log) and "peak_mem_gib" not in log[0]  # peak memory on CUDA only


@pytest.mark.parametrize("change,message", [
    ({"--pretrained_teacher_model": "/nonexistent/sdxl"}, "does not exist"),
    ({"--pretrained_teacher_model": "stabilityai/stable-diffusion-xl-base-1.0"}, "not a local folder"),
    ({"--caption_column": "caption"}, "--caption_column 'caption' is not a column"),
    ({"--num_discr_timesteps": 33}, "must divide"),
    ({"--train_data_dir": "/nonexistent/data"}, "does not exist"),
])
def test_bad_input_gives_one_line_error(teacher_dir, data_dir, tmp_path, change, message, capsys, monkeypatch):
    """train_cm.py's entry point in-process (no interpreter start-up per case; the script itself exits the same
    way in tests/test_recipe.py::test_batch_arithmetic_is_checked_before_models_load_for_the_launched_processes)."""
    from huggingface_hub import constants

    from cmdistill.train import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as the scripts' HF_HUB_OFFLINE=1
    args = common(teacher_dir, data_dir, tmp_path / "x", "--max_train_steps", 1)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main("cm", [str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_gradient_clipping_really_clips(teacher_dir, data_dir, tmp_path):
    """The gradient that the optimizer sees has norm <= --max_grad_norm."""
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    args = training_parser("direct_cm").parse_args(list(map(str, common(
        teacher_dir, data_dir, tmp_path / "clip", "--max_train_steps", 2, "--max_grad_norm", 1e-4,
        "--report_to", "none", "--validation_steps", 0, "--checkpointing_steps", 0))))
    tr = Trainer(args, "direct_cm")
    seen = []
    inner = tr.optimizer.optimizer
    orig = inner.step

    def step(*a, **k):
        seen.append(torch.norm(torch.stack([p.grad.norm() for p in tr.params if p.grad is not None])).item())
        return orig(*a, **k)

    inner.step = step
    tr.train()
    assert len(seen) == 2 and all(s <= 1e-4 * 1.001 for s in seen)
    log = [json.loads(line) for line in (tmp_path / "clip" / "train_log.jsonl").read_text().splitlines()]
    assert all(entry["grad_norm"] > 1e-4 for entry in log)  # the logged norm is the one before clipping
