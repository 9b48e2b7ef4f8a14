"""Progress in log files: plain lines, no carriage returns (a tqdm bar only on a terminal), no library bars."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from cmdistill.progress import Progress, track

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal_and_a_bar_on_one():
    out = io.StringIO()
    p = Progress(20, "cm steps", "step", stream=out)
    for i in range(20):
        p.update(1, loss=f"{1 / (i + 1):.3g}")
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # One line a tenth of the work, with the latest loss and the pace.
    assert [line.split()[2] for line in lines] == [f"{k}/20" for k in range(2, 21, 2)]
    assert re.fullmatch(r"cm steps 20/20 loss 0\.05 [\d.]+ (s/step|step/s)", lines[-1]), lines[-1]

    out = io.StringIO()
    assert list(track(range(3), "shards", "shard", stream=out)) == [0, 1, 2]
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]
    # Fractions of a batch (a sampler's steps) that add up to a float near the count: one line per tenth.
    out = io.StringIO()
    p = Progress(8, "teacher", "img", stream=out)
    for _ in range(10):
        p.update(8 / 10)
    p.update(8 - p.n)  # the batch counted whole
    p.close()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == [
        "0.8/8", "1.6/8", "2.4/8", "3.2/8", "4/8", "4.8/8", "5.6/8", "6.4/8", "7.2/8", "8/8"]
    quiet = io.StringIO()
    p = Progress(5, "hidden", stream=quiet, enabled=False)
    p.update(5)
    p.close()
    assert quiet.getvalue() == ""

    tty = Terminal()
    p = Progress(4, "cm steps", "step", stream=tty)
    p.update(4, loss="0.1")
    p.close()
    assert "\r" in tty.getvalue() and "cm steps" in tty.getvalue()  # tqdm's bar


def test_a_training_log_file_has_plain_progress_lines(tiny_pipeline, tiny_image_folder, tmp_path):
    log = tmp_path / "train.log"
    args = ["--pretrained_teacher_model", tiny_pipeline, "--train_data_dir", tiny_image_folder, "--output_dir",
            tmp_path / "run", "--resolution", 64, "--train_batch_size", 2, "--num_discr_timesteps", 10,
            "--lora_rank", 4, "--lora_alpha", 4, "--report_to", "none", "--max_train_steps", 4,
            "--validation_steps", 0]
    # A fresh datasets cache: the image folder is prepared (a bar of its own, once) in this run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(ROOT / "train_cm.py"), *map(str, args)], stdout=f,
                           stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = log.read_bytes().decode()  # read_text would turn each carriage return into a newline
    assert r.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert "Generating train split" not in text and "Loading weights" not in text  # datasets', transformers' bars
    steps = re.findall(r"^cm steps (\d)/4 loss \S+ [\d.]+ (?:s/step|step/s)$", text, re.M)
    assert steps == ["1", "2", "3", "4"], text[-3000:]
