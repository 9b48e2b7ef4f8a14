"""benchmarks/bench.py: the --tiny CPU run exercises every measurement of the GPU run and writes sane JSON."""

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
# The default measurements of the GPU run (the optional ones are checked separately below).
DEFAULT = ["matmul_peak", "teacher_fwd_ref", "teacher_fwd_ours", "teacher_fwd_ours_compiled", "cm_step_ref",
           "cm_step_ref+precomputed", "cm_step_ref+bf16", "cm_step_ours", "student_step_ref", "student_step_ours",
           "student_images_ref", "student_images_ours", "teacher_images_ref", "teacher_images_ours",
           "direct_cm_agreement", "direct_cm_step_ours", "direct_cm_step_ref", "direct_cm_calls_ref",
           "direct_cm_calls_ours", "direct_cm_expected"]


def load_bench():
    if "cmdistill_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cmdistill_bench", BENCH)
        bench = sys.modules["cmdistill_bench"] = importlib.util.module_from_spec(spec)  # dataclasses need it there
        spec.loader.exec_module(bench)
    return sys.modules["cmdistill_bench"]


def run_bench(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=1200)
    if check and r.returncode != 0:
        raise AssertionError(f"bench.py failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = run_bench("--tiny", "--device", "cpu", "--json", out)
    return r.stdout, json.loads(out.read_text())


def test_tiny_run_has_every_measurement_with_positive_finite_numbers(tiny_run):
    stdout, data = tiny_run
    m = data["measurements"]
    assert list(m) == DEFAULT
    for name in DEFAULT:
        row = m[name]
        assert row["status"] == "ok", (name, row.get("error"))
        assert positive_finite(row["value"]) or name == "direct_cm_agreement", (name, row["value"])
        assert positive_finite(row["median_s"]), name
        assert row["seconds"] and all(positive_finite(s) for s in row["seconds"]), name
        assert row["peak_mem_gib"] is None  # no per-measurement peak on the CPU
        assert name in stdout  # the table row
    for name in ("teacher_fwd_ref", "teacher_fwd_ours"):
        assert m[name]["unit"] == "TFLOP/s" and positive_finite(m[name]["tflop_per_forward"])
    assert positive_finite(data["flops_per_teacher_forward"])
    for name in ("cm_step_ref", "cm_step_ours", "direct_cm_step_ref", "direct_cm_step_ours"):
        assert m[name]["unit"] == "s/step" and math.isfinite(m[name]["loss"])
    for name in ("teacher_images_ref", "teacher_images_ours", "student_images_ref", "student_images_ours"):
        assert m[name]["unit"] == "img/s" and positive_finite(m[name]["seconds_per_image"])
    # The teacher samplers timed a fraction of the steps and scaled (as the GPU run does).
    assert m["teacher_images_ours"]["steps_timed"] < m["teacher_images_ours"]["steps_total"]
    assert "scaled" in m["teacher_images_ours"]["notes"]


def test_tiny_run_expected_direct_cm_step_follows_the_loops(tiny_run):
    """direct_cm_expected's prediction for the run's own starts, recomputed by walking both loops call
    by call with the measured per-call times (the reference: N - min(n) full-batch calls)."""
    _, data = tiny_run
    s, m = data["settings"], data["measurements"]
    N, B, start = s["num_discr_timesteps"], s["batch_size"], s["start_indices"]
    e, per = m["direct_cm_expected"], m["direct_cm_calls_ours"]["seconds_per_call"]
    assert sorted(map(int, per)) == list(range(1, B + 1)) and m["direct_cm_calls_ref"]["seconds_per_call"].keys() == {str(B)}
    n, ours = list(start), m["student_step_ours"]["median_s"]
    while any(k < N for k in n):
        ours += per[str(sum(k < N for k in n))]
        n = [k + 1 if k < N else k for k in n]
    ref = ((N - min(start)) * m["direct_cm_calls_ref"]["median_s"] + m["direct_cm_calls_ref"]["per_step_s"]
           + m["student_step_ref"]["median_s"])
    assert e["predicted_seed_ours_s"] == pytest.approx(ours, rel=1e-9)
    assert e["predicted_seed_ref_s"] == pytest.approx(ref, rel=1e-9)
    assert e["value"] == pytest.approx(e["expected_ref_s"] / e["expected_ours_s"])
    assert e["draws"] == 100_000 and positive_finite(e["expected_ours_s"])
    assert m["direct_cm_calls_ref"]["switch_s"] >= 0 and m["direct_cm_calls_ref"]["encode_s"] > 0


def test_tiny_run_direct_cm_uses_the_same_starts_and_counts_steps(tiny_run):
    _, data = tiny_run
    s, m = data["settings"], data["measurements"]
    N, B, start = s["num_discr_timesteps"], s["batch_size"], s["start_indices"]
    assert len(start) == B and all(0 <= n < N for n in start)
    per_sample, ref_steps = sum(N - n for n in start), N - min(start)
    assert s["per_sample_steps_sum"] == per_sample and s["reference_loop_steps"] == ref_steps
    ours, ref = m["direct_cm_step_ours"], m["direct_cm_step_ref"]
    for row in (ours, ref):
        assert row["per_sample_steps_sum"] == per_sample and row["reference_loop_steps"] == ref_steps
    # Every solver step evaluates cond + uncond for each sample it advances.
    assert ref["teacher_sample_forwards"] == 2 * B * ref_steps
    assert ours["teacher_sample_forwards"] == 2 * per_sample
    assert ref["batched_cfg_calls"] == 0 and ref["separate_cfg_calls"] == ref_steps
    assert ours["batched_cfg_calls"] > 0 and ours["separate_cfg_calls"] > 0  # both CFG branches of ours ran


def test_tiny_run_direct_cm_targets_agree_in_float32(tiny_run):
    _, data = tiny_run
    a = data["measurements"]["direct_cm_agreement"]
    assert a["agree"] is True
    assert a["max_abs_diff"] <= 1e-4 and a["max_rel_diff"] <= 1e-4
    assert a["ours_batched_cfg_calls"] > 0 and a["ours_separate_cfg_calls"] > 0
    assert a["starts"] == data["settings"]["start_indices"]


def test_tiny_run_records_card_versions_and_settings(tiny_run):
    stdout, data = tiny_run
    env, s = data["env"], data["settings"]
    for key in ("card", "torch", "diffusers", "transformers", "peft", "timer"):
        assert env[key]
    assert env["timer"] == "perf_counter"  # the CPU fallback of the CUDA-event timer
    assert s["tiny"] is True and s["resolution"] == 64 and s["num_discr_timesteps"] == 10 and s["w"] == 9.0
    assert s["solver"] == "ddim"
    assert "speed-ups (ours vs reference)" in stdout


def test_compile_row_and_failure_isolation(tmp_path):
    """--compile path (dynamo's eager backend on the CPU, to stay fast), and an OOM in one measurement is
    reported in its row while the others still run; the exit status is 1 without --memory_cap_gib."""
    out = tmp_path / "b.json"
    r = run_bench("--tiny", "--device", "cpu", "--json", out, "--compile_backend", "eager", "--only",
                  "teacher_fwd_ours_compiled,student_images_ours,cm_step_ours", "--inject_oom", "student_images_ours",
                  check=False)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads(out.read_text())["measurements"]
    assert m["student_images_ours"]["status"] == "oom" and "out of memory" in m["student_images_ours"]["error"]
    assert m["cm_step_ours"]["status"] == "ok" and positive_finite(m["cm_step_ours"]["value"])
    c = m["teacher_fwd_ours_compiled"]
    assert c["status"] == "ok" and positive_finite(c["compile_s"]) and positive_finite(c["value"])
    assert "OOM" in r.stdout
    assert list(m) == ["teacher_fwd_ours_compiled", "student_images_ours", "cm_step_ours"]  # the order given


def test_teacher_forward_rows_view_flags_and_guards_and_merged_target(tmp_path):
    """Ours compiles the teacher view (models.base_view); +flags the UNet with its adapter flags off;
    +skip_guards is timed under dynamo's reduced guard check; every row also times its calls back to back.
    The CM step with --merged_target runs."""
    out = tmp_path / "v.json"
    run_bench("--tiny", "--device", "cpu", "--json", out, "--compile_backend", "eager", "--only",
              "teacher_fwd_ours_compiled,teacher_fwd_ours_compiled+flags,teacher_fwd_ours_compiled+skip_guards,"
              "cm_step_ours+blocks+merged_target")
    m = json.loads(out.read_text())["measurements"]
    assert all(row["status"] == "ok" for row in m.values()), {k: r.get("error") for k, r in m.items()}
    merged = m.pop("cm_step_ours+blocks+merged_target")
    assert positive_finite(merged["value"]) and "target pass on merged weights" in merged["notes"]
    for row in m.values():
        assert positive_finite(row["back_to_back_s_per_call"]) and positive_finite(row["host_s_per_call"])
        assert "back to back" in row["notes"]


def test_compiled_student_rows(tmp_path):
    """The optional compiled-student rows (AOTAutograd through the checkpointed LoRA UNet) run and report."""
    out = tmp_path / "cs.json"
    run_bench("--tiny", "--device", "cpu", "--json", out, "--only",
              "teacher_fwd_ours,student_step_ours,student_step_ours+compile,cm_step_ours+compile_student,"
              "student_step_ours+blocks+micro4,student_step_ours+micro2,direct_cm_calls_ref,student_step_ref,"
              "direct_cm_calls_ours,direct_cm_expected+micro2,direct_cm_expected+blocks+micro4,direct_cm_expected,"
              "direct_cm_steps_ours+lookahead2")
    m = json.loads(out.read_text())["measurements"]
    assert all(row["status"] == "ok" for row in m.values()), {k: r.get("error") for k, r in m.items()}
    assert "compiled student" in m["student_step_ours+compile"]["notes"]
    assert "compiled blocks, no block checkpointed, student in micro-batches of 4" in m[
        "student_step_ours+blocks+micro4"]["notes"]
    for variant, student in (("micro2", "student_step_ours+micro2"), ("blocks+micro4", "student_step_ours+blocks+micro4")):
        e = m[f"direct_cm_expected+{variant}"]  # ours' rows of that variant, the plain calls row
        assert e["calls_row"] == "direct_cm_calls_ours" and e["student_row"] == student
    p = m["direct_cm_steps_ours+lookahead2"]  # consecutive steps through the trajectory pool
    assert p["lookahead"] == 2 and p["sample_steps"] >= p["calls"] > 0
    assert p["mean_call_size"] == 4  # B = 4: every call full (batches are drawn past the last timed step)
    assert positive_finite(p["teacher_s_per_full_call"]) and positive_finite(p["speed_up_expected"])
    assert p["expected_ref_s"] == pytest.approx(m["direct_cm_expected"]["expected_ref_s"])  # one expectation
    assert positive_finite(m["student_step_ours"]["forward_equivalents"])


def test_two_processes_measure_together_and_report_once(tmp_path):
    """torchrun with 2 CPU processes (gloo): both run each measurement on their own batch at once, the LoRA
    gradients are all-reduced, rank 0 alone writes the JSON, and throughputs count both processes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(BENCH), "--tiny", "--device", "cpu",
                        "--no_compile", "--only", "cm_step_ours,teacher_images_ours", "--json", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["env"]["processes"] == 2
    m = data["measurements"]
    assert all(row["status"] == "ok" and row["processes"] == 2 for row in m.values())
    step, img = m["cm_step_ours"], m["teacher_images_ours"]
    assert step["samples_per_s"] == pytest.approx(2 * data["settings"]["batch_size"] / step["median_s"])
    assert img["value"] == pytest.approx(2 * data["settings"]["batch_size"] / img["median_s"])
    assert r.stdout.count("measurement ") == 1  # one table, from rank 0


def test_full_size_configs_have_sdxl_parameter_counts():
    bench = load_bench()
    unet, vae, te1, te2 = bench.build_sdxl_modules("meta")  # asserts the UNet's 2,567,463,684
    assert bench.count_params(unet) == bench.SDXL_UNET_PARAMS == 2_567_463_684
    assert bench.count_params(vae) == bench.SDXL_VAE_PARAMS
    assert bench.count_params(te1) == bench.CLIP_L_PARAMS
    assert bench.count_params(te2) == bench.CLIP_BIGG_PARAMS
    assert vae.config.scaling_factor == 0.13025 and unet.config.addition_embed_type == "text_time"


def test_micro_batch_knob_gives_the_whole_batch_gradient():
    """The bench's micro_batch knob (measured and rejected, RESULTS.md) computes the same gradient."""
    import torch
    from test_speed import inputs, student_unet

    from cmdistill.guidance import UNetEps

    bench = load_bench()
    assert bench.micro_batches(5, None) == [slice(0, 5)] and bench.micro_batches(5, 8) == [slice(0, 5)]
    assert bench.micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    unet = student_unet(torch.float32)
    x, t, cond = inputs(3, seed=5)
    target = torch.randn_like(x)

    def loss_of(sl):
        return ((UNetEps(unet)(x[sl], t[sl], {k: v[sl] for k, v in cond.items()}) - target[sl]) ** 2).mean()

    results = []
    for micro in (None, 2):
        loss = bench.backward_in_micro_batches(loss_of, 3, micro, lambda v: v.backward())
        results.append((loss, {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}))
        unet.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    assert any(g.abs().max() > 0 for g in g0.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_gpu_track_annotations_are_not_kernels():
    bench = load_bench()
    assert bench.is_annotation("## Call CompiledFxGraph f3u3fd5ie4nnr5uvb7gh7blsp3dvze62tbc3u4szfah4opolo6pf ##")
    assert not bench.is_annotation("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT")
    assert not bench.is_annotation("Memset (Device)")


def test_profile_row_breaks_kernel_time_down_by_kind(tmp_path):
    """--profile: the named row runs its step once more under torch.profiler and keeps the breakdown (on the
    CPU: aten operators' self time); other rows carry none; a row not measured is refused."""
    out = tmp_path / "p.json"
    run_bench("--tiny", "--device", "cpu", "--json", out, "--only", "teacher_fwd_ours,cm_step_ours,"
              "cm_step_ours+blocks+lookahead1,cm_step_ours+blocks+sac40+merged_target+lookahead1same",
              "--profile", "cm_step_ours,cm_step_ours+blocks+lookahead1")
    m = json.loads(out.read_text())["measurements"]
    ahead = m["cm_step_ours+blocks+lookahead1"]  # the teacher step issued one step ahead: 2B teacher samples a step
    assert ahead["status"] == "ok" and ahead["teacher_sample_forwards"] == 8 and "profile" in ahead
    same = m["cm_step_ours+blocks+sac40+merged_target+lookahead1same"]  # (on the current stream)
    assert same["status"] == "ok" and same["teacher_sample_forwards"] == 8 and "(same stream)" in same["notes"]
    assert "profile" not in m["teacher_fwd_ours"]
    p = m["cm_step_ours"]["profile"]
    assert positive_finite(p["busy_s"]) and positive_finite(p["wall_s"])
    assert {"convolution", "matmul"} <= set(p["by_kind_s"])  # the UNet's convs and linear layers were seen
    assert math.isclose(sum(p["by_kind_s"].values()), p["busy_s"], rel_tol=1e-6)
    assert p["top"] and all(positive_finite(k["s"]) and k["calls"] >= 1 for k in p["top"])
    r = run_bench("--tiny", "--device", "cpu", "--only", "cm_step_ours", "--profile", "cm_step_ref", check=False)
    assert r.returncode != 0 and "--profile: not measured in this run: cm_step_ref" in r.stderr


def test_random_sdxl_folder_trains_through_the_users_loading_path(tmp_path):
    """benchmarks/random_sdxl.py writes a pipeline folder and an image folder that train_cm.py takes as they are
    (--tiny here; the full-size build is the same code with the bench's SDXL configs)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    model, data, out = tmp_path / "sdxl", tmp_path / "data", tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_sdxl.py"), "--tiny", "--dtype", "fp32",
                    "--out", str(model), "--data", str(data), "--images", "3", "--size", "48"], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    assert (model / "model_index.json").is_file() and len(list(data.glob("*.jpg"))) == 3
    args = ["--pretrained_teacher_model", model, "--train_data_dir", data, "--output_dir", out, "--resolution", 64,
            "--train_batch_size", 2, "--num_discr_timesteps", 10, "--lora_rank", 4, "--lora_alpha", 4,
            "--max_train_steps", 1, "--validation_steps", 0, "--checkpointing_steps", 0, "--report_to", "none",
            "--center_crop", "--no_precomputed"]
    r = subprocess.run([sys.executable, str(ROOT / "train_cm.py"), *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and log[0]["step_s"] > 0


def test_idle_gaps_charge_each_gap_to_its_cause_and_launching_op():
    """The profile's idle-GPU breakdown on a made-up timeline (ns): overlapping kernels leave no gap; a gap
    spanned by a host sync is 'after a host sync'; one without is 'waiting for the CPU'; tiny gaps only add to
    the total."""
    b = load_bench()
    kernels = [(0, 100_000, "k0", 1), (50_000, 120_000, "k1", 1),  # overlap: no gap
               (170_000, 200_000, "k2", 2),   # 50 us gap after k1, a sync ran in it
               (300_000, 400_000, "k3", 3),   # 100 us gap, no sync
               (405_000, 500_000, "k4", 3)]   # 5 us: small
    syncs = [(110_000, 165_000)]
    g = b.idle_gaps(kernels, syncs, {1: "aten::mm", 2: "aten::copy_", 3: "aten::conv"})
    assert g["gaps"] == 2 and math.isclose(g["idle_s"], 155e-6) and math.isclose(g["small_gaps_s"], 5e-6)
    assert math.isclose(g["by_cause_s"]["after a host sync"], 50e-6)
    assert math.isclose(g["by_cause_s"]["waiting for the CPU"], 100e-6)
    assert list(g["by_op_s"]) == ["aten::conv", "aten::copy_"] and g["largest"][0]["next_kernel"] == "k3"
    # what the CPU did during each gap: events overlapping its window (k2 ends at 200 us, k3 starts at 300 us)
    host = [(190_000, 260_000, "TorchDynamo Cache Lookup"), (250_000, 290_000, "cudaMalloc"),
            (295_000, 299_000, "cudaLaunchKernel"), (310_000, 320_000, "aten::mm")]
    g = b.idle_gaps(kernels, syncs, {1: "aten::mm", 2: "aten::copy_", 3: "aten::conv"}, host=host)
    assert g["largest"][0]["host_in_gap_ms"] == {"TorchDynamo Cache Lookup": 0.06, "cudaMalloc": 0.04,
                                                  "cudaLaunchKernel": 0.004}
    assert math.isclose(b.union_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]), 30e-9)  # two streams overlap


def test_padded_conv_in_gives_the_same_output():
    """The bench's PaddedConvIn (4 input channels zero-padded to 8) computes the UNet's first convolution."""
    import torch

    b = load_bench()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 16, 3, padding=1)
    x = torch.randn(2, 4, 12, 12)
    padded = b.PaddedConvIn(conv)
    assert padded.extra == 4 and padded(x).shape == conv(x).shape
    torch.testing.assert_close(padded(x), conv(x), rtol=1e-5, atol=1e-6)


def test_layout_probe_runs_on_the_tiny_unet(tmp_path):
    """benchmarks/layout_probe.py on the tiny UNet (CPU): every block and setting gives a time and the eager
    block's output to bf16 rounding (here the channels_last layout pass with channel-wise group norms); an
    unknown setting is refused in one line."""
    probe = ROOT / "benchmarks" / "layout_probe.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "probe.json"
    args = ["--tiny", "--device", "cpu", "--resolution", "64", "--batch_size", "2", "--blocks", "down0,up1",
            "--repeats", "1"]
    r = subprocess.run([sys.executable, str(probe), *args, "--variants", "eager,nhwc_gn", "--json", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for v in ("eager", "nhwc_gn"):
        for n in ("down0", "up1"):
            assert positive_finite(rows[v][n]["ms"]) and rows[v][n]["rel_err_vs_eager"] < 2e-2, (v, n, rows[v][n])
        assert positive_finite(rows[v]["total_ms"])
    assert rows["eager"]["down0"]["rel_err_vs_eager"] == 0
    r = subprocess.run([sys.executable, str(probe), *args, "--variants", "nope"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "unknown 'nope'" in r.stderr.strip().splitlines()[-1]
