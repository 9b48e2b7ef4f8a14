"""The toy world: a deterministic data generator, a caption grammar that round-trips, a reduced build
that loads as an SDXL teacher, toy metric encoders that see what is in an image, and a trained teacher
that scores far better on them than an untrained one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmdistill.toy import data as D


# ------------------------------------------------------------------------------------ data --

def test_same_seed_same_bytes(tmp_path):
    a = D.write_dataset(tmp_path / "a", seed=3, num_images=24)
    b = D.write_dataset(tmp_path / "b", seed=3, num_images=24)
    c = D.write_dataset(tmp_path / "c", seed=4, num_images=24)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 24 + 2
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / "metadata.csv").read_bytes() != (c / "metadata.csv").read_bytes()
    # Any prefix is the same whatever the number of images (images are functions of (seed, index)).
    short = D.write_dataset(tmp_path / "short", seed=3, num_images=5)
    assert (short / "000004.png").read_bytes() == (a / "000004.png").read_bytes()


def test_metadata_is_laion_layout(tmp_path):
    folder = D.write_dataset(tmp_path / "d", seed=0, num_images=10)
    header = (folder / "metadata.csv").read_text().splitlines()[0]
    assert header == "file_name,text"
    paths, captions, labels = D.read_dataset(folder)
    imgs = D.load_images(paths)
    assert imgs.shape == (10, 64, 64, 3) and imgs.dtype == np.uint8
    for cap, lab in zip(captions, labels):
        named = D.parse_caption(cap)
        assert all(lab[k] == v for k, v in named.items())


def test_caption_attribute_round_trip():
    seen_partial = 0
    for i in range(2000):
        s = D.sample_scene(0, i)
        named = D.parse_caption(D.caption(s))
        expect = {k: v for k, v in s.labels().items()
                  if (k != "size" or s.name_size) and (k != "background" or s.name_background)}
        assert named == expect
        seen_partial += len(named) < len(D.ATTRIBUTES)
    assert 0 < seen_partial < 2000           # some captions leave out size or background
    # Every value of every attribute, every position phrase (e.g. 'at the top' vs 'at the top left').
    for pos in D.POSITIONS:
        for size in D.SIZES:
            s = D.Scene("cross", "purple", pos, size, "gray", 0, 0, 1, (0, 0, 0), True, True)
            assert D.parse_caption(D.caption(s)) == s.labels()
    for bad in ("a red cat on a sofa", "a red circle", "a red circle at the middle"):
        with pytest.raises(ValueError):
            D.parse_caption(bad)


def test_attributes_are_balanced_and_visible():
    scenes = [D.sample_scene(0, i) for i in range(3000)]
    for k, values in D.ATTRIBUTES.items():
        counts = np.array([sum(getattr(s, k) == v for s in scenes) for v in values])
        assert counts.min() > 0.6 * counts.mean(), (k, counts)
    # The shape is drawn where the caption says: its pixels differ from the background there.
    s = D.Scene("square", "red", "bottom right", "small", "white", 0, 0, 1, (0, 0, 0), True, True)
    img = np.asarray(D.render(s)).astype(int)
    assert (img[51, 51] - np.array(D.COLOURS["red"])).__abs__().max() < 10
    assert (img[12, 12] - np.array(D.BACKGROUNDS["white"])).__abs__().max() < 2


# ---------------------------------------------------------------------- the reduced world --

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on a shared 2-core machine, two OpenMP threads per process
    run these small networks up to ten times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The test world: the reduced world (``--reduced``: the same data, encoder, VAE and teacher) with a smaller
# evidence stage (64 captions at w = 1 and 3 instead of 128 at w = 1, 3 and 9: under half of its time) that
# shows the same. The same settings as flags of ``python -m cmdistill.toy build --reduced``, for the CLI test.
SMALLER = dict(eval_num=64, eval_ws=(1.0, 3.0))
SMALLER_FLAGS = ["--eval_num", "64", "--eval_ws", "1", "3"]


def world_config(**kw):
    from cmdistill.toy.__main__ import REDUCED
    from cmdistill.toy.build import BuildConfig

    return BuildConfig(**{**REDUCED, **SMALLER, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The test world, built once for this module."""
    from cmdistill.toy.build import build

    out = tmp_path_factory.mktemp("toy") / "world"
    record = build(out, world_config(threads=1), log=lambda m: None)
    return out, record


def test_reduced_build_loads_as_sdxl_teacher(world):
    from cmdistill.models import encode_prompts, load_teacher
    from cmdistill.toy.build import build

    out, record = world
    assert set(record["stage_seconds"]) == {"data", "encoder", "vae", "teacher", "eval"}
    teacher = load_teacher(str(out / "teacher"))
    assert teacher.unet.config.addition_embed_type == "text_time"
    assert teacher.scheduler.config.num_train_timesteps == 1000 and teacher.scheduler.config.beta_schedule == "scaled_linear"
    assert teacher.scheduler.config.prediction_type == "epsilon"
    assert 2 ** (len(teacher.vae.config.block_out_channels) - 1) == 8
    # scaling_factor was fitted: scaled latents of real images have about unit std.
    paths, caps, _ = D.read_dataset(out / "data" / "train")
    from cmdistill.toy.teacher import encode_posterior

    mean, _ = encode_posterior(teacher.vae, D.load_images(paths[:128]))
    assert 0.7 < float((mean * teacher.vae.config.scaling_factor).std()) < 1.3
    # The frozen random text encoders tell captions apart.
    pe, po = encode_prompts(caps[:2] + caps[:1], teacher.tokenizers, teacher.text_encoders)
    assert torch.equal(pe[0], pe[2]) and (pe[0] - pe[1]).abs().max() > 1e-2
    # A rerun skips every stage; other settings are refused rather than mixed in.
    from cmdistill.errors import UserError
    from cmdistill.toy.__main__ import REDUCED

    again = build(out, world_config(), log=lambda m: None)
    assert again["total_seconds_this_run"] < 5
    with pytest.raises(UserError, match="other settings"):
        build(out, world_config(teacher_steps=REDUCED["teacher_steps"] + 1), log=lambda m: None)


def test_toy_encoder_sees_real_images(world):
    from cmdistill.toy.encoders import attribute_accuracy, caption_accuracy, load_encoder

    out, _ = world
    enc = load_encoder(out / "encoder")
    paths, caps, labels = D.read_dataset(out / "data" / "holdout")
    imgs = D.load_images(paths)
    acc = attribute_accuracy(enc, imgs, labels)
    assert min(acc.values()) > 0.85, acc
    assert caption_accuracy(enc, imgs, caps).mean() > 0.9
    # Wrong captions score low: shuffle captions across images.
    rolled = caps[1:] + caps[:1]
    assert caption_accuracy(enc, imgs, rolled).mean() < 0.6


def test_trained_teacher_beats_untrained(world):
    """What is robust after a few hundred CPU steps: the denoising loss on real latents, and the scale of
    the sampled latents (an untrained UNet's DDIM samples blow up to ~15x the data's std)."""
    out, _ = world
    ev = json.loads((out / "eval.json").read_text())
    assert ev["denoising_mse"]["trained"] < 0.3 * ev["denoising_mse"]["untrained"], ev["denoising_mse"]
    real_std = ev["vae_reconstruction"]["latent_std"]
    for w, r in ev["trained"].items():
        assert 0.5 < r["latent_std"] / real_std < 2.5, (w, r, real_std)
    for w, r in ev["untrained"].items():
        assert r["latent_std"] > 5 * real_std, (w, r, real_std)


FULL_WORLD = Path(__file__).resolve().parents[1] / "toy" / "world"


@pytest.mark.skipif(not (FULL_WORLD / "teacher" / "model_index.json").is_file()
                    or not (FULL_WORLD / "encoder" / "toy_encoder.safetensors").is_file(),
                    reason="the full toy world is not built (python -m cmdistill.toy build --out toy/world)")
def test_full_world_teacher_scores_on_toy_metrics():
    """The committed full build: the trained teacher's DDIM samples score far better on the toy metrics
    than an untrained UNet's, and guidance w > 1 raises caption accuracy over w = 1."""
    from cmdistill.models import load_teacher
    from cmdistill.toy.encoders import encoder_outputs, load_encoder
    from cmdistill.toy.evaluate import sample_teacher, toy_scores
    from cmdistill.toy.teacher import teacher_components

    n = 96
    teacher = load_teacher(str(FULL_WORLD / "teacher"))
    enc = load_encoder(FULL_WORLD / "encoder")
    captions = [D.caption(D.sample_scene(0, i)) for i in range(n)]
    real, _, _ = D.make_images(0, n)
    ref, _ = encoder_outputs(enc, real)
    scores = {}
    for w in (1.0, 3.0):
        _, imgs = sample_teacher(teacher, captions, w, N=10)  # N = 10, as the demo's teacher
        scores[w] = toy_scores(enc, imgs, captions, ref)
    _, imgs = sample_teacher(teacher, captions, 1.0, N=10, unet=teacher_components(0)["unet"])
    untrained = toy_scores(enc, imgs, captions, ref)
    assert scores[1.0]["toy_caption_acc"] > untrained["toy_caption_acc"] + 0.2, (scores, untrained)
    assert scores[1.0]["fd_toy"] < 0.3 * untrained["fd_toy"], (scores, untrained)
    assert scores[3.0]["toy_caption_acc"] > scores[1.0]["toy_caption_acc"], scores


def test_cli_resumes_a_built_world(world, capsys):
    from cmdistill.toy.__main__ import main

    out, _ = world
    assert main(["build", "--out", str(out), "--reduced", *SMALLER_FLAGS]) == 0  # explicit flags win over --reduced
    text = capsys.readouterr().out
    assert text.count("skipped") == 5


def test_compute_metrics_with_toy_encoder(world, tmp_path, monkeypatch):
    metrics = pytest.importorskip("cmdistill.metrics")
    import cmdistill.toy.encoders  # noqa: F401  (registers "toy" and "toy_caption_acc")

    out, _ = world
    monkeypatch.setenv("CMDISTILL_TOY_ENCODER", str(out / "encoder"))
    monkeypatch.setenv("CMDISTILL_METRICS_WORKERS", "0")
    paths, caps, _ = D.read_dataset(out / "data" / "holdout")
    ref, _, _ = D.read_dataset(out / "data" / "train")
    res = metrics.compute_metrics([str(p) for p in paths[:100]], [str(p) for p in ref[:100]], caps[:100],
                                  dgm_models=("toy",), instance_metrics=("toy_caption_acc",))
    assert set(res) == {"fd_toy", "toy_caption_acc"}
    assert res["toy_caption_acc"] > 0.9 and res["fd_toy"] >= 0


def test_toy_features_are_known_by_the_encoder_weights_not_their_folder(world, tmp_path):
    """The toy extractor's identity (which keys stored instance features and reference caches) follows the weights'
    bytes: a copy of the encoder folder elsewhere gives the same identity, other weights another."""
    import shutil

    from cmdistill.toy.encoders import ENCODER_WEIGHTS, toy_feature_extractor

    out, _ = world
    moved = shutil.copytree(out / "encoder", tmp_path / "moved" / "encoder")
    same = toy_feature_extractor(weights_dir=str(out / "encoder")).identity
    assert toy_feature_extractor(weights_dir=str(moved)).identity == same
    data = bytearray((moved / ENCODER_WEIGHTS).read_bytes())
    data[-1] ^= 1
    (moved / ENCODER_WEIGHTS).write_bytes(bytes(data))
    assert toy_feature_extractor(weights_dir=str(moved)).identity != same


def test_every_call_runs_with_the_workers_threads(tmp_path, monkeypatch):
    """A program that sets its own torch threads (the toy world's build: 2) does not leave them to the next call
    of the same worker: two workers of one thread each would otherwise run three threads on two cores (the demo's
    trainings ran ~3x slower after the world's build)."""
    from cmdistill.toy.runner import Call, Workers

    (tmp_path / "sets_threads.py").write_text("import torch\ntorch.set_num_threads(2)\n")
    (tmp_path / "reports_threads.py").write_text(
        "import sys, torch\nopen(sys.argv[1], 'w').write(str(torch.get_num_threads()))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = torch.get_num_threads()
    try:
        with Workers(0, threads=1) as pool:
            pool.submit([Call("-m sets_threads", [], tmp_path / "a.log"),
                         Call("-m reports_threads", [tmp_path / "threads.txt"], tmp_path / "b.log")]).result()
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "threads.txt").read_text() == "1"
