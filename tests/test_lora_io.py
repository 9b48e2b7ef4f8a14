"""What a training run leaves behind, used outside this project: LoRA files that stock diffusers and PEFT load
with the trained scale, the sampler as a stock diffusers scheduler, the model card, and no secret anywhere."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch

from cmdistill import hub, models
from cmdistill.errors import UserError
from conftest import TINY_CAPTIONS

FAKE_TOKEN = "hf_" + "Zq9" * 12  # the shape of a real token, never valid
RES, N, SEED = 64, 10, 24
SHAPE = (4, RES // 8, RES // 8)


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tiny_image_folder, tmp_path_factory):
    """A 2-step CM run (rank 4, alpha 16: scale 4) given --hub_token and --push_to_hub, with the hub calls
    replaced by recorders: (trainer, output folder, recorded hub calls)."""
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer, validate_args

    import huggingface_hub

    out = tmp_path_factory.mktemp("lora_run") / "cm"
    calls = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub, "create_repo",
               lambda repo_id, **kw: calls.setdefault("create_repo", {"repo_id": repo_id, **kw}) and
               huggingface_hub.RepoUrl(f"https://huggingface.co/me/{repo_id}"))
    mp.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload_folder", kw))
    argv = ["--pretrained_teacher_model", tiny_pipeline, "--train_data_dir", tiny_image_folder, "--output_dir", out,
            "--resolution", RES, "--train_batch_size", 2, "--num_discr_timesteps", N, "--lora_rank", 4,
            "--lora_alpha", 16, "--learning_rate", 1e-3, "--max_train_steps", 2, "--checkpointing_steps", 1,
            "--validation_steps", 0, "--report_to", "tensorboard", "--hub_token", FAKE_TOKEN, "--push_to_hub",
            "--push_logs"]
    args = training_parser("cm").parse_args([str(a) for a in argv])
    validate_args(args)
    tr = Trainer(args, "cm")
    tr.train()
    mp.undo()
    return tr, out, calls


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, *SHAPE, generator=g), torch.tensor([999, 300]),
            dict(encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                 added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                    "time_ids": torch.tensor([[RES, RES, 0, 0, RES, RES]] * 2, dtype=torch.float32)}))


@torch.no_grad()
def unet_out(unet):
    x, t, kw = unet_inputs()
    return unet(x, t, **kw).sample


def test_no_token_on_disk_in_trackers_or_uploads(trained):
    _, out, calls = trained
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in files) and (out / "checkpoint-2").is_dir()
    leaks = [str(p.relative_to(out)) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"the token is written in {leaks}"
    assert json.loads((out / "training_config.json").read_text())["hub_token"] == hub.REDACTED
    assert json.loads((out / "checkpoint-1" / "training_config.json").read_text())["hub_token"] == hub.REDACTED
    hparams = list(out.rglob("hparams.yml"))
    assert hparams and f"hub_token: {hub.REDACTED}" in hparams[0].read_text()  # the tracker got the config

    # The push: a private repository, the token handed to the hub client only, exactly the final files + logs.
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["token"] == FAKE_TOKEN
    up = calls["upload_folder"]
    assert up["token"] == FAKE_TOKEN and up["repo_id"] == "me/cm" and calls["create_repo"]["repo_id"] == "cm"
    uploaded = set(up["allow_patterns"])
    final = {"pytorch_lora_weights.safetensors", "README.md", "peft/adapter_config.json",
             "peft/adapter_model.safetensors", "scheduler/scheduler_config.json"}
    assert final | {"train_log.jsonl"} <= uploaded
    assert all(f in final or f == "train_log.jsonl" or f.startswith("logs/") for f in uploaded), uploaded
    assert not any("checkpoint" in f or "training_config" in f for f in uploaded)


def test_redaction_rules_and_log_filter():
    cfg = {"hub_token": "s3cret-value", "wandb_api_key": "k-123456789", "tokenizer_name": "clip", "max_tokens": 77,
           "nested": {"db_password": None, "note": f"pushed with {FAKE_TOKEN}", "urls": ["x?t=s3cret-value"]}}
    red = hub.redact(cfg)
    assert red["hub_token"] == red["wandb_api_key"] == hub.REDACTED
    assert red["tokenizer_name"] == "clip" and red["max_tokens"] == 77 and red["nested"]["db_password"] is None
    assert red["nested"]["note"] == f"pushed with {hub.REDACTED}" and red["nested"]["urls"] == [f"x?t={hub.REDACTED}"]

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("cmdistill.test_redaction")
    log.addHandler(handler)
    try:
        hub.install_log_redaction(["s3cret-value"])
        log.warning("token %s and s3cret-value", FAKE_TOKEN)
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().strip() == f"token {hub.REDACTED} and {hub.REDACTED}"


def test_push_refuses_a_token_in_a_file_and_a_missing_token(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "notes.txt").write_text(f"HF_TOKEN={FAKE_TOKEN}")
    called = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: called.append(a))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda *a, **k: called.append(a))
    with pytest.raises(UserError, match="logs/notes.txt holds what looks like a Hugging Face token"):
        hub.push_run(tmp_path, "me/x", token="hf_other", include_logs=True)
    assert not called
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    args = type("A", (), {"push_to_hub": True, "hub_token": None})()
    with pytest.raises(UserError, match="--push_to_hub needs a Hugging Face token: run `hf auth login`"):
        hub.check_push_args(args)


def test_lora_loads_with_its_trained_scale_in_diffusers_and_peft(trained, tiny_pipeline):
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel

    tr, out, _ = trained
    expected = unet_out(tr.base_unet)
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        meta = models.read_lora_metadata(folder)
        assert meta["r"] == 4 and meta["lora_alpha"] == 16 and "to_q" in meta["target_modules"], folder

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(unet_out(pipe.unet), expected)
    assert (expected - base).abs().max() > 1e-4  # the LoRA changes the output: the comparison has teeth

    # Without the metadata diffusers assumes alpha = rank (scale 1 instead of 4): a different UNet.
    pipe.unload_lora_weights()
    bare = out.parent / "no_metadata"
    StableDiffusionXLPipeline.save_lora_weights(str(bare), unet_lora_layers=models.lora_state_dict(tr.base_unet))
    pipe.load_lora_weights(str(bare))
    assert not torch.allclose(unet_out(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    assert models.read_lora_metadata(bare) is None
    pipe.unload_lora_weights()

    assert json.loads((out / "peft" / "adapter_config.json").read_text())["lora_alpha"] == 16
    peft_unet = PeftModel.from_pretrained(pipe.unet, str(out / "peft"))
    torch.testing.assert_close(unet_out(peft_unet), expected)

    # Our own loader refuses an adapter of another shape instead of loading it at the wrong scale.
    unet = models.load_teacher(str(tiny_pipeline)).unet
    models.add_lora(unet, 4, 4, 0.0)
    with pytest.raises(UserError, match="--lora_rank 4 --lora_alpha 16"):
        models.load_lora_into(unet, out)


def test_stock_pipeline_with_our_scheduler_reproduces_test_py(trained, tiny_pipeline):
    """StableDiffusionXLPipeline + load_lora_weights + MultistepConsistencyScheduler = test.py's latents."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLPipeline

    from cmdistill.evaluation.generate import conditioning, load_models, student_sampler
    from cmdistill.noise import per_sample_noise
    from cmdistill.scheduler import MultistepConsistencyScheduler, evaluation_noise_source

    _, out, _ = trained

    def attach_lora(unet):  # as test.py: the adapter of training_config.json, its weights, fused
        models.add_lora(unet, 4, 16, 0.0)
        models.load_lora_into(unet, out)
        unet.fuse_lora()

    args = SimpleNamespace(pretrained_teacher_model=str(tiny_pipeline), pretrained_vae_model_name_or_path=None,
                           revision=None, teacher_revision=None, weight_dtype="fp32")
    m = load_models(args, torch.device("cpu"), attach_lora)
    idx = [1, 3]
    captions = [TINY_CAPTIONS[i] for i in idx]
    x_T = per_sample_noise(SEED, idx, SHAPE)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.scheduler = MultistepConsistencyScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_discr_timesteps == N
    for K, timesteps in ((1, [1000]), (2, [1000, 500]), (4, [1000, 800, 500, 200])):
        with torch.inference_mode():
            ref = student_sampler(m, N, K, SEED, 10.0)(x_T, conditioning(m, captions, RES), idx, lambda f: None)
        pipe.scheduler.set_noise_source(evaluation_noise_source(SEED, idx, SHAPE))
        got = pipe(captions, height=RES, width=RES, num_inference_steps=K, guidance_scale=0.0, latents=x_T.clone(),
                   output_type="latent").images
        assert pipe.scheduler.timesteps.tolist() == timesteps
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"K={K}")

    # Default noise: the pipeline's generator, reproducibly.
    pipe.scheduler.set_noise_source(None)
    runs = [pipe(captions[:1], height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0), output_type="latent").images for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_inference_steps 11 must lie in 1..10"):
        pipe.scheduler.set_timesteps(11)


def test_model_card_front_matter_settings_and_metrics(trained, tmp_path):
    from huggingface_hub import ModelCard

    _, out, _ = trained
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None  # a local teacher folder
    assert {"lora", "text-to-image", "consistency-distillation"} <= set(card.data.tags)
    assert "MultistepConsistencyScheduler" in card.text and "| N (grid intervals) | 10 |" in card.text
    assert 'load_lora_weights("me/cm")' in card.text  # rewritten for the repository it was pushed to
    assert "LoRA rank / alpha | 4 / 16" in card.text and "| seed | 24 |" in card.text

    cfg = json.loads((out / "training_config.json").read_text())
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_config.json").write_text(json.dumps({**cfg, "pretrained_teacher_model": models.SDXL_BASE,
                                                          "pretrained_vae_model_name_or_path": None}))
    (run / "metrics.json").write_text(json.dumps({"student/final/4_steps": {
        "kind": "student", "weights": "final", "num_inference_steps": 4, "num_images": 64, "fid": 103.9,
        "ode_error": 0.2912}}))
    hub.update_model_card(run)
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == models.SDXL_BASE and card.data.license == "openrail++"
    assert f'from_pretrained("{models.SDXL_BASE}"' in card.text
    assert "| final | 4 | 64 | 103.9 | 0.2912 |" in card.text
    assert hub.update_model_card(tmp_path / "not_a_run") is None


def test_lora_files_are_byte_stable(trained):
    """The adapter metadata holds its module names sorted (a set's order changes from process to process), so
    the same weights always make the same file: test.py keys finished samples on the LoRA's hash."""
    _, out, _ = trained
    for folder in (out, out / "checkpoint-2"):
        names = models.read_lora_metadata(folder)["target_modules"]
        assert names == sorted(names)


def test_canonical_header_makes_the_bytes_independent_of_entry_order(tmp_path):
    """safetensors writes header entries in a per-process hash order; after ``canonical_header`` the same
    tensors and metadata give the same bytes whatever the order, and the file reads back the same."""
    import torch
    from safetensors.torch import load_file, save_file

    from cmdistill.models import canonical_header

    tensors = {f"layer{i}.weight": torch.full((2, 3), float(i)) for i in range(6)}
    meta = {f"key{i}": str(i) for i in range(6)}
    paths = []
    for j, order in enumerate((sorted, lambda xs: sorted(xs, reverse=True))):
        p = tmp_path / f"{j}.safetensors"
        save_file({k: tensors[k] for k in order(tensors)}, str(p), metadata={k: meta[k] for k in order(meta)})
        canonical_header(p)
        paths.append(p)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    back = load_file(str(paths[0]))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == meta
