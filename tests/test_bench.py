"""benchmarks/bench.py on the tiny random SDXL on a CPU: every row runs through the product's code and gives sane
numbers; benchmarks/random_sdxl.py's folder trains through train_cm.py."""

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def load_bench():
    if "cmdistill_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cmdistill_bench", ROOT / "benchmarks" / "bench.py")
        bench = sys.modules["cmdistill_bench"] = importlib.util.module_from_spec(spec)  # dataclasses need it there
        spec.loader.exec_module(bench)
    return sys.modules["cmdistill_bench"]


def run_bench(tmp_path, *args, patch=None):
    """bench.main on the tiny SDXL in this process, with torch.compile recording its calls and returning the module
    as it is (what COMPILE=1 compiles, without the compile: tests/test_speed.py checks compiled = eager)."""
    bench, compiles, out, stdout = load_bench(), [], tmp_path / "bench.json", io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile_cache"))
        mp.setattr(torch, "compile", lambda model, **kw: compiles.append(kw.get("options")) or model)
        if patch:
            patch(mp, bench)
        rc = bench.main(["--tiny", "--device", "cpu", "--json", str(out), *args])
    return rc, stdout.getvalue(), json.loads(out.read_text()), compiles


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("bench"))


def test_every_row_gives_positive_finite_numbers(tiny_run):
    rc, stdout, data, compiles = tiny_run
    m = data["measurements"]
    assert rc == 0 and list(m) == load_bench().ROW_NAMES
    for name, row in m.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert positive_finite(row["value"]) and positive_finite(row["median_s"]), name
        assert row["seconds"] and all(positive_finite(s) for s in row["seconds"]), name
        assert row["peak_mem_gib"] is None and name in stdout  # no per-row peak on a CPU; the table row
    assert positive_finite(data["flops_per_teacher_forward"])
    for name in ("teacher_fwd_ref", "teacher_fwd_ours", "teacher_fwd_ours_compiled"):
        assert m[name]["unit"] == "TFLOP/s" and positive_finite(m[name]["back_to_back_s_per_call"])
        assert positive_finite(m[name]["fraction_of_matmul_peak"])
    for name in ("student_step_ref", "student_step_ours"):
        assert positive_finite(m[name]["forward_equivalents"])
    for name in ("cm_step_ref", "cm_step_ours", "direct_cm_step_ref", "direct_cm_step_ours"):
        assert m[name]["unit"].startswith("s/step") and math.isfinite(m[name]["loss"])
    for name, batch in (("teacher_images_ref", 2), ("teacher_images_ours", data["settings"]["batch_size"])):
        assert m[name]["images_per_call"] == batch
        assert m[name]["value"] == pytest.approx(batch / m[name]["median_s"])
    assert "speed-ups (ours vs reference)" in stdout and data["env"]["card"].startswith("CPU")
    # COMPILE=1's whole-UNet compiles: Direct CM's teacher and test_teacher.sh's, channels_last with freezing; the
    # rest of the compiled set (CM, the student) is compiled per block.
    whole = {"freezing": True, "force_layout_optimization": True}
    assert [o for o in compiles if o] == [whole, whole] and len(compiles) > 2


def test_direct_cm_expected_steps(tiny_run):
    """Ours: consecutive steps through the trajectory pool with every call full; the expected step is B (N + 1) / 2
    sample-steps at the measured rate + the rest. The reference: its loop ran N - min n full calls at the batch's
    starts, scaled to E[N - min n] calls (exact: checked against draws) + the rest."""
    _, _, data, _ = tiny_run
    s, m = data["settings"], data["measurements"]
    N, B = s["num_discr_timesteps"], s["batch_size"]
    ours, ref = m["direct_cm_step_ours"], m["direct_cm_step_ref"]
    assert ours["lookahead"] == 2 and ours["mean_call_size"] == B and ours["sample_steps"] == B * ours["calls"]
    assert ours["value"] == pytest.approx(B * (N + 1) / 2 * ours["teacher_s_per_full_call"] / B + ours["rest_s"])
    bench = load_bench()
    assert ref["calls"] == N - min(ref["start_indices"]) and ref["mean_call_size"] == B
    assert ref["value"] == pytest.approx(bench.expected_longest_trajectory(N, B) * ref["teacher_s_per_call"]
                                         + ref["rest_s"])
    draws = torch.randint(0, 100, (200_000, 16), generator=torch.Generator().manual_seed(0))
    assert bench.expected_longest_trajectory(100, 16) == pytest.approx(
        float((100 - draws.min(1).values).double().mean()), rel=2e-3)


def test_a_failed_row_is_reported_and_the_others_run(tmp_path):
    """An OOM in one row is reported in it, the next row still runs, the exit status is 1 (no --memory_cap_gib);
    an unknown row is a usage error."""
    def oom(mp, bench):
        def fail(self, side):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        mp.setattr(bench.Bench, "teacher_fwd", fail)

    rc, stdout, data, _ = run_bench(tmp_path, "--only", "student_step_ref,teacher_fwd_ref", patch=oom)
    m = data["measurements"]
    assert rc == 1 and list(m) == ["teacher_fwd_ref", "student_step_ref"]  # the table's order
    assert m["teacher_fwd_ref"]["status"] == "oom" and "out of memory" in m["teacher_fwd_ref"]["error"]
    assert m["student_step_ref"]["status"] == "ok" and "forward_equivalents" not in m["student_step_ref"]
    assert "OOM" in stdout
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()):
        load_bench().parse_args(["--only", "cm_step_nope"])
    assert e.value.code == 2


def test_full_size_configs_have_sdxl_parameter_counts():
    load_bench()  # (puts benchmarks/ on the path)
    import random_sdxl as r

    c = r.full_size_components("meta")  # asserts the UNet's 2,567,463,684
    assert r.count_params(c["unet"]) == r.SDXL_UNET_PARAMS == 2_567_463_684
    assert r.count_params(c["vae"]) == r.SDXL_VAE_PARAMS
    assert r.count_params(c["text_encoder"]) == r.CLIP_L_PARAMS
    assert r.count_params(c["text_encoder_2"]) == r.CLIP_BIGG_PARAMS
    assert c["vae"].config.scaling_factor == 0.13025 and c["unet"].config.addition_embed_type == "text_time"


def test_random_sdxl_folder_trains_through_the_users_loading_path(tmp_path):
    """benchmarks/random_sdxl.py writes a pipeline folder and an image folder that train_cm.py takes as they are
    (--tiny here; the full-size build is the same code with the bench's SDXL configs)."""
    model, data, out = tmp_path / "sdxl", tmp_path / "data", tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_sdxl.py"), "--tiny", "--dtype", "fp32",
                    "--out", str(model), "--data", str(data), "--images", "3", "--size", "48"], check=True, env=ENV,
                   cwd=ROOT, capture_output=True, timeout=300)
    assert (model / "model_index.json").is_file() and len(list(data.glob("*.jpg"))) == 3
    args = ["--pretrained_teacher_model", model, "--train_data_dir", data, "--output_dir", out, "--resolution", 64,
            "--train_batch_size", 2, "--num_discr_timesteps", 10, "--lora_rank", 4, "--lora_alpha", 4,
            "--max_train_steps", 1, "--validation_steps", 0, "--checkpointing_steps", 0, "--report_to", "none",
            "--center_crop", "--no_precomputed"]
    r = subprocess.run([sys.executable, str(ROOT / "train_cm.py"), *map(str, args)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and log[0]["step_s"] > 0


def test_the_compiled_teacher_row_met_first_is_compiled(tmp_path):
    """The teacher-forward row of the compiled teacher with no reference row before it: its FLOPs are counted on
    the eager view, and the compiled module's first call is traced whole by dynamo (on the H200 with torch 2.11,
    its first call under the FLOP counter left it eager for the whole process: benchmarks/RESULTS.md)."""
    import torch._dynamo

    graphs, real_compile = [], torch.compile

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def traced(mp, bench):  # dynamo itself, with a backend that keeps the graphs and runs them as they are
        mp.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=record, dynamic=kw.get("dynamic")))

    torch._dynamo.reset()
    try:
        rc, _, out, _ = run_bench(tmp_path, "--only", "teacher_fwd_ours_compiled", patch=traced)
    finally:
        torch._dynamo.reset()
    assert rc == 0 and out["measurements"]["teacher_fwd_ours_compiled"]["status"] == "ok"
    assert graphs and max(len(g.graph.nodes) for g in graphs) > 500  # the whole UNet in one graph
