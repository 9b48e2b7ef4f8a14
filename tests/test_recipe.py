"""The paper's recipe on any launch: 8-bit AdamW from the pinned bitsandbytes (or a named fallback), the global
batch kept over processes and machines, and a --help that documents every flag."""

import json
import os
import re
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmdistill.args import precompute_parser, training_parser, validate_args
from cmdistill.errors import UserError
from cmdistill.optimizer import OPTIMIZER_8BIT, check_resumed_optimizer, make_optimizer, resolve_batch_size
from test_train import ROOT, common, losses

ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# A document cited by file name, or by its upper-case name before a section sign ("METHOD §3" means METHOD.md).
CITED_DOC = re.compile(r"[\w./-]+\.md\b|\b[A-Z][A-Z_]{2,}(?=\s*§)")
REPO_DOCS = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()


def flags(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


# --- --help --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser", [training_parser("cm"), training_parser("direct_cm"), precompute_parser()],
                         ids=["cm", "direct_cm", "precompute"])
def test_every_flag_has_terse_help_with_its_default(parser):
    measured = re.compile(r"H100|H200|\d\s?(ms|s|min|minutes)\b|\d(\.\d+)?x\b|peak \d")
    for a in flags(parser):
        assert a.help and a.help.strip(), f"{a.option_strings[0]} has no help"
        assert not measured.search(a.help), f"{a.option_strings[0]}: measurements belong in RESULTS.md: {a.help}"
        for doc in CITED_DOC.findall(a.help):  # a document a reader can open: one of this repository's
            doc = doc if doc.endswith(".md") else doc + ".md"
            assert any(path == doc or path.endswith("/" + doc) for path in REPO_DOCS), f"{a.option_strings[0]}: {doc}"
    text = parser.format_help()
    assert text.count("(default") == len(flags(parser))


def test_precompute_lists_only_its_own_flags_with_the_training_defaults(capsys):
    from cmdistill import precompute

    with pytest.raises(SystemExit) as e:
        precompute.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and text.startswith("usage: python -m cmdistill.precompute")
    for absent in ("--push_to_hub", "--lora_rank", "--learning_rate", "--w ", "objective"):
        assert absent not in text
    train = {a.dest: a.default for a in flags(training_parser("cm"))}
    own = flags(precompute_parser())
    assert {"train_data_dir", "resolution", "center_crop", "seed", "mixed_precision", "precomputed_dir"} <= \
        {a.dest for a in own}
    for a in own:  # the cache key of a training run must see the same values
        assert a.dest in train and a.default == train[a.dest], a.dest


# --- the global batch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_bs,per_device,procs,accum,expect", [
    (16, None, 1, 1, 16), (16, None, 2, 1, 8), (16, None, 4, 2, 2), (16, 8, 2, 1, 8),
    (None, None, 2, 1, 16), (None, 4, 3, 2, 4),
])
def test_global_batch_sets_the_per_device_batch(global_bs, per_device, procs, accum, expect):
    args = SimpleNamespace(global_batch_size=global_bs, train_batch_size=per_device, gradient_accumulation_steps=accum)
    total = resolve_batch_size(args, procs)
    assert args.train_batch_size == expect and total == expect * procs * accum
    if global_bs is not None:
        assert total == global_bs


@pytest.mark.parametrize("global_bs,per_device,procs,accum,message", [
    (16, None, 3, 1, "--global_batch_size 16 does not divide into 3 processes x 1 accumulation steps"),
    (16, None, 4, 8, "give a multiple of 32"),
    (16, 16, 2, 1, "--train_batch_size 16 (per device) x 2 processes"),
])
def test_global_batch_that_does_not_fit_is_a_one_line_error(global_bs, per_device, procs, accum, message):
    args = SimpleNamespace(global_batch_size=global_bs, train_batch_size=per_device, gradient_accumulation_steps=accum)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        resolve_batch_size(args, procs)
    assert "\n" not in str(e.value)


def test_batch_arithmetic_is_checked_before_models_load_for_the_launched_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = training_parser("cm").parse_args(["--train_data_dir", "x", "--global_batch_size", "16"])
    with pytest.raises(UserError, match="does not divide into 3 processes"):
        validate_args(args)
    assert args.train_batch_size is None  # resolved for real by the Trainer, from the accelerator's processes
    r = subprocess.run([sys.executable, str(ROOT / "train_cm.py"), "--pretrained_teacher_model", "/nonexistent/sdxl",
                        "--train_data_dir", "x", "--global_batch_size", "3", "--gradient_accumulation_steps", "2"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "--global_batch_size 3 does not divide" in errors[0]


# --- the optimizer ------------------------------------------------------------------------------------------
def optimizer_args(**kw):
    return SimpleNamespace(**{"use_8bit_adam": True, "optimizer_fallback": "none", "learning_rate": 1e-3,
                              "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2,
                              "adam_epsilon": 1e-8, **kw})


def lora_like_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 96, generator=g)), torch.nn.Parameter(torch.randn(4, 8, generator=g))]


def test_pinned_bitsandbytes_runs_adamw8bit_on_cpu_close_to_adamw():
    import bitsandbytes as bnb

    ours, ref = lora_like_params(), lora_like_params()
    args = optimizer_args()
    opt = make_optimizer(args, ours)
    assert isinstance(opt, bnb.optim.AdamW8bit) and args.optimizer == OPTIMIZER_8BIT
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert opt.state[ours[0]]["state1"].dtype == torch.uint8  # 8-bit moments for the large matrix
    for p, q, p0 in zip(ours, ref, lora_like_params()):
        moved = (q.detach() - p0.detach()).abs().mean()
        assert (p.detach() - q.detach()).abs().max() < 0.2 * moved  # the same update up to the 8-bit states


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises, find_spec finds none


def test_8bit_adam_without_bitsandbytes_is_an_error_unless_the_fallback_is_named(no_bitsandbytes):
    args = training_parser("cm").parse_args(["--train_data_dir", "x", "--use_8bit_adam"])
    with pytest.raises(UserError, match="--optimizer_fallback adamw") as e:
        validate_args(args)  # before any model loads
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="bitsandbytes does not import"):
        make_optimizer(optimizer_args(), lora_like_params())
    args = optimizer_args(optimizer_fallback="adamw")
    opt = make_optimizer(args, lora_like_params())
    assert type(opt) is torch.optim.AdamW and args.optimizer == "torch.optim.AdamW"
    assert "bitsandbytes does not import" in args.optimizer_fallback_reason
    validate_args(training_parser("cm").parse_args(["--train_data_dir", "x", "--use_8bit_adam",
                                                    "--optimizer_fallback", "adamw"]))


def test_8bit_adam_that_fails_on_the_device_is_an_error(monkeypatch):
    import bitsandbytes as bnb

    def unsupported(self, *a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", unsupported)
    with pytest.raises(UserError, match="failed a probe step on cpu"):
        make_optimizer(optimizer_args(), lora_like_params())
    args = optimizer_args(optimizer_fallback="adamw")
    assert type(make_optimizer(args, lora_like_params())) is torch.optim.AdamW


def test_a_checkpoint_resumes_only_with_the_optimizer_that_wrote_it(tmp_path):
    (tmp_path / "training_config.json").write_text(json.dumps({"optimizer": OPTIMIZER_8BIT}))
    check_resumed_optimizer(tmp_path, SimpleNamespace(optimizer=OPTIMIZER_8BIT))
    with pytest.raises(UserError, match="resume with the same optimizer"):
        check_resumed_optimizer(tmp_path, SimpleNamespace(optimizer="torch.optim.AdamW"))
    (tmp_path / "training_config.json").write_text(json.dumps({"optimizer": "torch.optim.AdamW(fused=True)"}))
    check_resumed_optimizer(tmp_path, SimpleNamespace(optimizer="torch.optim.AdamW"))  # a GPU run resumed on a CPU


# --- launching ----------------------------------------------------------------------------------------------
def test_launch_builds_multi_machine_commands(monkeypatch):
    from cmdistill.launch import launch_command

    monkeypatch.setenv("NUM_MACHINES", "2")
    monkeypatch.setenv("MACHINE_RANK", "1")
    monkeypatch.setenv("MAIN_PROCESS_IP", "10.0.0.1")
    cmd = launch_command(["train_cm.py"], ["--seed", "1"], num_gpus=4)
    line = " ".join(cmd)
    assert ("--multi_gpu --num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 "
            "--main_process_port 29500") in line and line.endswith("train_cm.py --seed 1")
    monkeypatch.delenv("MACHINE_RANK")
    with pytest.raises(SystemExit, match="MACHINE_RANK"):
        launch_command(["train_cm.py"], [], num_gpus=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_script(env, *extra):
    return subprocess.run(["bash", str(ROOT / "scripts" / "train_cm.sh"), "--report_to", "none", *extra],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV, **env}, timeout=600)


def test_recipe_script_keeps_the_global_batch_and_8bit_adam_across_process_counts(tiny_pipeline, tiny_image_folder,
                                                                                   tmp_path):
    """scripts/train_cm.sh on 2 CPU processes with GLOBAL_BATCH=2 (1 per process, AdamW8bit), checkpoint, then
    resumed on 1 process: 2 per device, the same global batch, the 8-bit optimizer state loaded."""
    out = tmp_path / "run"
    env = {"MODEL_NAME": str(tiny_pipeline), "VAE_PATH": "", "TRAIN_DATA_DIR": str(tiny_image_folder),
           "OUTPUT_DIR": str(out), "RESOLUTION": "64", "N": "10", "GLOBAL_BATCH": "2", "MIXED_PRECISION": "no",
           "NUM_WORKERS": "0", "VALIDATION_STEPS": "0", "CHECKPOINT_STEPS": "1", "MAX_STEPS": "1", "NUM_GPUS": "2",
           "ACCELERATE_ARGS": f"--main_process_port {free_port()}"}  # not 29500: tests may run side by side
    r = recipe_script(env, "--lora_rank", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--global_batch_size 2" in r.stderr and "--use_8bit_adam" in r.stderr
    cfg = json.loads((out / "training_config.json").read_text())
    assert (cfg["num_processes"], cfg["train_batch_size"], cfg["global_batch_size"]) == (2, 1, 2)
    assert cfg["optimizer"] == OPTIMIZER_8BIT
    r = recipe_script({**env, "NUM_GPUS": "1", "MAX_STEPS": "2"}, "--lora_rank", "4",
                      "--allow_config_change", "max_train_steps")  # extending the run is a deliberate change
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "2 per device x 1 processes" in r.stderr
    assert len(losses(out)) == 2 and np.isfinite(losses(out)).all()
    r = recipe_script({**env, "BATCH_SIZE": "8"})
    assert r.returncode == 2 and "set GLOBAL_BATCH" in r.stderr


def test_two_machines_match_one_process_with_the_same_global_batch(tiny_pipeline, tiny_image_folder, tmp_path):
    """`accelerate launch --num_machines 2` (the README's multi-node command), each 'machine' one CPU process on
    127.0.0.1, against one process: the same global batch, the same per-step losses."""
    def args(out):
        a = common(tiny_pipeline, tiny_image_folder, out, "--max_train_steps", 2, "--checkpointing_steps", 0,
                   "--validation_steps", 0, "--report_to", "none")
        i = a.index("--train_batch_size")
        return [str(x) for x in a[:i] + ["--global_batch_size", 2] + a[i + 2:]]

    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}  # accelerate groups CPU processes (gloo) only when told
    port = free_port()
    machines = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                  "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                  "--main_process_port", str(port), "--num_processes", "2", "--mixed_precision", "no",
                                  "--dynamo_backend", "no", str(ROOT / "train_cm.py"), *args(two)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
                for rank in (0, 1)]
    try:
        logs = [m.communicate(timeout=600) for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
    for m, (_, err) in zip(machines, logs):
        assert m.returncode == 0, err[-3000:]
    assert "1 per device x 2 processes" in logs[0][1]
    from cmdistill.train import main  # the one process: in-process (no second interpreter start-up)
    from test_faults import logs

    with logs() as lines:
        main("cm", args(one))
    assert any("2 per device x 1 processes" in line for line in lines), lines
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
