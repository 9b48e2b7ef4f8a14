"""benchmarks/bench.py: the --tiny CPU run goes through every default row and writes sane JSON."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
DEFAULT = ["matmul_peak", "teacher_fwd_ref", "student_step_ref", "cm_step_ref", "direct_cm_calls_ref",
           "teacher_images_ref", "teacher_fwd_ours", "teacher_fwd_ours_compiled", "student_step_ours", "cm_step_ours",
           "direct_cm_step_ours", "teacher_images_ours"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def load_bench():
    if "cmdistill_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cmdistill_bench", BENCH)
        bench = sys.modules["cmdistill_bench"] = importlib.util.module_from_spec(spec)  # dataclasses need it there
        spec.loader.exec_module(bench)
    return sys.modules["cmdistill_bench"]


def run_bench(*args, check=True):
    r = subprocess.run([sys.executable, str(BENCH), "--tiny", "--device", "cpu", *map(str, args)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1200)
    if check and r.returncode != 0:
        raise AssertionError(f"bench.py failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The default rows; dynamo's eager backend for the compiled ones (the graph capture, no code generation:
    the GPU run's inductor is out of reach of a CPU test's time)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = run_bench("--json", out, "--compile_backend", "eager")
    return r.stdout, json.loads(out.read_text())


def test_tiny_run_has_every_row_with_positive_finite_numbers(tiny_run):
    stdout, data = tiny_run
    m = data["measurements"]
    assert list(m) == DEFAULT
    for name, row in m.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert positive_finite(row["value"]) and positive_finite(row["median_s"]), name
        assert row["seconds"] and all(positive_finite(s) for s in row["seconds"]), name
        assert row["peak_mem_gib"] is None  # no per-row peak on the CPU
        assert name in stdout  # the table row
    assert positive_finite(data["flops_per_teacher_forward"])
    for name in ("teacher_fwd_ref", "teacher_fwd_ours", "teacher_fwd_ours_compiled"):
        assert m[name]["unit"] == "TFLOP/s" and positive_finite(m[name]["back_to_back_s_per_call"])
    assert positive_finite(m["teacher_fwd_ours_compiled"]["compile_s"])
    for name in ("student_step_ref", "student_step_ours"):
        assert positive_finite(m[name]["forward_equivalents"])
    for name in ("cm_step_ref", "cm_step_ours"):
        assert m[name]["unit"] == "s/step" and math.isfinite(m[name]["loss"])
    assert "merged target" in m["cm_step_ours"]["notes"] and "PEFT adapter switch" in m["cm_step_ref"]["notes"]
    env, s = data["env"], data["settings"]
    assert all(env[k] for k in ("card", "torch", "diffusers", "transformers", "peft")) and env["timer"] == "perf_counter"
    assert s["tiny"] is True and s["resolution"] == 64 and s["num_discr_timesteps"] == 10 and s["w"] == 9.0
    assert "speed-ups (ours vs reference)" in stdout


def test_direct_cm_rows_follow_the_loops(tiny_run):
    """Ours: consecutive steps through the trajectory pool with every call full (batches are drawn past the last
    timed step); the reference's expected step: E[N - min n] full-batch calls + the per-step encode and switch +
    its student step, with E[N - min n] exact (checked against draws)."""
    _, data = tiny_run
    s, m = data["settings"], data["measurements"]
    N, B = s["num_discr_timesteps"], s["batch_size"]
    p, calls = m["direct_cm_step_ours"], m["direct_cm_calls_ref"]
    assert p["lookahead"] == 2 and p["mean_call_size"] == B and p["sample_steps"] == B * p["calls"]
    assert p["value"] == pytest.approx(B * (N + 1) / 2 * p["teacher_s_per_full_call"] / B + p["student_step_s"])
    bench = load_bench()
    e_max = bench.expected_longest_trajectory(N, B)
    assert p["expected_ref_s"] == pytest.approx(e_max * calls["median_s"] + calls["per_step_s"]
                                                + m["student_step_ref"]["median_s"])
    assert p["speed_up_expected"] == pytest.approx(p["expected_ref_s"] / p["value"])
    assert calls["encode_s"] > 0 and calls["switch_s"] >= 0
    import torch

    draws = torch.randint(0, 100, (200_000, 16), generator=torch.Generator().manual_seed(0))
    assert bench.expected_longest_trajectory(100, 16) == pytest.approx(float((100 - draws.min(1).values).double().mean()),
                                                                       rel=2e-3)


def test_teacher_images_reference_runs_as_test_teacher_does(tiny_run):
    """The reference: one caption per call, 2 images, guidance batched into one call; ours: batch B. All N steps
    are timed (nothing scaled)."""
    _, data = tiny_run
    ref, ours = data["measurements"]["teacher_images_ref"], data["measurements"]["teacher_images_ours"]
    assert ref["images_per_call"] == 2 and ours["images_per_call"] == data["settings"]["batch_size"]
    assert "cfg batched" in ref["notes"] and "all 10 steps" in ref["notes"]
    for row in (ref, ours):
        assert row["unit"] == "img/s" and row["value"] == pytest.approx(row["images_per_call"] / row["median_s"])


def test_optional_rows_and_failure_isolation(tmp_path):
    """The optional rows run; an OOM in one row is reported in it while the others still run (exit status 1
    without --memory_cap_gib); --only keeps its order."""
    out = tmp_path / "b.json"
    rows = "teacher_fwd_ours_compiled_nchw,cm_step_ours-merged_target,direct_cm_calls_ref,student_step_ref," \
           "direct_cm_step_ref"
    r = run_bench("--json", out, "--compile_backend", "eager", "--only", rows, "--inject_oom", "student_step_ref",
                  check=False)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads(out.read_text())["measurements"]
    assert list(m) == rows.split(",")
    assert m["student_step_ref"]["status"] == "oom" and "out of memory" in m["student_step_ref"]["error"]
    assert "OOM" in r.stdout
    for name in ("teacher_fwd_ours_compiled_nchw", "cm_step_ours-merged_target", "direct_cm_step_ref"):
        assert m[name]["status"] == "ok" and positive_finite(m[name]["value"]), (name, m[name].get("error"))
    assert "merged target" not in m["cm_step_ours-merged_target"]["notes"]
    assert "predicted_s" not in m["direct_cm_step_ref"]  # its student_step_ref row failed
    assert m["direct_cm_step_ref"]["reference_loop_steps"] == 10 - min(json.loads(out.read_text())["settings"]
                                                                       ["start_indices"])


def test_unknown_row_is_a_usage_error(capsys):
    """--only with a row that does not exist: argparse's one-line error, exit status 2 (in-process)."""
    with pytest.raises(SystemExit) as e:  # argparse's error, before anything is built
        load_bench().parse_args(["--tiny", "--device", "cpu", "--only", "cm_step_nope"])
    assert e.value.code == 2 and "unknown cm_step_nope" in capsys.readouterr().err


def test_full_size_configs_have_sdxl_parameter_counts():
    bench = load_bench()
    unet, vae, te1, te2 = bench.build_sdxl_modules("meta")  # asserts the UNet's 2,567,463,684
    assert bench.count_params(unet) == bench.SDXL_UNET_PARAMS == 2_567_463_684
    assert bench.count_params(vae) == bench.SDXL_VAE_PARAMS
    assert bench.count_params(te1) == bench.CLIP_L_PARAMS
    assert bench.count_params(te2) == bench.CLIP_BIGG_PARAMS
    assert vae.config.scaling_factor == 0.13025 and unet.config.addition_embed_type == "text_time"


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
    from cmdistill.train import main  # train_cm.py's entry point, in-process (no second interpreter start-up)

    main("cm", [str(a) for a in args])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and log[0]["step_s"] > 0
