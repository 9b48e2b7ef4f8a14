"""Issue #17, the training side: never lose or corrupt a result.

Most checks run in-process through ``cmdistill.train.main`` (no interpreter start-up per case); errors that must
come before any model loads run with ``models.load_teacher`` replaced by a trap. One small training run is shared
(copied per test) where the tests only need a finished run folder."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmdistill import models
from cmdistill.run_folder import list_checkpoints
from cmdistill.train import main
from test_train import make_image_folder
from conftest import logs

LONG_CAPTION = " ".join(["a very long caption about a picture"] * 15)  # > 77 CLIP tokens


class ModelsLoaded(BaseException):
    """Raised by the trap on ``models.load_teacher``: the run got past every pre-model check."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 images; caption 0 empty (among the validation prompts), caption 1 beyond 77 tokens."""
    folder = make_image_folder(tmp_path_factory.mktemp("faults") / "data")
    rows = list(csv.reader(open(folder / "metadata.csv")))
    rows[1][1], rows[2][1] = "", LONG_CAPTION
    with open(folder / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder


def argv(teacher, data, out, *extra):
    return [str(a) for a in ("--pretrained_teacher_model", teacher, "--train_data_dir", data, "--output_dir", out,
                             "--resolution", 64, "--train_batch_size", 2, "--num_discr_timesteps", 10,
                             "--lora_rank", 4, "--lora_alpha", 4, "--learning_rate", 1e-3, "--report_to", "none",
                             "--max_train_steps", 3, "--checkpointing_steps", 1, "--validation_steps", 0, *extra)]


def run(capsys, args, objective="cm"):
    """main() in-process: (exit code, the 'error:' lines of stderr, all of stderr)."""
    capsys.readouterr()
    code = 0
    try:
        main(objective, args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if "error:" in line], err


def assert_one_line_error(result, *names):
    code, errors, err = result
    assert code != 0 and len(errors) == 1, err[-2000:]
    assert "Traceback" not in err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def no_models(monkeypatch):
    def trap(*a, **k):
        raise ModelsLoaded()

    monkeypatch.setattr(models, "load_teacher", trap)


@pytest.fixture(scope="module")
def finished(tiny_pipeline, data, tmp_path_factory):
    """A finished CM run: 3 steps, a checkpoint every step with --checkpoints_total_limit 2 (checkpoint-2 and -3
    remain), validation at step 3 on the data set's first captions (one of them empty)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with logs() as lines:
        main("cm", argv(tiny_pipeline, data, out, "--checkpoints_total_limit", 2, "--validation_steps", 3,
                        "--num_inference_steps", 1))
    return out, lines


def copy_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


def log_steps(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def log_losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


# --- bad input: one line, naming the flag or file, before any model loads -------------------------------------
def _extra_field_csv(folder: Path):
    make_image_folder(folder, n=2)
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a cat, unquoted\n1.png,a dog\n")


def _no_metadata(folder: Path):
    make_image_folder(folder, n=2)
    (folder / "metadata.csv").unlink()


@pytest.mark.parametrize("case,change,names", [
    ("rank", {"--lora_rank": 0}, ["--lora_rank"]),
    ("dropout", {"--lora_dropout": 2}, ["--lora_dropout"]),
    ("res0", {"--resolution": 0}, ["--resolution"]),
    ("res-64", {"--resolution": -64}, ["--resolution"]),
    ("fp16", {"--mixed_precision": "fp16"}, ["--mixed_precision", "bf16"]),
    ("steps0", {"--max_train_steps": 0}, ["--max_train_steps"]),
    ("w<0", {"--w": -1}, ["--w"]),
    ("N", {"--num_discr_timesteps": 0}, ["--num_discr_timesteps"]),
    ("limit0", {"--checkpoints_total_limit": 0}, ["--checkpoints_total_limit"]),
    ("override", {"--allow_config_change": "bogus"}, ["--allow_config_change", "bogus"]),
    ("out-file", {"--output_dir": "{tmp}/a-file"}, ["--output_dir", "a-file", "is a file"]),
    ("out-under-file", {"--output_dir": "{tmp}/a-file/run"}, ["--output_dir", "not writable"]),
    ("out-readonly", {"--output_dir": "{tmp}/ro/run"}, ["--output_dir", "not writable"]),
    ("no-data", {"--train_data_dir": "{tmp}/missing"}, ["--train_data_dir", "does not exist"]),
    ("no-metadata", {"--train_data_dir": "{tmp}/nometa"}, ["--train_data_dir", "metadata.csv"]),
    ("csv-fields", {"--train_data_dir": "{tmp}/extra"}, ["metadata.csv line 2", "3 fields", "double quotes"]),
])
def test_bad_input_is_one_line_before_models_load(tiny_pipeline, data, tmp_path, capsys, no_models, case, change,
                                                  names):
    if case == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    (tmp_path / "a-file").write_text("x")
    if case == "out-readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders (checked at checkpoint time below instead)")
        (tmp_path / "ro").mkdir(mode=0o500)
    _no_metadata(tmp_path / "nometa")
    _extra_field_csv(tmp_path / "extra")
    args = argv(tiny_pipeline, data, tmp_path / "out")
    for flag, value in change.items():
        value = str(value).format(tmp=tmp_path)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert_one_line_error(run(capsys, args), *names)


# --- 1: the NaN guard ----------------------------------------------------------------------------------------
def test_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(tiny_pipeline, data, tmp_path, capsys):
    """--learning_rate 1e6: the loss is NaN from step 2. Old code: NaN checkpoints, a NaN final LoRA, exit 0, and
    with --checkpoints_total_limit 1 the good checkpoint rotated out."""
    out = tmp_path / "nan"
    args = argv(tiny_pipeline, data, out, "--learning_rate", 1e6, "--max_train_steps", 4,
                "--checkpoints_total_limit", 1)
    line = assert_one_line_error(run(capsys, args), "step 2", "loss", "not finite", "checkpoint-1")
    assert "--learning_rate" in line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / models.LORA_WEIGHT_NAME).exists() and not (out / "final_lora").exists()
    from safetensors.torch import load_file

    assert models.lora_is_finite(load_file(out / "checkpoint-1" / models.LORA_WEIGHT_NAME))


def test_load_lora_into_refuses_non_finite_weights_naming_the_file(finished, tiny_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    weights = load_file(finished[0] / models.LORA_WEIGHT_NAME)
    assert models.lora_is_finite(weights)
    key = next(iter(weights))
    weights[key][0] = float("nan")
    save_file(weights, tmp_path / models.LORA_WEIGHT_NAME)
    assert not models.lora_is_finite(weights)
    unet = models.add_lora(UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet"), 4, 4)
    with pytest.raises(models.UserError, match="not finite") as e:
        models.load_lora_into(unet, tmp_path)
    assert str(tmp_path / models.LORA_WEIGHT_NAME) in str(e.value) and "\n" not in str(e.value)


# --- 2: rotation never leaves fewer complete checkpoints ---------------------------------------------------------
def _at_checkpoint(monkeypatch, step, action):
    """Run ``action(trainer)`` when checkpoint ``step`` is about to be written."""
    from cmdistill.train import Trainer

    real = Trainer.save_checkpoint

    def save(self):
        if self.global_step == step:
            action(self)
        return real(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save)


def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(finished, tiny_pipeline, data, tmp_path, capsys,
                                                                  monkeypatch):
    """--checkpoints_total_limit 1, interrupted inside the write of checkpoint-2 (after its LoRA file): the old code
    had already removed checkpoint-1, and the rerun started from scratch and deleted train_log.jsonl. Here the
    rerun resumes from checkpoint-1 and ends where the uninterrupted run ends."""
    out = tmp_path / "kill"
    args = argv(tiny_pipeline, data, out, "--checkpoints_total_limit", 1)
    real_save = models.save_lora

    def killed(unet, directory):
        real_save(unet, directory)
        raise KeyboardInterrupt  # the process dies here

    _at_checkpoint(monkeypatch, 2, lambda tr: monkeypatch.setattr(models, "save_lora", killed))
    with pytest.raises(KeyboardInterrupt):
        main("cm", args)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert log_steps(out) == [1, 2]
    monkeypatch.undo()
    with logs() as lines:
        code, errors, err = run(capsys, args + ["--resume_from_checkpoint", "latest"])
    assert code == 0 and not errors, err[-2000:]
    assert f"resuming from {out / 'checkpoint-1'}" in lines
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert log_steps(out) == [1, 2, 3]
    np.testing.assert_allclose(log_losses(out), log_losses(finished[0]), rtol=1e-5)


@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(tiny_pipeline, data, tmp_path, capsys,
                                                                          monkeypatch, fault):
    """The output folder turned read-only, or the disk full (a real ENOSPC: the state file is written to
    /dev/full), while checkpoint-2 is written with --checkpoints_total_limit 1. Old code: checkpoint-1 removed
    first, then a PermissionError traceback ('basic_ios::clear' for a full disk)."""
    out = tmp_path / fault
    if fault == "read-only":
        def action(tr):
            if os.geteuid() != 0:
                out.chmod(0o555)
            else:  # root writes anyway: the file system says no instead
                def mkdir(self, *a, **k):
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))

                monkeypatch.setattr(Path, "mkdir", mkdir)
        names = ["cannot write", "checkpoint-2.tmp", "permission denied", "intact"]
    else:
        real_write = Path.write_bytes

        def action(tr):
            def write_bytes(self, data):
                if self.name == "training_state.pt":
                    with open("/dev/full", "wb", buffering=0) as f:
                        return f.write(data)
                return real_write(self, data)

            monkeypatch.setattr(Path, "write_bytes", write_bytes)
        names = ["no space left on device while writing", "checkpoint-2.tmp/training_state.pt", "intact"]
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
    _at_checkpoint(monkeypatch, 2, action)
    try:
        assert_one_line_error(run(capsys, argv(tiny_pipeline, data, out, "--checkpoints_total_limit", 1)), *names)
    finally:
        out.chmod(0o755)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "checkpoint-2.tmp").exists()  # a failed write leaves no partial folder behind


def test_write_errors_from_libraries_are_classified():
    from cmdistill.errors import write_error

    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert "no space left on device while writing x.safetensors" in str(write_error(rust, "x.safetensors"))
    assert "cannot write f (read-only file system)" in str(write_error(OSError(errno.EROFS, "ro"), "f"))
    assert write_error(RuntimeError("basic_ios::clear"), "/tmp/f") is None  # plenty of space: not misreported


# --- 3 and 5: one run per folder ----------------------------------------------------------------------------------
def test_reusing_a_run_folder_without_resume_is_refused_and_touches_nothing(finished, tiny_pipeline, data, tmp_path,
                                                                            capsys, no_models):
    """Old code: the old log deleted, the first checkpoints overwritten, the later ones kept."""
    out = copy_run(finished, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = assert_one_line_error(run(capsys, argv(tiny_pipeline, data, out, "--w", 3)), "--output_dir",
                                 "already holds a run", "checkpoint-3", "--resume_from_checkpoint latest")
    assert "another --output_dir" in line
    assert before == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("change,names", [
    (["--num_discr_timesteps", 20], ["--num_discr_timesteps 10 -> 20", "--allow_config_change num_discr_timesteps"]),
    (["--w", 3, "--solver", "heun"], ["--w 9.0 -> 3.0", "--solver 'ddim' -> 'heun'", "--allow_config_change w,solver"]),
    (["--lora_rank", 8], ["--lora_rank 4 -> 8", "cannot change"]),
    (["--lora_rank", 8, "--allow_config_change", "lora_rank"], ["--lora_rank 4 -> 8", "cannot change"]),
    (["--max_train_steps", 5], ["--max_train_steps 3 -> 5", "--allow_config_change max_train_steps"]),
    (["--train_batch_size", 1], ["--global_batch_size 2 -> 1"]),
])
def test_resuming_with_other_settings_is_refused_naming_them(finished, tiny_pipeline, data, tmp_path, capsys,
                                                             no_models, change, names):
    """Old code: another N or w resumed silently and overwrote training_config.json; another rank gave a 185-line
    traceback."""
    out = copy_run(finished, tmp_path)
    config = (out / "training_config.json").read_bytes()
    line = assert_one_line_error(run(capsys, argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "latest",
                                                  *change)), "checkpoint-3", *names)
    assert "another --output_dir" in line
    assert (out / "training_config.json").read_bytes() == config


def test_allowed_and_free_changes_resume(finished, tiny_pipeline, data, tmp_path, capsys, no_models):
    out = copy_run(finished, tmp_path)
    free = ["--checkpointing_steps", 5, "--validation_steps", 7, "--dataloader_num_workers", 1,
            "--checkpoints_total_limit", 4, "--gradient_checkpointing"]
    with logs() as lines, pytest.raises(ModelsLoaded):
        main("cm", argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "latest", "--w", 3,
                        "--allow_config_change", "w", *free))
    assert any("changed settings" in line and "w 9.0 -> 3" in line for line in lines)


def test_a_finished_run_without_checkpoints_is_not_mixed_with_another(finished, tiny_pipeline, data, tmp_path,
                                                                      capsys, no_models):
    """The scripts always pass --resume_from_checkpoint latest: with no checkpoint that starts fresh, but not over
    the final LoRA of a run with other settings."""
    out = copy_run(finished, tmp_path)
    for c in out.glob("checkpoint-*"):
        shutil.rmtree(c)
    assert_one_line_error(run(capsys, argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "latest", "--w", 3)),
                          "final LoRA", "--w 9.0 -> 3.0")
    with pytest.raises(ModelsLoaded):  # the same settings: trains again from the start
        main("cm", argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "latest"))
    empty = tmp_path / "fresh"  # a new folder: latest starts fresh
    with pytest.raises(ModelsLoaded):
        main("cm", argv(tiny_pipeline, data, empty, "--resume_from_checkpoint", "latest"))


# --- corrupt checkpoints; 7: the log holds each step once ---------------------------------------------------------
@pytest.mark.parametrize("broken", ["training_state.pt", models.LORA_WEIGHT_NAME])
def test_latest_skips_an_unreadable_checkpoint_and_an_explicit_one_is_named(finished, tiny_pipeline, data, tmp_path,
                                                                            capsys, no_models, broken):
    out = copy_run(finished, tmp_path)
    f = out / "checkpoint-3" / broken
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # cut by a crash
    assert_one_line_error(run(capsys, argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "checkpoint-3")),
                          str(f), "unreadable")
    with logs() as lines, pytest.raises(ModelsLoaded):
        main("cm", argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "latest"))
    warned = [line for line in lines if "unreadable" in line]
    assert len(warned) == 1 and str(f) in warned[0] and "resuming from the previous checkpoint, checkpoint-2" in warned[0]


def test_a_resumed_run_logs_each_step_once(finished, tiny_pipeline, data, tmp_path, capsys):
    """A run stopped after logging step 3 with its last checkpoint at step 2: the resumed run logs step 3 once
    (old code: twice), with the loss of the uninterrupted run."""
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-3")
    (out / models.LORA_WEIGHT_NAME).unlink()
    assert log_steps(out) == [1, 2, 3]
    code, errors, err = run(capsys, argv(tiny_pipeline, data, out, "--resume_from_checkpoint", "latest"))
    assert code == 0 and not errors, err[-2000:]
    assert log_steps(out) == [1, 2, 3]
    np.testing.assert_allclose(log_losses(out), log_losses(finished[0]), rtol=1e-5)
    assert (out / models.LORA_WEIGHT_NAME).is_file()


# --- 4: empty and long captions, tiny images ------------------------------------------------------------------------
def test_empty_and_long_captions_are_kept_counted_and_said_once(finished, data):
    """Caption 0 is empty and among the validation prompts (old code: trained as "None", and the validation at
    step 3 crashed in the tokenizer)."""
    out, lines = finished
    assert log_steps(out) == [1, 2, 3] and (out / models.LORA_WEIGHT_NAME).is_file()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert [line for line in lines if "empty" in line] == ['1 of 6 captions are empty: they are kept as empty '
                                                          'prompts ("")']
    assert [line for line in lines if "longer than 77 tokens" in line] == [
        "1 of 6 captions are longer than 77 tokens: truncated to 77, as SDXL's text encoders do"]
    from cmdistill.data import SDXLImageCaptions, caption_text, load_caption_dataset

    ds = SDXLImageCaptions(load_caption_dataset(str(data)), resolution=64)
    assert ds[(0, 0, 0)]["caption"] == "" and ds[(0, 1, 1)]["caption"] == LONG_CAPTION
    assert [caption_text(v) for v in (None, float("nan"), "", "a cat", 3)] == ["", "", "", "a cat", "3"]


def test_images_under_8_px_are_skipped_and_counted(tmp_path):
    from cmdistill.data import SDXLImageCaptions, load_caption_dataset

    folder = make_image_folder(tmp_path / "tiny", n=2)
    Image.new("RGB", (1, 1)).save(folder / "0.png")
    ds = SDXLImageCaptions(load_caption_dataset(str(folder)), resolution=64)
    with pytest.warns(UserWarning, match="1x1 px, under the 8 px minimum"):
        item = ds[(0, 0, 0)]
    assert item["skipped"] == 1 and item["pixel_values"].shape == (3, 64, 64)


# --- 8: the precompute key covers the images' bytes -------------------------------------------------------------------
def test_precompute_key_changes_when_same_size_images_are_swapped(tmp_path):
    from cmdistill.data import load_caption_dataset
    from cmdistill.precompute import data_fingerprint

    folder = tmp_path / "swap"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.bmp", "b.bmp"):  # BMP: the same size in bytes for the same dimensions
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    (folder / "metadata.csv").write_text("file_name,text\na.bmp,one\nb.bmp,two\n")
    assert (folder / "a.bmp").stat().st_size == (folder / "b.bmp").stat().st_size
    before = data_fingerprint(load_caption_dataset(str(folder)), "image", "text")
    os.replace(folder / "a.bmp", folder / "t.bmp")
    os.replace(folder / "b.bmp", folder / "a.bmp")
    os.replace(folder / "t.bmp", folder / "b.bmp")
    assert data_fingerprint(load_caption_dataset(str(folder)), "image", "text") != before
