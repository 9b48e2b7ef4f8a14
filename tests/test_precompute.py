"""Precomputed latents and text embeddings give the same training steps as encoding on the fly."""

import json
import subprocess
import sys

import numpy as np
import pytest

from test_train import ROOT, common, losses, make_image_folder, run_script


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cmdistill.tiny import build_tiny_pipeline

    base = tmp_path_factory.mktemp("pre")
    return build_tiny_pipeline(base / "teacher"), make_image_folder(base / "data", n=5), base / "cache"


def precompute(teacher, data, cache, *extra):
    r = subprocess.run([sys.executable, "-m", "cmdistill.precompute", "--pretrained_teacher_model", str(teacher),
                        "--train_data_dir", str(data), "--resolution", "64", "--precomputed_dir", str(cache),
                        *map(str, extra)], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_training_on_the_cache_equals_training_without_it(setup, tmp_path):
    teacher, data, cache = setup
    precompute(teacher, data, cache)
    [folder] = list(cache.iterdir())
    shard = next(folder.glob("shard-*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    (folder / "meta.json").unlink()  # an interrupted precompute: the finished shard is kept
    precompute(teacher, data, cache)
    assert shard.stat().st_mtime_ns == mtime and json.loads((folder / "meta.json").read_text())["num_samples"] == 5

    extra = ("--max_train_steps", 2, "--validation_steps", 0, "--report_to", "none", "--checkpointing_steps", 0,
             "--precomputed_dir", cache, "--solver", "euler")
    on = run_script("train_direct_cm.py", *common(teacher, data, tmp_path / "on", *extra))
    off = run_script("train_direct_cm.py", *common(teacher, data, tmp_path / "off", *extra, "--no_precomputed"))
    assert "using precomputed" in on.stderr and "using precomputed" not in off.stderr
    np.testing.assert_allclose(losses(tmp_path / "on"), losses(tmp_path / "off"), rtol=1e-4)

    other = run_script("train_cm.py", *common(teacher, data, tmp_path / "res", *extra, "--center_crop"))
    assert "no precomputed latents" in other.stderr  # another crop policy: the cache does not apply
