"""cmdistill.results and cmdistill.plots on fake run folders (metrics.json, training_config.json,
train_log.jsonl): every metric a column, aggregation over training seeds, plots written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmdistill import results, summary


def fake_run(root: Path, name: str, objective: str | None, seed: int | None, metrics_by_k: dict, lr=1e-3,
             extra_rows: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    data = {}
    for k, m in metrics_by_k.items():
        if objective is None:
            data[f"teacher/ddim/{k}_steps/3.0_gscale"] = {"kind": "teacher", "method": "teacher", "solver": "ddim",
                                                         "num_original_inference_steps": k, "guidance_scale": 3.0,
                                                         "num_inference_steps": k, "seed": 24, "num_images": 8, **m}
        else:
            data[f"student/final/{k}_steps"] = {"kind": "student", "method": objective, "weights": "final",
                                                "lora_scale": 1.0, "num_inference_steps": k,
                                                "num_original_inference_steps": 10, "seed": 24, "num_images": 8,
                                                "folder": str(d / f"{k}"), "time": f"t{seed}",
                                                "lora_sha256": f"{name}", **m}
    data.update(extra_rows or {})
    (d / "metrics.json").write_text(json.dumps(data))
    if objective is not None:
        cfg = {"objective": objective, "seed": seed, "learning_rate": lr, "output_dir": str(d), "w": 3.0,
               "precomputed_dir": str(root / "pre")}
        (d / "training_config.json").write_text(json.dumps(cfg))
        (d / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s + seed}) + "\n"
                                                   for s in range(1, 21)))
    return d


@pytest.fixture
def runs(tmp_path):
    t = fake_run(tmp_path, "teacher", None, None, {10: {"fd_toy": 70.0, "toy_caption_acc": 0.9}})
    out = [t]
    for seed in (0, 1, 2):
        for obj, base in (("cm", 0.3), ("direct_cm", 0.2)):
            out.append(fake_run(tmp_path, f"{obj}_seed{seed}", obj, seed, {
                k: {"ode_error": base / k + 0.01 * seed, "fd_toy": 100.0 / k + seed, "toy_caption_acc": 0.5 + 0.1 * k,
                    "pixel_mse": 0.01 * k, "psnr": 20.0 + k, "my_new_metric": 1.5 + seed} for k in (1, 2, 4)}))
    # Another recipe (a different learning rate): a separate row, never averaged with the others.
    out.append(fake_run(tmp_path, "cm_lr", "cm", 0, {1: {"ode_error": 9.0, "fid": 12.5}}, lr=1e-4))
    return out


def test_table_has_every_metric_and_aggregates_over_seeds(runs):
    rows = results.collect([str(r) for r in runs])
    text = results.format_table(rows, "markdown")
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["Model", "Steps", "Seeds"]
    # Known metrics in their order, then the unknown one; FID appears because one run has it.
    assert header[3:-1] == ["FID", "toy FD", "caption acc.", "ODE error", "pixel MSE", "PSNR", "my_new_metric"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    assert body[0][0].startswith("Teacher") and body[0][2] == "1" and body[0][4] == "70"
    cm1 = next(b for b in body if b[0] == "CM [learning_rate=0.001]" and b[1] == "1")
    assert cm1[2] == "3"  # three seeds
    assert cm1[6] == "0.31 ± 0.01"  # ODE error: mean of 0.30, 0.31, 0.32, std 0.01
    assert cm1[4] == "101 ± 1"
    assert cm1[9] == "2.5 ± 1"
    assert cm1[3] == "-"  # no FID in this group
    assert [b[0] for b in body if b[0].startswith("Direct CM")] == ["Direct CM"] * 3  # no collision, no name
    # The other recipe: its own row, labelled by the setting in which it differs from the 3-seed CM.
    other = [b for b in body if b[-1] == "cm_lr"]
    assert len(other) == 1 and other[0][2] == "1" and other[0][3] == "12.50"
    assert other[0][0] == "CM [learning_rate=0.0001]"
    assert "seeds 0, 1, 2" in text
    assert len(results.format_table(rows, "csv").splitlines()) == 1 + len(body)


def test_report_writes_table_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    results.main([str(r) for r in runs] + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert "my_new_metric" in printed and "wrote" in printed
    for name in ("table.md", "table.csv", "table.json", "metrics_vs_steps.png", "ode_error_vs_fd.png", "loss.png"):
        assert (out / name).stat().st_size > 100, name
    for name in ("metrics_vs_steps.png", "ode_error_vs_fd.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = json.loads((out / "table.json").read_text())
    assert any(e["n"] == 3 and e["seeds"] == [0, 1, 2] for e in entries)
    assert not (out / "metrics_vs_training_step.png").exists()  # no checkpoints evaluated


def test_metric_against_training_step_plot(tmp_path):
    rows = {f"student/checkpoint-{s}/1_steps": {"kind": "student", "method": "cm", "weights": f"checkpoint-{s}",
                                                "training_step": s, "num_inference_steps": 1, "ode_error": 1.0 / s}
            for s in (10, 20, 30)}
    run = fake_run(tmp_path, "cm_seed0", "cm", 0, {1: {"ode_error": 0.02}}, extra_rows=rows)
    r = results.collect([str(run)])
    assert [e["model"] for e in results.aggregate(r)] == ["CM", "CM (checkpoint-10)", "CM (checkpoint-20)",
                                                         "CM (checkpoint-30)"]
    files = results.write_report(r, tmp_path / "rep")
    assert files["metrics_vs_training_step.png"].stat().st_size > 1000


def test_missing_metrics_json_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        results.main([str(tmp_path)])
    assert "has no metrics.json" in capsys.readouterr().err


def test_compare_pairs_the_objectives_by_setting_and_seed(runs):
    rows = results.collect([str(r) for r in runs])
    ode = {c["steps"]: c for c in summary.compare(rows, "ode_error")}
    assert set(ode) == {1, 2, 4}  # the lr=1e-4 CM has no Direct CM of its recipe: no comparison
    c = ode[2]
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2] and (c["better"], c["worse"]) == (3, 0)
    assert c["a"] == pytest.approx(0.2 / 2 + 0.01) and c["b"] == pytest.approx(0.3 / 2 + 0.01)
    assert c["setting"]["learning_rate"] == 1e-3 and "objective" not in c["setting"]
    fd = summary.compare(rows, "fd_toy")[0]  # the same values for both objectives: tied in every seed
    assert (fd["better"], fd["worse"]) == (0, 0)
    acc = summary.compare(rows, "toy_caption_acc", lower_is_better=False)[0]
    assert acc["better"] == acc["worse"] == 0
