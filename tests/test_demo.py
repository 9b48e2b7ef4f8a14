"""The demo on a minimal toy world: all four programs end to end (precompute, test_teacher.py,
train_cm.py, train_direct_cm.py, test.py), the table and the picture. Plumbing only: the world is
far too small for its numbers to mean anything."""

import json

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
    # A rerun reuses everything: no training step runs again.
    log_before = (out / "cm_seed0" / "train_log.jsonl").read_text()
    main(["--world", str(small_world), "--out", str(out), "--seeds", "0", "1", "--max_train_steps", "2",
          "--train_batch_size", "4", "--num_prompts", "8", "--num_discr_timesteps", "10",
          "--num_inference_steps", "1", "2", "--lora_rank", "4"])
    assert (out / "cm_seed0" / "train_log.jsonl").read_text() == log_before
