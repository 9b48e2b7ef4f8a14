"""The speed options compute the same numbers as the plain path (CPU, tiny SDXL-architecture UNet).

* switching off PEFT's copy of LoRA inputs to fp32 (``fast.set_lora_input_casting``) under autocast;
* the teacher through ``torch.compile`` with a dynamic batch dimension (``fast.compile_unet`` +
  ``fast.DynamicBatch``), with the adapter disabled, for several batch sizes;
* ``--compile_teacher`` and ``--compile_blocks`` in the training loop (same losses as without);
* the teacher as a view of the UNet without its adapter layers (``fast.base_view``, shared weights) against the
  UNet with its adapter layers switched off (``adapters_disabled`` below, the oracle).
"""

from __future__ import annotations

import contextlib
import copy
import json
import types

import pytest
import torch

from cmdistill import fast, models
from cmdistill.guidance import GuidedEps, UNetEps
from cmdistill.tiny import tiny_sdxl_components


@contextlib.contextmanager
def adapters_disabled(unet):
    """The oracle teacher: the student's UNet with every adapter layer's disable flag set (PEFT's
    ``disable_adapters()`` without its walk over ``requires_grad``); the flags restored on exit."""
    layers = models.tuner_layers(unet)
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield unet
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def student_unet(dtype=torch.bfloat16):
    """Tiny UNet with frozen weights in ``dtype`` and a fp32 LoRA whose B is non-zero (so that the adapter
    changes the output)."""
    unet = tiny_sdxl_components(seed=0)["unet"]
    unet.requires_grad_(False)
    models.add_lora(unet, rank=4, alpha=4)
    g = torch.Generator().manual_seed(1)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = 0.05 * torch.randn(p.shape, generator=g)
    unet.to(dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.randint(1, 1000, (b,), generator=g)
    cond = {"prompt_embeds": torch.randn(b, 77, 64, generator=g), "text_embeds": torch.randn(b, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(b, 1)}
    return x, t, cond


def test_lora_input_casting_off_gives_the_same_forward_and_gradients_under_autocast():
    unet = student_unet()
    lora = [p for p in unet.parameters() if p.requires_grad]
    x, t, cond = inputs(3)
    cond = {k: v.bfloat16() for k, v in cond.items()}
    results = []
    for enabled in (True, False):
        assert fast.set_lora_input_casting(unet, enabled) > 0
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = UNetEps(unet)(x, t, cond)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in lora]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(p.dtype == torch.float32 for p in lora) and len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        # the forward is bit-identical; the backward's fp32 copy only changes where the gradient is rounded
        torch.testing.assert_close(ga, gb, rtol=2e-2, atol=1e-5)


def test_build_skips_the_lora_input_copy_only_for_16_bit_weights_without_dropout():
    """``fast.build`` switches PEFT's copy off where the trainer runs every adapter forward under autocast (frozen
    weights in 16 bits) and no LoRA dropout acts on the copy; elsewhere the copy stays."""
    for dtype, dropout, skipped in ((torch.bfloat16, 0.0, True), (torch.bfloat16, 0.1, False),
                                    (torch.float32, 0.0, False)):
        unet = student_unet(dtype)
        args = types.SimpleNamespace(lora_dropout=dropout, compile_mode=None, w=3.0, teacher_max_batch=None,
                                     train_batch_size=2, **dict.fromkeys(fast.plan.FLAGS, False))
        fast.build(unet, unet, args)
        assert {m.cast_input_dtype_enabled for m in models.tuner_layers(unet)} == {not skipped}, (dtype, dropout)


def test_base_view_is_the_adapter_disabled_unet_on_shared_weights():
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = student_unet(torch.float32)
    fast.compile_blocks(unet, backend="eager")  # the student's compiled blocks are not the view's
    # accelerate's mixed precision replaces the model's forward by a method bound to the model
    unet.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), unet)
    view = fast.base_view(unet)
    assert view.forward.__self__ is view
    assert not any(isinstance(m, BaseTunerLayer) for m in view.modules())
    assert any(isinstance(m, BaseTunerLayer) for m in unet.modules())  # the student keeps its adapters
    assert all(m._compiled_call_impl is None for m in view.modules() if m not in set(unet.modules()))
    base = {p.data_ptr() for n, p in unet.named_parameters() if "lora_" not in n}
    assert {p.data_ptr() for p in view.parameters()} == base  # every frozen weight shared, none copied
    x, t, cond = inputs(3, seed=5)
    with torch.no_grad():
        with adapters_disabled(unet):
            teacher = UNetEps(unet)(x, t, cond)
        student = UNetEps(unet)(x, t, cond)
        torch.testing.assert_close(UNetEps(view)(x, t, cond), teacher, rtol=0, atol=0)
        assert (student - teacher).abs().max() > 1e-3
        # the weights stay shared: an in-place change and a dtype change through the UNet show in the view
        unet.conv_out.bias.add_(0.5)
        unet.to(torch.float64)
        with adapters_disabled(unet):
            teacher2 = UNetEps(unet, dtype=torch.float64)(x.double(), t, {k: v.double() for k, v in cond.items()})
        got = UNetEps(view, dtype=torch.float64)(x.double(), t, {k: v.double() for k, v in cond.items()})
    torch.testing.assert_close(got, teacher2, rtol=0, atol=0)
    assert (teacher2.float() - teacher).abs().max() > 1e-3


def test_merged_adapters_follow_the_student_after_refresh():
    """--merged_target: the no-grad student pass on weight copies with the LoRA update folded in gives the
    adapters-on output (float32: to rounding), and follows the adapter weights after each refresh()."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = student_unet(torch.float32)
    merged = fast.MergedAdapters(unet)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.tree.modules())
    frozen = {p.data_ptr() for n, p in unet.named_parameters() if "lora_" not in n}
    own = [m.weight for _, m in merged.layers]
    assert own and not {w.data_ptr() for w in own} & frozen  # the adapted layers' weights are copies
    x, t, cond = inputs(3, seed=6)
    for _ in range(2):
        with torch.no_grad():
            student = UNetEps(unet)(x, t, cond)
            got = UNetEps(merged.tree)(x, t, cond)
            with adapters_disabled(unet):
                teacher = UNetEps(unet)(x, t, cond)
        torch.testing.assert_close(got, student, rtol=1e-5, atol=1e-5)
        assert (student - teacher).abs().max() > 1e-3
        with torch.no_grad():  # an optimizer step changes the adapters; the copies follow after refresh()
            for n, p in unet.named_parameters():
                if "lora_" in n:
                    p.add_(0.02 * torch.randn_like(p))
        stale = UNetEps(merged.tree)(x, t, cond)
        merged.refresh()
        assert (stale - UNetEps(merged.tree)(x, t, cond)).abs().max() > 1e-4


def test_merged_weights_are_rounded_once_even_under_autocast():
    """refresh() runs inside the trainer's autocast: the merged weight is still W + delta summed in fp32 (the
    adapters' precision) and rounded once to the frozen weights' bf16. Checked against a float64 sum (the
    batched fp32 sum may land on the other side of a rounding boundary for a rare element, never farther)."""
    unet = student_unet(torch.bfloat16)  # frozen weights bf16, LoRA fp32
    merged = fast.MergedAdapters(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged.refresh()
    mismatched = total = 0
    for layer, m in merged.layers:
        delta = layer.get_delta_weight("default").double()
        exact = (layer.get_base_layer().weight.double() + delta).to(torch.bfloat16)
        twice = (layer.get_base_layer().weight + delta.to(torch.bfloat16)).to(torch.bfloat16)
        assert m.weight.dtype == torch.bfloat16
        ulp = (exact.float().abs() * 2**-7).clamp_min(1e-30)
        assert ((m.weight.float() - exact.float()).abs() <= ulp).all()  # at most one step of bf16
        mismatched += (m.weight != exact).sum().item()
        total += m.weight.numel()
        if layer is merged.layers[0][0]:
            assert (twice != exact).any()  # (rounding twice would show)
    assert mismatched <= 1e-3 * total


def test_merged_target_in_bf16_is_as_close_to_the_exact_function_as_the_adapters_on_pass():
    """What --merged_target changes in bf16: against the same network evaluated in float64 (the bf16 frozen
    weights and the fp32 adapters as they are), the pass on merged weights under bf16 autocast is as accurate
    as the usual adapters-on pass (tiny UNet: ~1.1% relative RMS error each); neither is the other's rounding
    of a different function."""
    unet = student_unet(torch.bfloat16)
    x, t, cond = inputs(4, seed=3)
    exact_unet = copy.deepcopy(unet).double()
    with torch.no_grad():
        exact = UNetEps(exact_unet, dtype=torch.float64)(x.double(), t, {k: v.double() for k, v in cond.items()})
        merged = fast.MergedAdapters(unet)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = UNetEps(unet)(x, t, cond).double()
            folded = UNetEps(merged.tree)(x, t, cond).double()

    def rel_rms(v):
        return ((v - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()

    assert 0 < rel_rms(folded) <= 1.25 * rel_rms(plain) and rel_rms(plain) < 0.05


def test_merged_refresh_in_batches_equals_peft_layer_by_layer(monkeypatch):
    """refresh() merges same-shaped layers in batches (the merged weights are views into one buffer per batch):
    the same weights as PEFT's per-layer get_delta_weight (float32), with several batches per shape, per-layer
    scalings that differ within a batch, and a layer whose adapter is switched off (its batch goes layer by
    layer, that layer gets its frozen weight)."""
    monkeypatch.setattr(fast.MergedAdapters, "CHUNK_BYTES", 64 * 1024)  # small batches: several per shape
    unet = student_unet(torch.float32)
    merged = fast.MergedAdapters(unet)
    kinds = {(type(layer.get_base_layer()).__name__, tuple(layer.get_base_layer().weight.shape[2:]))
             for _, chunk, _ in merged.batches for layer, _ in chunk}
    assert {("Linear", ()), ("Conv2d", (3, 3)), ("Conv2d", (1, 1))} <= kinds
    shapes = [tuple(b.shape[1:]) for _, _, b in merged.batches]
    assert len(shapes) > len(set(shapes)) and len(merged.batches) < len(merged.layers)
    first_chunk = merged.batches[0][1]
    first_chunk[0][0].scaling["default"] = 0.5  # scalings differ within that batch
    off = merged.batches[1][1][0][0]
    off._disable_adapters = True  # (as adapters_disabled switches it)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_A" in n:
                p.add_(0.1 * torch.randn_like(p))
        merged.refresh()
    for layer, m in merged.layers:
        w = layer.get_base_layer().weight
        want = w if layer is off else w + layer.get_delta_weight("default")
        torch.testing.assert_close(m.weight, want, rtol=1e-5, atol=1e-6)
    assert merged.batches[1][1][0][1].weight.data_ptr() == merged.batches[1][2].data_ptr()  # a view
    off._disable_adapters = False
    for tree in (unet, merged.tree):  # moved or cast after it was built: the next refresh re-plans the buffers
        tree.to(torch.float64)
    merged.refresh()
    for layer, m in merged.layers:
        assert m.weight.dtype == torch.float64
        torch.testing.assert_close(m.weight, layer.get_base_layer().weight + layer.get_delta_weight("default"))


def test_frozen_compiled_teacher_gives_the_eager_values():
    """--teacher_freezing / --compile_freezing: the teacher view compiled by inductor with freezing (its weights
    constants of the graph) gives the eager teacher's values (float32, CPU) at two batch sizes (dynamic batch);
    with another compile mode it is refused with a one-line error."""
    from cmdistill.errors import UserError

    unet = student_unet(torch.float32)
    view = fast.base_view(unet)
    frozen = UNetEps(fast.DynamicBatch(fast.compile_unet(view, freezing=True)))
    for b in (3, 2):
        x, t, cond = inputs(b, seed=b)
        with torch.no_grad():
            torch.testing.assert_close(frozen(x, t, cond), UNetEps(view)(x, t, cond), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="freezing applies"):
        fast.compile_unet(view, mode="max-autotune-no-cudagraphs", freezing=True)
    from cmdistill.args import training_parser
    from cmdistill.evaluation.teacher import teacher_parser
    from cmdistill.train import validate_args

    with pytest.raises(UserError, match="add --compile_teacher"):
        validate_args(training_parser("cm").parse_args(["--train_data_dir", "x", "--teacher_freezing"]))
    with pytest.raises(UserError, match="default mode"):  # before any model is loaded
        validate_args(training_parser("cm").parse_args(["--train_data_dir", "x", "--teacher_freezing",
                                                        "--compile_teacher", "--compile_mode",
                                                        "max-autotune-no-cudagraphs"]))
    assert teacher_parser().parse_args(["--compile", "--compile_freezing"]).compile_freezing


def test_channelwise_group_norm_is_group_norm():
    """fast.ChannelwiseGroupNorm (the group norms of the channels_last teacher): F.group_norm's function in
    float64 (NCHW and channels_last inputs, 3-D and 4-D, with and without affine, means far from 0); under
    CPU autocast F.group_norm's output dtype (CUDA's autocast gives float32) and values to bf16 rounding; 2-D
    inputs; a view of a view keeps one wrapper."""
    g = torch.Generator().manual_seed(0)
    for shape, groups, affine in [((3, 64, 9, 7), 32, True), ((2, 48, 5, 5), 8, False), ((2, 32, 10), 4, True),
                                  ((5, 16), 4, True)]:
        norm = torch.nn.GroupNorm(groups, shape[1], affine=affine).double()
        if affine:
            norm.weight.data = torch.randn(shape[1], generator=g, dtype=torch.float64)
            norm.bias.data = torch.randn(shape[1], generator=g, dtype=torch.float64)
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + torch.linspace(-20, 20, shape[1]).view(
            -1, *[1] * (len(shape) - 2))
        cw = fast.ChannelwiseGroupNorm(norm)
        torch.testing.assert_close(cw(x), norm(x), rtol=1e-10, atol=1e-10)
        if x.dim() == 4:
            torch.testing.assert_close(cw(x.contiguous(memory_format=torch.channels_last)), norm(x),
                                       rtol=1e-10, atol=1e-10)
        norm32, xb = norm.float(), x.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = fast.ChannelwiseGroupNorm(norm32)(xb), norm32(xb)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out.float(), norm32(xb.float()).to(ref.dtype).float(), rtol=1e-2, atol=2e-2)
    norm = torch.nn.GroupNorm(2, 4)
    assert isinstance(fast.channelwise_norms(fast.channelwise_norms(norm)), fast.ChannelwiseGroupNorm)
    norm.register_forward_hook(lambda *a: None)
    assert fast.channelwise_norms(norm) is norm  # hooks would be skipped: kept as it is


def test_channels_last_compiled_teacher_gives_the_eager_values():
    """--teacher_channels_last / --compile_channels_last: the teacher view with channel-wise group norms (every
    weight shared) gives the view's values; compiled by inductor in channels_last with freezing (Direct CM's
    --compile on) too, at two batch sizes (dynamic batch; float32, CPU). With --compile off: one-line errors."""
    from cmdistill.args import training_parser
    from cmdistill.errors import UserError
    from cmdistill.evaluation.flags import check_compile_flags
    from cmdistill.evaluation.student import student_parser
    from cmdistill.evaluation.teacher import teacher_parser
    from cmdistill.train import validate_args

    unet = student_unet(torch.float32)
    view = fast.base_view(unet)
    cw = fast.channelwise_norms(view)
    wrapped = [m for m in cw.modules() if isinstance(m, fast.ChannelwiseGroupNorm)]
    assert wrapped and all(type(m) is not torch.nn.GroupNorm or any(w.norm is m for w in wrapped)
                           for m in cw.modules())
    assert {id(p) for p in cw.parameters()} == {id(p) for p in view.parameters()}  # no weight copied
    x, t, cond = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(UNetEps(cw)(x, t, cond), UNetEps(view)(x, t, cond), rtol=1e-5, atol=1e-5)
    compiled = UNetEps(fast.DynamicBatch(fast.compile_unet(view, channels_last=True, freezing=True)))
    for b in (3, 2):
        x, t, cond = inputs(b, seed=b)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, cond), UNetEps(view)(x, t, cond), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="add --compile_teacher"):
        validate_args(training_parser("cm").parse_args(["--train_data_dir", "x", "--teacher_channels_last"]))
    fast.compile_unet(view, mode="max-autotune-no-cudagraphs", channels_last=True)  # a mode with options: not refused
    for parser in (teacher_parser, student_parser):
        with pytest.raises(UserError, match="pass --compile on or auto"):
            check_compile_flags(parser().parse_args(["--compile", "off", "--compile_channels_last"]))
        with pytest.raises(UserError, match="pass --compile on or auto"):
            check_compile_flags(parser().parse_args(["--compile", "0", "--compile_channels_last"]))  # COMPILE=0
        for given in (["--compile"], ["--compile", "1"], []):  # on, as COMPILE=1 passes it, and auto (the default)
            a = parser().parse_args([*given, "--compile_channels_last"])
            check_compile_flags(a)
            assert a.compile == ("on" if given else "auto")


def test_base_view_refuses_a_forward_it_cannot_follow():
    import functools

    from cmdistill.errors import UserError

    unet = student_unet(torch.float32)
    block = unet.down_blocks[1].attentions[0]
    block.forward = functools.partial(type(block).forward, block)  # as offload hooks wrap a module's forward
    with pytest.raises(UserError, match="wrapped forward"):
        fast.base_view(unet)


def test_base_view_under_accelerate_mixed_precision():
    """accelerate's bf16 ``prepare`` replaces the UNet's forward by a method bound to it: the view taken from the
    unwrapped UNet (as the trainer does) still runs its own modules. In a subprocess: accelerate's state is
    process-wide."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import torch
from accelerate import Accelerator
from test_speed import adapters_disabled, student_unet, inputs
from cmdistill import fast
from cmdistill.guidance import UNetEps
acc = Accelerator(mixed_precision="bf16", cpu=True)
unet = acc.unwrap_model(acc.prepare(student_unet(torch.float32)))
assert "forward" in unet.__dict__  # patched by accelerate
view = fast.base_view(unet)
x, t, cond = inputs(2, seed=1)
with torch.no_grad():
    with adapters_disabled(unet):
        teacher = UNetEps(unet)(x, t, cond)
    got = UNetEps(view)(x, t, cond)
    student = UNetEps(unet)(x, t, cond)
assert torch.equal(got, teacher) and (student - teacher).abs().max() > 1e-2
print("ok")
"""
    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_compiled_teacher_with_dynamic_batch_matches_eager_with_the_adapter_disabled():
    """One compiled module serves both guidance scales (w = 1: batch b; w = 3: guidance batched, 2b) at every
    batch size. Dynamo's eager backend: the graph capture, its guards and the symbolic batch are what is checked
    here (inductor's code is checked by the frozen and channels_last tests above)."""
    torch._dynamo.reset()
    unet = student_unet(torch.float32)
    compiled = fast.compile_unet(unet, backend="eager")
    for w in (1.0, 3.0):
        eager_teacher = GuidedEps(UNetEps(unet), w, batched=True)
        fast_teacher = GuidedEps(UNetEps(fast.DynamicBatch(compiled)), w, batched=True)
        for b in (4, 3, 5, 2):  # the shrinking active sets of the Direct CM loop
            x, t, cond = inputs(b, seed=b)
            with torch.no_grad(), adapters_disabled(unet):
                ref = eager_teacher(x, t, cond)
                got = fast_teacher(x, t, cond)
                teacher_plain = UNetEps(unet)(x, t, cond)
            with torch.no_grad():
                student = UNetEps(unet)(x, t, cond)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            assert (student - teacher_plain).abs().max() > 1e-3  # the adapter matters here...
    with torch.no_grad():  # ... and the compiled module follows the adapter switch (its guards)
        x, t, cond = inputs(3, seed=9)
        torch.testing.assert_close(UNetEps(fast.DynamicBatch(compiled))(x, t, cond), UNetEps(unet)(x, t, cond),
                                   rtol=1e-5, atol=1e-5)


def test_dynamic_batch_compiles_once_for_every_batch_size():
    """``fast.DynamicBatch``: the batch dimension of every tensor input (keyword and nested ones included) is
    symbolic from the first call, so shrinking batches do not recompile; the values are the module's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def f(x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        return (x * t[:, None] + encoder_hidden_states.sum(1) + added_cond_kwargs["text_embeds"],)

    counter = CompileCounter()
    compiled = fast.DynamicBatch(torch.compile(f, backend=counter))
    for b in (4, 3, 5, 2):
        x, t, emb, te = torch.randn(b, 3), torch.randn(b), torch.randn(b, 2, 3), torch.randn(b, 3)
        got = compiled(x, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": te})[0]
        torch.testing.assert_close(got, f(x, t, emb, {"text_embeds": te})[0])
    assert counter.frame_count == 1


def test_compile_flags_give_the_same_losses(tiny_pipeline, tiny_image_folder, tmp_path, monkeypatch):
    """--compile_teacher (with a mode) and --compile_blocks wire torch.compile into the training loop: the same
    losses. Dynamo's eager backend (the wiring; AOT autograd through the checkpointed blocks is checked by
    test_compiled_blocks_give_the_same_student_gradients..., inductor's code by the frozen / channels_last tests)."""
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    real, compiled, modes = fast.compile_unet, [], []
    monkeypatch.setattr(fast, "compile_unet",
                        lambda unet, **kw: compiled.append(unet) or modes.append(kw.get("mode"))
                        or real(unet, backend="eager"))
    real_blocks, blocks = fast.compile_blocks, []
    monkeypatch.setattr(fast, "compile_blocks", lambda unet, **kw: blocks.append(real_blocks(unet, backend="eager",
                                                                                             **kw)))
    losses = {}
    for flag in ([], ["--compile_teacher", "--compile_mode", "max-autotune-no-cudagraphs"],
                 ["--compile_blocks", "--compile_teacher"]):  # --compile on's set for Direct CM (fast.plan)
        torch._dynamo.reset()
        out = tmp_path / ("-".join(flag).replace("--", "") or "eager")
        args = training_parser("direct_cm").parse_args([
            "--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
            "--num_discr_timesteps", "10", "--w", "3", "--report_to", "none", "--validation_steps", "0",
            "--checkpointing_steps", "100", "--no_precomputed", "--gradient_checkpointing", *flag])
        Trainer(args, "direct_cm").train()
        losses[" ".join(flag)] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(compiled) == 2  # the teacher's module; again with the blocks
    assert modes == ["max-autotune-no-cudagraphs", "default"]
    assert len(blocks) == 1 and blocks[0] > 0  # --compile_blocks: the UNet's blocks, compiled once
    eager = losses.pop("")
    for flag, got in losses.items():
        assert len(got) == 2 and got == pytest.approx(eager, rel=1e-4, abs=1e-7), flag


def test_block_graphs_are_static_where_the_batch_never_changes(tiny_pipeline, tiny_image_folder, tmp_path,
                                                               monkeypatch):
    """--compile_blocks: the student's blocks, and CM's teacher view and merged target, compile with static shapes
    (without it dynamo compiles the later block shapes of a class with symbolic sizes); Direct CM's teacher view,
    called at shrinking active sets, keeps dynamo's automatic dynamic shapes."""
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    symbolic, static = [], []

    def record(gm, inputs):
        symbolic.append(sum(isinstance(x, torch.SymInt) for x in inputs))
        return gm.forward

    real = fast.compile_blocks
    monkeypatch.setattr(fast, "compile_blocks",
                        lambda unet, **kw: static.append(kw.get("static")) or real(unet, backend=record, **kw))

    def trainer(objective, *flag):
        return Trainer(training_parser(objective).parse_args([
            "--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
            "--output_dir", str(tmp_path / objective), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "2", "--num_discr_timesteps", "10", "--w", "3", "--report_to", "none",
            "--validation_steps", "0", "--checkpointing_steps", "100", "--no_precomputed", "--gradient_checkpointing",
            "--compile_blocks", *flag]), objective)

    torch._dynamo.reset()
    trainer("cm", "--merged_target").train()
    assert static == [True, True, True]  # the student, the teacher view, the merged target
    assert len(symbolic) >= 4 and not any(symbolic)  # several block shapes, grad and no grad: none symbolic
    static.clear()
    trainer("direct_cm")
    assert static == [True, False]  # the student; the teacher view


def test_merged_target_gives_the_same_cm_losses(tiny_pipeline, tiny_image_folder, tmp_path, monkeypatch):
    """train_cm.py --merged_target (eager, and compiled as the teacher, also with --teacher_channels_last): the
    same losses as the plain target pass (float32); on train_direct_cm.py a one-line error. Compiled with dynamo's
    eager backend: the wiring is what is checked here."""
    from cmdistill.args import training_parser
    from cmdistill.errors import UserError
    from cmdistill.train import Trainer

    real, compiled = fast.compile_unet, []
    monkeypatch.setattr(fast, "compile_unet", lambda unet, **kw: compiled.append(kw.get("channels_last")) or real(
        unet, backend="eager", channels_last=kw.get("channels_last", False)))
    refreshes = []
    real_refresh = fast.MergedAdapters.refresh
    monkeypatch.setattr(fast.MergedAdapters, "refresh", lambda self, *a: refreshes.append(1) or real_refresh(self, *a))

    def args(objective, out, *flag):
        return training_parser(objective).parse_args([
            "--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
            "--output_dir", str(tmp_path / out), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "3", "--num_discr_timesteps", "10", "--w", "3", "--report_to", "none",
            "--validation_steps", "0", "--checkpointing_steps", "100", "--no_precomputed",
            "--learning_rate", "1e-2", *flag])

    losses = {}
    for flag in ([], ["--merged_target"], ["--merged_target", "--compile_teacher"],
                 ["--merged_target", "--compile_teacher", "--teacher_channels_last"]):
        torch._dynamo.reset()
        out = "-".join(flag).replace("--", "") or "plain"
        trainer = Trainer(args("cm", out, *flag), "cm")
        if flag == ["--merged_target"]:
            assert trainer.fast.target_unet is trainer.fast.merged.tree  # the target pass runs on the merged weights
        trainer.train()
        losses[out] = [json.loads(line)["loss"] for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]
    assert len(refreshes) == 3 * (1 + 3)  # at construction, then once per optimizer step, in every run
    # --compile_teacher: the teacher view and the merged tree; --teacher_channels_last: both with channel-wise norms
    assert compiled == [False, False, True, True]
    plain = losses.pop("plain")
    assert len(set(plain)) == 3  # the adapters change between steps (lr 1e-2): the copies must follow
    for flag, got in losses.items():
        assert got == pytest.approx(plain, rel=1e-4, abs=1e-7), flag
    with pytest.raises(UserError, match="--merged_target applies to train_cm.py"):
        Trainer(args("direct_cm", "dcm", "--merged_target"), "direct_cm")


@pytest.mark.parametrize("objective", ["cm", "direct_cm"])
def test_trainers_teacher_is_the_adapter_disabled_unet(tiny_pipeline, tiny_image_folder, tmp_path, objective):
    """The trainer's guided teacher (on fast.base_view) against the student's UNet with its adapter switched
    off, with adapter weights that change the output: the same values."""
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    args = training_parser(objective).parse_args([
        "--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
        "--output_dir", str(tmp_path / objective), "--resolution", "64", "--train_batch_size", "2",
        "--num_discr_timesteps", "10", "--w", "3", "--report_to", "none", "--no_precomputed"])
    trainer = Trainer(args, objective)
    unet = trainer.base_unet
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    b, h = 3, 64 // trainer.vae_scale_factor  # latents of the 64 px training resolution
    g = torch.Generator().manual_seed(11)
    x = torch.randn(b, 4, h, h, generator=g)
    t = torch.randint(1, 1000, (b,), generator=g)
    cond = {"prompt_embeds": torch.randn(b, 77, unet.config.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(b, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(b, 1)}
    teacher = trainer.fast.teacher_eps
    with torch.no_grad():
        got = teacher(x, t, cond)
        with adapters_disabled(unet):
            want = GuidedEps(UNetEps(unet), 3.0, batched=False)(x, t, cond)
        student = GuidedEps(UNetEps(unet), 3.0, batched=False)(x, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (student - want).abs().max() > 1e-3


def test_compile_unet_passes_the_mode_to_inductor_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or m)
    fast.compile_unet("unet", mode="max-autotune-no-cudagraphs")
    fast.compile_unet("unet", backend="aot_eager", mode="max-autotune-no-cudagraphs")
    fast.compile_unet("unet", mode="default")
    assert calls == [{"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}, {"backend": "aot_eager"},
                     {"backend": "inductor"}]
    assert fast.COMPILE_MODES == ("default", "max-autotune-no-cudagraphs")  # none replays CUDA graphs
    blocks = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: blocks.append(kw))
    unet = tiny_sdxl_components(seed=0)["unet"]
    n = fast.compile_blocks(unet, mode="max-autotune-no-cudagraphs")
    fast.compile_blocks(unet, backend="aot_eager", mode="max-autotune-no-cudagraphs")
    assert blocks == [{"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}] * n + [{"backend": "aot_eager"}] * n


def test_compiled_blocks_give_the_same_student_gradients_and_teacher_and_switch_back_to_eager():
    """Regional compilation (fast.compile_blocks): every ResNet / transformer block compiled in place; the
    student's loss and LoRA gradients (every block checkpointed, so recomputed through the compiled blocks) and
    the teacher's no-grad pass with the adapter off equal the eager ones; enabled=False restores eager blocks."""
    from cmdistill.fast import checkpointing

    torch._dynamo.reset()
    unet = student_unet(torch.float32)
    unet.train()
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointing.SelectiveCheckpointing())
    x, t, cond = inputs(3, seed=4)

    def run():
        out = UNetEps(unet)(x, t, cond)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
        unet.zero_grad(set_to_none=True)
        with torch.no_grad(), adapters_disabled(unet):
            teacher = UNetEps(unet)(x[:2], t[:2], {k: v[:2] for k, v in cond.items()})
        return out.detach(), grads, teacher

    eager = run()
    n = fast.compile_blocks(unet, backend="aot_eager")
    blocks = [m for m in unet.modules() if type(m).__name__ in fast.BLOCK_TYPES]
    assert n == len(blocks) > 0 and all(m._compiled_call_impl is not None for m in blocks)
    compiled = run()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in eager[1].values())
    for name, g in eager[1].items():
        torch.testing.assert_close(compiled[1][name], g, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # the CM target's pass: no grad, adapter on; then off again (the flags are guarded)
        for on in (True, False, True):
            with contextlib.nullcontext() if on else adapters_disabled(unet):
                got = UNetEps(unet)(x, t, cond)
            fast.compile_blocks(unet, enabled=False)
            with contextlib.nullcontext() if on else adapters_disabled(unet):
                want = UNetEps(unet)(x, t, cond)
            fast.compile_blocks(unet, backend="aot_eager")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    for cls in {type(m) for m in blocks}:  # every variant compiled, none left to run eager past the limit
        assert 0 < len(_debug_get_cache_entry_list(cls.forward.__code__)) < fast.RECOMPILE_LIMIT
    fast.compile_blocks(unet, enabled=False)
    assert all(m._compiled_call_impl is None for m in blocks)


def test_teacher_lookahead_gives_the_same_direct_cm_losses(tiny_pipeline, tiny_image_folder, tmp_path, monkeypatch):
    """The default --teacher_lookahead 2 (the next batches' trajectories ride in the current batch's teacher
    calls: fast.TrajectoryPool) and guidance batched for small calls give the losses of the plain per-sample
    loop with separate passes (threshold 0, the reference's way)."""
    from cmdistill.args import training_parser
    from cmdistill.train import Trainer

    sizes, guides = [], []
    real_call = fast.TrajectoryPool._call
    monkeypatch.setattr(fast.TrajectoryPool, "_call", lambda self: sizes.append(1) or real_call(self))
    separate = []

    class Recorded(fast.AdaptiveCFG):
        def __init__(self, eps_fn, w, threshold):
            super().__init__(eps_fn, w, 0 if separate else threshold)
            guides.append(self)

    monkeypatch.setattr(fast, "AdaptiveCFG", Recorded)
    losses, used = {}, {}
    base = ["--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "3", "--num_discr_timesteps", "10",
            "--w", "3", "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "100",
            "--no_precomputed", "--mixed_precision", "no", "--gradient_accumulation_steps", "2"]
    for name, flags in (("plain", ["--teacher_lookahead", "0"]), ("default", [])):
        out, guides[:], separate[:] = tmp_path / name, [], [1] if flags else []
        Trainer(training_parser("direct_cm").parse_args([*base, "--output_dir", str(out), *flags]), "direct_cm").train()
        used[name] = list(guides)
        losses[name] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert json.loads((out / "training_config.json").read_text())["teacher_lookahead"] == (0 if flags else 2)
    assert len(losses["default"]) == 3 and sizes  # the pool ran the teacher
    assert losses["default"] == pytest.approx(losses["plain"], rel=1e-5, abs=1e-8)
    # the reference's separate passes in the plain run; the default batches calls of <= B/2 = 1 sample
    assert all(g.threshold == 0 and g.batched_calls == 0 for g in used["plain"])
    assert all(g.threshold == 1 for g in used["default"]) and sum(g.batched_calls for g in used["default"]) > 0
    calls = {name: sum(g.batched_calls + g.separate_calls for g in gs) for name, gs in used.items()}
    assert calls["default"] < calls["plain"]  # the pool merged batches into fewer calls


def test_cm_teacher_lookahead_gives_the_same_losses(tiny_pipeline, tiny_image_folder, tmp_path, monkeypatch):
    """CM with --teacher_lookahead 1: each batch's teacher step is issued one step ahead (before the preceding
    update, on the current stream) and the losses are those of the plain loop; the teacher ran each batch's step
    exactly once."""
    from cmdistill import objectives
    from cmdistill.args import training_parser
    from cmdistill.fast import lookahead
    from cmdistill.train import Trainer

    calls = []
    real = objectives.cm_teacher_step
    monkeypatch.setattr(lookahead, "cm_teacher_step", lambda *a: calls.append(1) or real(*a))
    base = ["--pretrained_teacher_model", str(tiny_pipeline), "--train_data_dir", str(tiny_image_folder),
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "3", "--num_discr_timesteps", "10",
            "--w", "3", "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "100",
            "--no_precomputed", "--mixed_precision", "no", "--learning_rate", "1e-2"]
    losses = {}
    for k in ("0", "1"):
        out = tmp_path / k
        Trainer(training_parser("cm").parse_args([*base, "--output_dir", str(out), "--teacher_lookahead", k]), "cm").train()
        losses[k] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(calls) == 3  # the lookahead run's three batches, each once (the plain run calls cm_target)
    assert losses["1"] == losses["0"] and len(set(losses["0"])) == 3  # the student moved between steps


def test_to_device_gives_the_plain_copy_values():
    """cmdistill.fast.to_device: the values and dtype of ``torch.as_tensor(t).to(device, dtype)`` (on a GPU the
    copy goes through pinned memory without a host sync; the same numbers)."""
    from cmdistill.fast import to_device

    t = torch.arange(7, dtype=torch.float64) / 3
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for dtype in (None, torch.float32, torch.bfloat16):
            got = to_device(t.expand(2, 7)[:, ::2], dev, dtype)
            want = t.expand(2, 7)[:, ::2].to(dev, dtype) if dtype else t.expand(2, 7)[:, ::2].to(dev)
            assert got.device.type == dev and got.dtype == want.dtype and torch.equal(got.cpu(), want.cpu())
    assert to_device([3, 1], "cpu").tolist() == [3, 1]
