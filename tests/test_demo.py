"""The demo and the toy sweep on a minimal toy world: all four programs end to end (precompute, test_teacher.py,
train_cm.py, train_direct_cm.py, test.py) in worker processes and in this one, the table, the picture, the
sweep's files and report. Plumbing only: the world is far too small for its numbers to mean anything."""

import json
import logging
import shlex
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from cmdistill.toy.build import BuildConfig, build

    world = tmp_path_factory.mktemp("world") / "w"
    # One torch thread: two OpenMP threads on a busy 2-core machine run these small networks several times slower.
    build(world, BuildConfig(num_images=96, num_holdout=32, vae_steps=5, vae_batch_size=16, encoder_steps=5,
                             teacher_steps=5, batch_size=16, eval_num=0, threads=1), log=lambda *a: None)
    return world


def test_demo_runs_the_whole_study(small_world, tmp_path):
    from cmdistill.demo import main

    out = tmp_path / "demo"
    main(["--world", str(small_world), "--out", str(out), "--seeds", "0", "1", "--max_train_steps", "2",
          "--train_batch_size", "4", "--num_prompts", "8", "--num_discr_timesteps", "10",
          "--num_inference_steps", "1", "2", "--lora_rank", "4"])
    report = (out / "RESULTS.md").read_text()
    for row in ("| Teacher (DDIM, N=10, w=3.0) | 10 |", "| CM | 1 |", "| CM | 2 |", "| Direct CM | 1 |",
                "| Direct CM | 2 |"):
        assert row in report
    assert "±" in report and "| CM | 1 | 2 |" in report  # two seeds: a spread, and how many
    for col in ("toy FD", "caption acc.", "ODE error", "pixel MSE"):
        assert col in report.splitlines()[0]
    assert "ode_error_vs_fd.png" in report and (out / "ode_error_vs_fd.png").stat().st_size > 1000
    assert (out / "table.md").is_file() and (out / "loss.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]["CM|1"]) == 2 and all(r["ode_error"] >= 0 for r in res["rows"]["Direct CM|2"])
    assert any("ODE error" in line for line in res["verdict"])
    from PIL import Image

    pic = Image.open(out / "comparison.png")
    assert 5 * 98 < pic.height < 5 * 98 + 100  # teacher + CM and Direct CM at 1 and 2 steps, captions below
    assert "program seconds" in report and "total:" in report and set(res["seconds"]) >= {
        "precompute", "teacher", "train_cm_0", "eval_direct_cm_1"}
    # A rerun (here in this process) reuses everything: no training step runs again, the same numbers.
    log_before = (out / "cm_seed0" / "train_log.jsonl").read_text()
    main(["--world", str(small_world), "--out", str(out), "--seeds", "0", "1", "--max_train_steps", "2",
          "--train_batch_size", "4", "--num_prompts", "8", "--num_discr_timesteps", "10",
          "--num_inference_steps", "1", "2", "--lora_rank", "4", "--workers", "0"])
    assert (out / "cm_seed0" / "train_log.jsonl").read_text() == log_before
    def numbers(rows):
        return {k: [(r.get("lora_sha256"), r.get("ode_error"), r["fd_toy"], r["toy_caption_acc"]) for r in v]
                for k, v in rows.items()}

    assert numbers(json.loads((out / "results.json").read_text())["rows"]) == numbers(res["rows"])
    assert "train_cm_0" not in json.loads((out / "results.json").read_text())["seconds"]


def _cell_metrics(folder):
    return {r["num_inference_steps"]: r for r in json.loads((folder / "metrics.json").read_text()).values()}


def test_toy_sweep_runs_skips_reproduces_and_reports(small_world, tmp_path, capsys, caplog):
    from cmdistill.toy.study import main, report_main

    out, res, doc = tmp_path / "work", tmp_path / "results", tmp_path / "docs" / "toy_study.md"
    def flags(budget=2):
        return ["--world", str(small_world), "--out", str(out), "--results", str(res), "--only", "budget",
                "--budgets", str(budget), "--seeds", "0", "--num_inference_steps", "1", "2", "--num_prompts", "8",
                "--lora_rank", "4", "--train_batch_size", "4"]

    main(flags() + ["--workers", "2", "--checkpoint_every", "1"])
    cells = ["cm_b2_N10_w3_s0", "direct_cm_b2_N10_w3_s0"]
    for cell in cells:
        m = _cell_metrics(res / "cells" / cell)
        assert set(m) == {1, 2} and all(m[k]["num_images"] == 8 and m[k]["ode_error"] >= 0 and "fd_toy" in m[k]
                                        and "toy_caption_acc" in m[k] for k in m)
        info = json.loads((res / "cells" / cell / "cell.json").read_text())
        assert info["command"].endswith(f"--cell {cell}") and len(info["programs"]) == 2
    csv_lines = (res / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("Model,Steps,Seeds") and len(csv_lines) == 1 + 1 + 4  # teacher + 2 x 2 steps
    summary = json.loads((res / "sweep.json").read_text())
    assert {(e["method"], e["steps"], e["budget"]) for e in summary if e["kind"] != "teacher"} == {
        ("cm", 1, 2), ("cm", 2, 2), ("direct_cm", 1, 2), ("direct_cm", 2, 2)}
    png = res / "b2_N10_w3" / "ode_error_vs_fd.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    # A second invocation skips the finished cells: nothing is trained or evaluated again.
    before = {c: (res / "cells" / c / "metrics.json").read_text() for c in cells}
    capsys.readouterr()
    main(flags() + ["--workers", "0"])
    assert "2 finished" in capsys.readouterr().out
    main(flags(budget=3) + ["--budgets", "2", "3", "--dry_run", "cuda"])  # lists the cells, runs nothing
    listed = capsys.readouterr().out
    assert "cm_b2_N10_w3_s0" in listed and "finished" in listed and "direct_cm_b3_N10_w3_s0" in listed
    assert "4 cells, 2 finished" in listed and not (out / "cells" / "cm_b3_N10_w3_s0").exists()
    assert {c: (res / "cells" / c / "metrics.json").read_text() for c in cells} == before

    # A time limit starts no cell that cannot finish in it.
    main(flags(budget=3) + ["--workers", "0", "--time_limit_s", "1"])
    assert "stopping here" in capsys.readouterr().out and not (res / "cells" / "cm_b3_N10_w3_s0").exists()

    # The cell's recorded training command, run as a process of its own, trains the same LoRA weights (the file's
    # bytes may differ: safetensors writes its metadata keys in a per-process hash order), and so it does without
    # the checkpoint the sweep saved after every step (of which it kept the latest).
    info = json.loads((res / "cells" / cells[1] / "cell.json").read_text())
    train = shlex.split(info["programs"][0])
    python = train.index("python")
    env = dict(a.split("=", 1) for a in train[:python])
    argv = [sys.executable, *train[python + 1:]]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "again")
    assert argv[argv.index("--checkpointing_steps") + 1] == "1"
    assert sorted(p.name for p in (out / "cells" / cells[1]).glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    argv[argv.index("--checkpointing_steps") + 1] = "0"
    subprocess.run(argv, check=True, env={**os.environ, **env}, cwd=str(Path(__file__).parents[1]),
                   capture_output=True)
    from safetensors.torch import load_file

    lora = "pytorch_lora_weights.safetensors"
    again, before = load_file(tmp_path / "again" / lora), load_file(out / "cells" / cells[1] / lora)
    assert sorted(again) == sorted(before) and all(bool((again[k] == before[k]).all()) for k in again)

    # A run stopped after its first checkpoint (no final weights, no later checkpoint, no scores) resumes from it
    # and trains the same weights (CM resumes exactly).
    run = out / "cells" / cells[0]
    trained_before = load_file(run / lora)
    for f in (run / lora, run / "metrics.json"):
        f.unlink()
    shutil.rmtree(run / "checkpoint-2")
    shutil.rmtree(res / "cells" / cells[0])
    with caplog.at_level(logging.INFO):  # the program runs in this process (--workers 0), its log records here
        main(flags() + ["--workers", "0", "--checkpoint_every", "1"])
    assert f"resuming from {run / 'checkpoint-1'}" in caplog.text
    again = load_file(run / lora)
    assert all(bool((again[k] == trained_before[k]).all()) for k in trained_before)
    assert _cell_metrics(res / "cells" / cells[0]).keys() == {1, 2}

    # The report states each half from the numbers: where Direct CM's ODE error is lower, where its samples worse.
    report_main(["--results", str(res), "--doc", str(doc)])
    text = doc.read_text()
    cm, dcm = _cell_metrics(res / "cells" / cells[0]), _cell_metrics(res / "cells" / cells[1])
    lower = sum(dcm[k]["ode_error"] < cm[k]["ode_error"] for k in (1, 2))
    worse_fd = sum(dcm[k]["fd_toy"] > cm[k]["fd_toy"] for k in (1, 2))
    assert f"ODE error is lower than CM's.** On the seed mean it holds in {lower} of 2" in text
    assert f"toy FD is worse (higher) than CM's.** On the seed mean it holds in {worse_fd} of 2" in text
    assert "| CM | 1 | 1 |" in text and "b2_N10_w3/ode_error_vs_fd.png" in text
    # Swapped numbers give the opposite statement.
    for k in (1, 2):
        cm[k]["ode_error"], dcm[k]["ode_error"] = dcm[k]["ode_error"], cm[k]["ode_error"]
    for cell, m in ((cells[0], cm), (cells[1], dcm)):
        (res / "cells" / cell / "metrics.json").write_text(json.dumps({f"student/final/{k}_steps": r
                                                                       for k, r in m.items()}))
    report_main(["--results", str(res), "--doc", str(doc)])
    assert f"On the seed mean it holds in {2 - lower} of 2" in doc.read_text()

    # Cells run again on another device: the report sets their numbers side by side and says whether Direct CM
    # against CM goes the same way on both.
    check = res / "device_check" / "cells"
    for cell in cells:
        shutil.copytree(res / "cells" / cell, check / cell)
        info = json.loads((check / cell / "cell.json").read_text())
        (check / cell / "cell.json").write_text(json.dumps({**info, "device": "cuda (a GPU)"}))
    m = _cell_metrics(check / cells[0])
    m[1]["fd_toy"] *= 1.1
    # CM's ODE error at 1 step moves to the other side of Direct CM's: that comparison turns on the other device.
    m[1]["ode_error"] = dcm[1]["ode_error"] * (0.5 if dcm[1]["ode_error"] < m[1]["ode_error"] else 2)
    (check / cells[0] / "metrics.json").write_text(json.dumps({f"student/final/{k}_steps": r for k, r in m.items()}))
    report_main(["--results", str(res), "--doc", str(doc)])
    text = doc.read_text()
    assert "## Same cells on two devices" in text and "toy FD 10 %, caption acc. 0 %" in text
    assert f"| {cells[0]} | cpu / cuda (a GPU) | 1 | {cm[1]['fd_toy']:.4g} / {1.1 * cm[1]['fd_toy']:.4g} |" in text
    fd_turns = (dcm[1]["fd_toy"] > cm[1]["fd_toy"]) != (dcm[1]["fd_toy"] > 1.1 * cm[1]["fd_toy"])
    assert f"goes the same way on both devices in {5 - fd_turns} of 6 comparisons" in text
    assert "Devices:" not in text  # every cell of the study itself ran on one device
    # A study whose cells ran on two devices names the cells off the first.
    info = json.loads((res / "cells" / cells[1] / "cell.json").read_text())
    (res / "cells" / cells[1] / "cell.json").write_text(json.dumps({**info, "device": "cuda (a GPU)"}))
    report_main(["--results", str(res), "--doc", str(doc)])
    text = doc.read_text()
    assert f"Devices: 1 cell ran on cpu; on cuda (a GPU): {cells[1]}." in text
    assert f"Not compared: {cells[1]} (the same device)." in text
    assert "(1 on cpu, 1 on cuda (a GPU))" in text
