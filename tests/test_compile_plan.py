"""--compile off|on|auto (cmdistill.fast.plan): the compiled set per objective, the auto estimate from the planned
steps and the compile cache's record, and the record a compiled run writes."""

import json
from types import SimpleNamespace

import pytest
import torch

from cmdistill.fast import plan


def _args(**kw):
    base = dict(compile="auto", resolution=1024, train_batch_size=16, mixed_precision="fp16", lora_dropout=0.0,
                compile_teacher=False, teacher_channels_last=False, teacher_freezing=False, compile_blocks=False,
                merged_target=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(plan, "has_compiler", lambda: True)  # as on a GPU machine with Triton
    return tmp_path / "cache"


def test_on_sets_each_objectives_compiled_set(cache):
    cuda = torch.device("cuda")
    args = _args(compile="on")
    assert plan.resolve("cm", args, cuda, 250) == "on"
    assert args.compile_blocks and args.merged_target and not args.compile_teacher  # regional, no whole teacher
    args = _args(compile="on", lora_dropout=0.1)  # the merged target cannot apply dropout
    plan.resolve("cm", args, cuda, 250)
    assert args.compile_blocks and not args.merged_target
    args = _args(compile="on")
    plan.resolve("direct_cm", args, torch.device("cpu"), 250)  # on is on, wherever it runs
    assert args.compile_teacher and args.teacher_channels_last and args.teacher_freezing and args.compile_blocks
    assert not args.merged_target
    args = _args(compile="off")
    assert plan.resolve("cm", args, cuda, 250) == "off" and not args.compile_blocks


def test_auto_compiles_where_the_planned_steps_repay_it(cache, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = _args()
    assert plan.resolve("cm", args, cpu, 10_000) == "auto: off (no GPU)" and not args.compile_blocks
    cm = plan.RECIPE_COSTS["cm"]
    saved = cm["eager_step_s"] - cm["compiled_step_s"]
    breakeven = cm["cold_compile_s"] / saved
    few, many = int(breakeven) - 1, int(breakeven) + 1
    assert plan.resolve("cm", args, cuda, few).startswith("auto: off") and not args.compile_blocks
    decided = plan.resolve("cm", args, cuda, many)
    assert decided.startswith("auto: on") and "cold cache" in decided and args.compile_blocks
    # Less work per step saves less per step: a quarter of the pixels needs four times the steps.
    small = _args(resolution=512)
    assert plan.resolve("cm", small, cuda, many).startswith("auto: off")
    assert plan.estimate("cm", small, many).saved_per_step_s == pytest.approx(saved / 4)
    # Without Triton inductor cannot compile for the GPU: auto stays eager (on is the user's choice).
    monkeypatch.setattr(plan, "has_compiler", lambda: False)
    assert plan.resolve("cm", _args(), cuda, 10_000) == f"auto: off ({plan.NO_COMPILER})"
    sampling = _sampling_args()
    assert plan.resolve_sampling(sampling, "teacher", cuda, 10**6) == f"auto: off ({plan.NO_COMPILER})"
    assert sampling.compile == "off"
    monkeypatch.setattr(plan, "has_compiler", lambda: True)
    # Flags given by hand are the user's choice.
    hand = _args(compile_blocks=True)
    assert plan.resolve("cm", hand, cuda, 10_000) == "auto: off (compile flags given by hand)"
    assert hand.compile_blocks and not hand.merged_target


def test_a_compiled_run_records_its_compile_time_and_auto_reads_it(cache):
    cuda = torch.device("cuda")
    args = _args(compile="on")
    plan.resolve("cm", args, cuda, 250)
    timer = plan.training_timer("cm", args)
    for s in (141.0, 2.0, 2.0):  # the first step compiles
        timer.observe(s)
    record = json.loads((cache / plan.RECORD_NAME).read_text())
    (entry,) = record.values()
    assert entry == {"cold_compile_s": 139.0, "step_s": 2.0}
    # The cache now holds these graphs: the next estimate is a warm one, then the measured warm time.
    assert plan.estimate("cm", _args(), 250).cache == "warm"
    timer = plan.training_timer("cm", args)
    timer.observe(32.0)
    timer.observe(2.0)
    est = plan.estimate("cm", _args(), 250)
    assert (est.cache, est.compile_s) == ("measured", 30.0)
    # An eager run records nothing.
    eager = plan.training_timer("cm", _args())
    eager.observe(5.0)
    eager.observe(2.0)
    assert len(json.loads((cache / plan.RECORD_NAME).read_text())) == 1


def _sampling_args(**kw):
    base = dict(compile="auto", resolution=1024, batch_size=16, weight_dtype="fp16", compile_channels_last=True,
                compile_freezing=True)
    return SimpleNamespace(**{**base, **kw})


def test_sampling_auto_counts_unet_calls_and_weight_sets(cache):
    """test_teacher.py / test.py --compile auto: on where the UNet calls planned repay the compile, per set of
    weights; on and off as given; never on a CPU."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = _sampling_args()
    assert plan.resolve_sampling(args, "teacher", cpu, 10**6) == "auto: off (no GPU)" and args.compile == "off"
    args = _sampling_args()
    assert plan.resolve_sampling(args, "teacher", cuda, 0) == "auto: off (nothing to generate)" and args.compile == "off"
    c = plan.SAMPLING_COSTS
    saved = c["eager_step_s"] - c["compiled_step_s"]
    # The paper's reference set (10,274 captions, 643 batches of 16, DDIM N = 100: 200 UNet calls a batch) repays a
    # cold compile many times; a quick look at 32 captions (2 batches) does not.
    args = _sampling_args()
    decided = plan.resolve_sampling(args, "teacher", cuda, 643 * 200)
    assert decided.startswith("auto: on (128600 UNet calls x") and "cold cache" in decided and args.compile == "on"
    assert 2 * 200 * saved < c["cold_compile_s"]
    args = _sampling_args()
    assert plan.resolve_sampling(args, "teacher", cuda, 2 * 200).startswith("auto: off") and args.compile == "off"
    # Every further set of weights (test.py over checkpoints) compiles again, on the graphs the first left.
    calls = int(c["cold_compile_s"] / saved) + 1
    assert plan.estimate_sampling(_sampling_args(), "student", calls).repays
    est = plan.estimate_sampling(_sampling_args(), "student", calls, loads=3)
    assert est.compile_s == c["cold_compile_s"] + 2 * c["warm_compile_s"] and not est.repays
    assert "to compile 3 sets of weights (cold cache)" in str(est)
    # Half the pixels' side: a quarter of the work saved per call.
    assert plan.estimate_sampling(_sampling_args(resolution=512), "student", calls).saved_per_step_s == pytest.approx(saved / 4)
    for given in ("on", "off"):
        args = _sampling_args(compile=given)
        assert plan.resolve_sampling(args, "student", cpu, 10) == given and args.compile == given


def test_a_compiled_evaluation_records_its_compile_time(cache):
    args = _sampling_args(compile="on")
    timer = plan.sampling_timer(args, "teacher")
    for s in (190.0, 45.0, 45.0):  # the first batch compiles
        timer.observe(s)
    (entry,) = json.loads((cache / plan.RECORD_NAME).read_text()).values()
    assert entry == {"cold_compile_s": 145.0, "step_s": 45.0}
    assert plan.estimate_sampling(_sampling_args(), "teacher", 1000).cache == "warm"
    # Other graphs: other compile options, or the student's LoRA UNet.
    assert plan.estimate_sampling(_sampling_args(compile_freezing=False), "teacher", 1000).cache == "cold"
    assert plan.estimate_sampling(_sampling_args(), "student", 1000).cache == "cold"
    timer = plan.sampling_timer(args, "teacher")
    timer.observe(70.0)
    timer.observe(45.0)
    est = plan.estimate_sampling(_sampling_args(), "teacher", 1000, loads=2)
    assert (est.cache, est.compile_s) == ("measured", 50.0)
    plan.sampling_timer(_sampling_args(compile="off"), "teacher").observe(1.0)  # an eager evaluation records nothing
    assert len(json.loads((cache / plan.RECORD_NAME).read_text())) == 1
