"""Plots of evaluated runs (matplotlib, Agg backend), beside the table of ``cmdistill.results``:

- ``metrics_vs_steps.png``: each metric against the number of sampling steps, one line per model, error bars
  = standard deviation over training seeds; the teacher as a dashed level;
- ``ode_error_vs_fd.png``: ODE error against the Frechet distance (toy FD, FID or FD-DINO, whichever present),
  one point per model x sampling steps (the paper's argument: a lower ODE error need not mean better samples);
- ``loss.png``: the training loss of the compared runs (``train_log.jsonl``, smoothed);
- ``metrics_vs_training_step.png``: each metric against the training step, where several checkpoints of a run
  were evaluated (``test.py --checkpoints``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .summary import aggregate, metric_header, metric_keys, model_label

FD_KEYS = ["fd_toy", "fid", "fd_dinov2"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, title: str):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(entries, key):
    """model -> sorted [(x = sampling steps, mean, std)] of the students."""
    out: dict[str, list] = {}
    for e in entries:
        if e["kind"] != "teacher" and key in e["metrics"] and e["steps"] is not None:
            m, sd, _ = e["metrics"][key]
            out.setdefault(e["model"], []).append((e["steps"], m, sd))
    return {k: sorted(v) for k, v in out.items()}


def metrics_vs_steps(entries: list[dict], keys: list[str], path: Path):
    plt = _plt()
    keys = [k for k in keys if _series(entries, k) or any(k in e["metrics"] for e in entries)]
    if not keys:
        return None
    fig, axes = _grid(plt, len(keys), "metrics against sampling steps (mean ± std over seeds)")
    for ax, k in zip(axes, keys):
        for model, pts in _series(entries, k).items():
            xs, ms, sds = zip(*pts)
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=model)
        for i, e in enumerate(e for e in entries if e["kind"] == "teacher" and k in e["metrics"]):
            ax.axhline(e["metrics"][k][0], ls="--", color=f"C{7 + i % 3}", label=e["model"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(metric_header(k))
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def ode_vs_fd(entries: list[dict], path: Path):
    fd = next((k for k in FD_KEYS if any(k in e["metrics"] and "ode_error" in e["metrics"] for e in entries)), None)
    if fd is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    models = list(dict.fromkeys(e["model"] for e in entries if e["kind"] != "teacher"))
    for i, model in enumerate(models):
        pts = sorted((e["steps"], e["metrics"]["ode_error"], e["metrics"][fd]) for e in entries
                     if e["model"] == model and "ode_error" in e["metrics"] and fd in e["metrics"])
        if not pts:
            continue
        ks, xs, ys = zip(*pts)
        ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                    fmt="o", capsize=3, color=f"C{i}", label=model)
        for k, x, y in zip(ks, xs, ys):
            ax.annotate(f"{k}", (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ODE error (latent MSE to the teacher)")
    ax.set_ylabel(metric_header(fd))
    ax.set_title(f"ODE error vs {metric_header(fd)} (labels: sampling steps)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def read_loss(run_dir: Path) -> list[tuple[int, float]]:
    path = Path(run_dir) / "train_log.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and isinstance(d.get("loss"), (int, float)) and "step" in d:
                out.append((int(d["step"]), float(d["loss"])))
    return sorted(out)


def loss_curves(rows: list[dict], path: Path):
    plt = _plt()
    runs = {}
    for r in rows:
        if r.get("kind") != "teacher":
            runs.setdefault(r["run_dir"], r)
    curves = {d: read_loss(Path(d)) for d in runs}
    curves = {d: c for d, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for d, c in curves.items():
        r = runs[d]
        label = model_label({**r, "weights": "final", "lora_scale": 1.0})
        colour = colours.setdefault(label, f"C{len(colours)}")
        steps, loss = zip(*c)
        w = max(1, len(loss) // 30)
        smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, color=colour, alpha=0.8, label=f"{label} ({Path(d).name})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (running mean)")
    ax.set_title("training loss")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def metrics_vs_training_step(rows: list[dict], keys: list[str], path: Path):
    """Per run and sampling steps, each metric against the training step of the evaluated checkpoint, where a
    run has more than one."""
    series: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") == "teacher" or r.get("training_step") is None:
            continue
        series.setdefault((r["run"], model_label({**r, "weights": "final"}), r.get("num_inference_steps")), {})[
            int(r["training_step"])] = r
    series = {k: v for k, v in series.items() if len(v) > 1}
    keys = [k for k in keys if any(k in r for v in series.values() for r in v.values())]
    if not series or not keys:
        return None
    plt = _plt()
    fig, axes = _grid(plt, len(keys), "metrics over training (evaluated checkpoints)")
    for ax, k in zip(axes, keys):
        for (run, label, K), pts in sorted(series.items(), key=lambda kv: str(kv[0])):
            xs = sorted(s for s, r in pts.items() if isinstance(r.get(k), (int, float)))
            if xs:
                ax.plot(xs, [pts[s][k] for s in xs], marker="o", label=f"{run} K={K}")
        ax.set_xlabel("training step")
        ax.set_title(metric_header(k))
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def write_plots(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """Every plot the rows allow, as PNG in ``out_dir``; returns file name -> path."""
    out_dir = Path(out_dir)
    entries = aggregate(rows)
    keys = metric_keys(rows)
    made = {
        "metrics_vs_steps.png": metrics_vs_steps(entries, keys, out_dir / "metrics_vs_steps.png"),
        "ode_error_vs_fd.png": ode_vs_fd(entries, out_dir / "ode_error_vs_fd.png"),
        "loss.png": loss_curves(rows, out_dir / "loss.png"),
        "metrics_vs_training_step.png": metrics_vs_training_step(rows, keys, out_dir / "metrics_vs_training_step.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
