"""Precomputed latents and text embeddings give the same training steps as encoding on the fly.

In-process (``cmdistill.precompute.main``, ``cmdistill.train.main``: the programs' own entry points, without an
interpreter start-up each); the scripts' command lines are run end to end by tests/test_demo.py."""

import json

import numpy as np
import pytest

from test_faults import logs
from test_train import common, losses, make_image_folder


@pytest.fixture(scope="module")
def setup(tiny_pipeline, tmp_path_factory):
    base = tmp_path_factory.mktemp("pre")
    return tiny_pipeline, make_image_folder(base / "data", n=5), base / "cache"


def precompute(teacher, data, cache, *extra):
    from cmdistill.precompute import main

    main(["--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data), "--resolution", "64",
          "--precomputed_dir", str(cache), *map(str, extra)])


def train(objective, *args) -> str:
    """train_<objective>.py in-process; returns its log lines (cmdistill's logger, INFO and above)."""
    from cmdistill.train import main

    with logs() as lines:
        main(objective, [str(a) for a in args])
    return "\n".join(lines)


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
    on = train("direct_cm", *common(teacher, data, tmp_path / "on", *extra))
    off = train("direct_cm", *common(teacher, data, tmp_path / "off", *extra, "--no_precomputed"))
    assert "using precomputed" in on and "using precomputed" not in off
    np.testing.assert_allclose(losses(tmp_path / "on"), losses(tmp_path / "off"), rtol=1e-4)

    other = train("cm", *common(teacher, data, tmp_path / "res", *extra, "--center_crop"))
    assert "no precomputed latents" in other  # another crop policy: the cache does not apply
