"""Selective activation checkpointing (cmdistill.checkpointing): the same gradients as full checkpointing,
per-block costs from a meta-device dry run that match the real model, and the budgeted plan."""

from __future__ import annotations

import json

import pytest
import torch

from cmdistill import models
from cmdistill.fast import checkpointing
from cmdistill.guidance import UNetEps
from test_speed import inputs, student_unet


def loss_and_grads(unet, keep_names=None, mode="selective"):
    """One forward + backward of the tiny student (fp32) with every block checkpointed (keep_names=[]), some
    kept, or (mode='none') no checkpointing at all."""
    unet.train()
    if mode == "none":
        unet.disable_gradient_checkpointing()
    else:
        modules = dict(unet.named_modules())
        unet.enable_gradient_checkpointing(
            gradient_checkpointing_func=checkpointing.SelectiveCheckpointing(modules[n] for n in keep_names))
    x, t, cond = inputs(3, seed=5)
    out = UNetEps(unet)(x, t, cond)
    loss = (out ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_selective_checkpointing_gives_the_same_loss_and_gradients():
    unet = student_unet(torch.float32)
    names = [c.name for c in checkpointing.block_costs(unet, 3, 8, 8, flash_attention=False)]
    assert len(names) >= 4
    runs = [loss_and_grads(unet, []), loss_and_grads(unet, names[::2]), loss_and_grads(unet, names),
            loss_and_grads(unet, mode="none")]
    loss0, grads0 = runs[0]
    assert grads0 and any(g.abs().max() > 0 for g in grads0.values())
    for loss, grads in runs[1:]:
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        assert grads.keys() == grads0.keys()
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-7)


def test_selective_checkpointing_calls_the_checkpoint_only_for_blocks_not_kept(monkeypatch):
    unet = student_unet(torch.float32)
    names = [c.name for c in checkpointing.block_costs(unet, 3, 8, 8, flash_attention=False)]
    keep = names[:2]
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda fn, *a, **kw: calls.append(fn.__self__) or real(fn, *a, **kw))
    loss_and_grads(unet, keep)
    by_module = {m: n for n, m in unet.named_modules()}
    assert sorted(by_module[m] for m in calls) == sorted(names[2:])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_block_costs_of_the_meta_twin_match_the_real_model_on_the_cpu(dropout):
    """The dry run (meta device, no data) against the same measurement on the real tiny UNet (CPU tensors,
    whose float32 SDPA is a flash kernel too): the same blocks in the same order, the same FLOPs, the same
    saved bytes (attention blocks: up to 64 bytes more, the GPU flash kernel's RNG state and lengths)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = student_unet(torch.float32)
    if dropout:  # LoRA dropout keeps a mask per adapter layer: the twin must have it too
        for m in models.tuner_layers(unet):
            m.lora_dropout["default"] = torch.nn.Dropout(dropout)
        unet.peft_config["default"].lora_dropout = dropout
    est = checkpointing.block_costs(unet, 3, 8, 8)
    real, counter = [], FlopCounterMode(display=False)
    names = {m: n for n, m in unet.named_modules()}

    def measure(module, *args):
        seen = {}

        def pack(t):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        before = counter.get_total_flops()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*args)
        real.append((names[module], sum(seen.values()), counter.get_total_flops() - before))
        return out

    unet.train()
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=measure)
    x, t, cond = inputs(3, seed=5)
    with counter:
        UNetEps(unet)(x, t, cond)
    assert [c.name for c in est] == [r[0] for r in real]
    for c, (name, saved, flops) in zip(est, real):
        assert 0 <= c.saved_bytes - saved <= (64 if "transformer_blocks" in name else 0), (name, c.saved_bytes, saved)
        if "transformer_blocks" not in name:
            assert c.flops == flops > 0, name
        else:  # torch's FLOP counter has no formula for the CPU flash kernel: add 2 matmuls per attention
            block = dict(unet.named_modules())[name]
            d, L = block.attn1.inner_dim, (8 // 2) ** 2  # tokens at this block's 4 x 4 resolution
            assert c.flops - flops == 4 * 3 * L * (L + 77) * d, name  # self-attention (L keys), cross (77)
    kinds = {type(dict(unet.named_modules())[c.name]).__name__ for c in est}
    assert kinds == {"ResnetBlock2D", "BasicTransformerBlock"}


def test_flash_attention_dry_run_keeps_no_attention_probabilities():
    sdpa = torch.nn.functional.scaled_dot_product_attention
    unet = student_unet(torch.float32)
    math_path = {c.name: c.saved_bytes for c in checkpointing.block_costs(unet, 2, 32, 32, flash_attention=False)}
    flash = {c.name: c.saved_bytes for c in checkpointing.block_costs(unet, 2, 32, 32, flash_attention=True)}
    attn = [n for n in math_path if "transformer_blocks" in n]
    assert attn and all(flash[n] < math_path[n] for n in attn)  # 2 x heads x 256^2 probabilities gone
    assert all(flash[n] == math_path[n] for n in math_path if n not in attn)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored


def test_plan_keeps_the_dearest_blocks_per_byte_within_the_budget():
    C = checkpointing.BlockCost
    costs = [C("a", 100, 1000.0), C("b", 50, 2500.0), C("c", 200, 1000.0), C("d", 10, 5.0)]
    assert checkpointing.plan(costs, 0) == []
    assert checkpointing.plan(costs, 60) == ["b", "d"]            # b (50/byte), then d still fits; a does not
    assert checkpointing.plan(costs, 160) == ["b", "a", "d"]
    assert set(checkpointing.plan(costs, 10**9)) == {"a", "b", "c", "d"}


def test_training_with_a_budget_gives_the_same_losses(tiny_pipeline, tiny_image_folder, tmp_path):
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    losses, configs = {}, {}
    for name, flags in [("full", ["--gradient_checkpointing"]), ("selective", ["--checkpointing_budget_gib", "1"])]:
        out = tmp_path / name
        args = training_parser("cm").parse_args([
            "--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
            "--num_discr_timesteps", "10", "--lora_rank", "4", "--lora_alpha", "4", "--validation_steps", "0",
            "--checkpointing_steps", "100", "--mixed_precision", "no", "--report_to", "none", "--no_precomputed",
            *flags])
        trainer = Trainer(args, "cm")
        trainer.train()
        losses[name] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        configs[name] = json.loads((out / "training_config.json").read_text())["selective_checkpointing"]
    assert len(losses["full"]) == 2
    assert losses["selective"] == pytest.approx(losses["full"], rel=1e-5)
    assert configs["full"] == {"kept_blocks": 0}
    sel = configs["selective"]
    assert sel["kept_blocks"] == sel["blocks"] > 0 and 0 < sel["kept_gib"] <= 1  # the tiny model fits entirely
    assert sel["recompute_avoided"] == pytest.approx(1.0)


def test_auto_budget_is_the_memory_left_after_the_first_step_over_the_measured_overshoot():
    gib = 2**30
    assert checkpointing.auto_budget_gib(22.4 * gib, 80 * gib) == pytest.approx((72 - 22.4) / 1.4)
    assert checkpointing.auto_budget_gib(23 * gib, 24 * gib) == 0.0  # a 24 GiB card: nothing to spare


def test_auto_budget_is_recalibrated_from_the_measured_rise_of_the_peak():
    gib = 2**30
    # compiled blocks (measured on an H200): 40 GiB estimated raised the peak from 19.4 to 45.2 GiB
    ratio = checkpointing.measured_ratio(19.4 * gib, 45.2 * gib, 40.0)
    assert ratio == pytest.approx(25.8 / 40)
    assert checkpointing.calibrated_budget_gib(19.4 * gib, 45.2 * gib, 40.0, 80 * gib) == pytest.approx(
        (72 - 19.4) / ratio)
    # eager blocks at 1.4x: the same budget as the first sizing; a measured floor of 0.5
    assert checkpointing.calibrated_budget_gib(22.4 * gib, (22.4 + 1.4 * 30) * gib, 30.0, 80 * gib) == pytest.approx(
        checkpointing.auto_budget_gib(22.4 * gib, 80 * gib))
    assert checkpointing.calibrated_budget_gib(20 * gib, 21 * gib, 40.0, 80 * gib) == pytest.approx((72 - 20) / 0.5)
    assert checkpointing.calibrated_budget_gib(20 * gib, 20 * gib, 40.0, 80 * gib) is None  # no rise: no measure
    assert checkpointing.calibrated_budget_gib(20 * gib, 30 * gib, 0.0, 80 * gib) is None   # nothing was kept


def test_auto_budget_sizes_after_the_first_step_and_recalibrates_after_the_second(monkeypatch):
    """StudentCheckpointing.after_step on a (simulated) 80 GiB card: the first sizing assumes OVERSHOOT, the
    second uses the measured rise of the peak (here compiled blocks' 0.65x) and keeps more; then nothing."""
    from types import SimpleNamespace

    gib = 2**30
    peaks = iter([19.4 * gib, (19.4 + 0.65 * (72 - 19.4) / 1.4) * gib])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev: None)
    plans = []

    def enable(unet, budget, batch, height, width):
        plans.append(budget)
        assert (unet, batch, height, width) == ("unet", 6, 8, 8)
        return {"kept_blocks": 1, "blocks": 2, "kept_gib": budget, "recompute_avoided": 0.5} if budget else \
            {"kept_blocks": 0}

    monkeypatch.setattr(checkpointing, "enable", enable)
    args = SimpleNamespace(train_batch_size=6, resolution=64, gradient_checkpointing=False,
                           checkpointing_budget_gib="auto")
    plan = checkpointing.StudentCheckpointing("unet", args, vae_scale_factor=8)
    assert plans == [0] and plan.info == {"kept_blocks": 0}  # every block checkpointed for the first step
    device = torch.device("cuda", 0)
    assert plan.after_step(device)
    assert plans[1:] == [pytest.approx((72 - 19.4) / 1.4)] and "calibrated" not in plan.info
    assert plan.after_step(device)
    assert plans[2] == pytest.approx((72 - 19.4) / 0.65)
    info = plan.info
    assert info["calibrated"] and info["measured_ratio"] == pytest.approx(0.65)
    assert info["auto_budget_gib"] == pytest.approx(plans[2]) and info["first_plan_budget_gib"] == pytest.approx(plans[1])
    assert not plan.after_step(device) and plan.info is info and len(plans) == 3  # sized: no more re-plans


def test_auto_budget_on_the_cpu_keeps_full_checkpointing(tiny_pipeline, tiny_image_folder, tmp_path):
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    out = tmp_path / "auto"
    args = training_parser("cm").parse_args([
        "--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
        "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
        "--num_discr_timesteps", "10", "--lora_rank", "4", "--lora_alpha", "4", "--validation_steps", "0",
        "--checkpointing_steps", "100", "--mixed_precision", "no", "--report_to", "none", "--no_precomputed",
        "--checkpointing_budget_gib", "auto"])
    Trainer(args, "cm").train()
    sel = json.loads((out / "training_config.json").read_text())["selective_checkpointing"]
    assert sel == {"kept_blocks": 0, "auto_budget_gib": 0.0, "first_step_peak_gib": None, "calibrated": False}


def test_budget_flag_takes_a_number_or_auto():
    from cmdistill.args import training_parser

    p = training_parser("cm")
    assert p.parse_args(["--checkpointing_budget_gib", "12.5"]).checkpointing_budget_gib == 12.5
    assert p.parse_args(["--checkpointing_budget_gib", "auto"]).checkpointing_budget_gib == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--checkpointing_budget_gib", "lots"])


def test_negative_budget_is_a_one_line_error():
    from cmdistill.args import training_parser
    from cmdistill.errors import UserError
    from cmdistill.train import validate_args

    args = training_parser("cm").parse_args(["--train_data_dir", "x", "--checkpointing_budget_gib", "-1"])
    with pytest.raises(UserError, match="must be >= 0"):
        validate_args(args)
