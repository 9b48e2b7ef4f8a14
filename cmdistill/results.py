"""Accumulated evaluation results and the paper-style table (docs/method.md §9, §10).

Every evaluated setting is one entry of ``OUTPUT_DIR/metrics.json`` and one line of
``OUTPUT_DIR/results.csv``; a rerun of a setting replaces its entry, other settings stay. Both files
are rewritten atomically under a lock, so evaluations sharing an output folder do not clobber each other.

    python -m cmdistill.results results/teacher-ddim runs/cm runs/direct_cm
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
from pathlib import Path

from .errors import UserError, exit_on_user_error
from .evaluation.store import atomic_write_text

METRICS_NAME = "metrics.json"
RESULTS_NAME = "results.csv"
LEADING_COLUMNS = ["setting", "kind", "method", "solver", "num_original_inference_steps", "guidance_scale",
                   "num_inference_steps", "weights", "lora_scale", "num_images", "fid", "fd_dinov2", "clip_score",
                   "aesthetic_score", "ode_error", "pixel_mse", "psnr"]
# (header, key, format) of the paper's table.
TABLE_COLUMNS = [("FID", "fid", "{:.2f}"), ("FD-DINO", "fd_dinov2", "{:.2f}"), ("CLIP", "clip_score", "{:.4f}"),
                 ("Aesthetic", "aesthetic_score", "{:.3f}"), ("ODE error", "ode_error", "{:.4f}")]
METHOD_NAMES = {"teacher": "Teacher", "cm": "CM", "direct_cm": "Direct CM"}


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(output_dir: str | Path) -> dict[str, dict]:
    path = Path(output_dir) / METRICS_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def record(output_dir: str | Path, setting: str, row: dict) -> None:
    """Add or replace the entry ``setting`` in ``metrics.json`` and ``results.csv`` of ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _locked(output_dir / ".results.lock"):
        data = load(output_dir)
        data[setting] = {"setting": setting, **row}
        atomic_write_text(output_dir / METRICS_NAME, json.dumps(data, indent=2, default=str) + "\n")
        extra = sorted({k for r in data.values() for k in r} - set(LEADING_COLUMNS))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LEADING_COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        for r in data.values():
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        atomic_write_text(output_dir / RESULTS_NAME, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The table


def row_label(r: dict) -> str:
    if r.get("kind") == "teacher":
        return f"Teacher ({str(r.get('solver', '')).upper()}, N={r.get('num_original_inference_steps')}, " \
               f"w={r.get('guidance_scale')})"
    k = r.get("num_inference_steps")
    name = METHOD_NAMES.get(r.get("method"), r.get("method") or "student")
    scale = r.get("lora_scale", 1.0)
    extra = f", LoRA x{scale}" if scale not in (None, 1, 1.0) else ""
    return f"{name}, {k} step{'s' if k != 1 else ''} ({r.get('weights')}{extra})"


def _order(r: dict):
    methods = list(METHOD_NAMES)
    m = r.get("method") or ""
    return (methods.index(m) if m in methods else len(methods), m, r.get("run", ""), r.get("weights") or "",
            r.get("num_inference_steps") or 0, r.get("num_original_inference_steps") or 0)


def collect(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        p = Path(p)
        folder = p.parent if p.name == METRICS_NAME else p
        if not (folder / METRICS_NAME).is_file():
            raise UserError(f"'{p}' has no {METRICS_NAME}: evaluate it first with test_teacher.py or test.py")
        rows += [{**r, "run": folder.name} for r in load(folder).values()]
    return sorted(rows, key=_order)


def _fmt(v, fmt: str) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(float(v))


def format_table(rows: list[dict], style: str = "text") -> str:
    header = ["Run", "Setting"] + [h for h, _, _ in TABLE_COLUMNS]
    body = [[r["run"], row_label(r)] + [_fmt(r.get(k), f) for _, k, f in TABLE_COLUMNS] for r in rows]
    if style == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header] + body)
        return buf.getvalue().rstrip("\n")
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("| " + " | ".join(cells) + " |") if style == "markdown" else "  ".join(cells)

    rule = ("|" + "|".join("-" * (w + 2) for w in widths) + "|") if style == "markdown" else \
        "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(b) for b in body])


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cmdistill.results",
                                description="Print the paper-style table (teacher, CM, Direct CM x sampling steps; "
                                            "FID, FD-DINO, CLIP, aesthetic, ODE error) of evaluated output folders.")
    p.add_argument("output_dirs", nargs="+", help="folders holding metrics.json (test_teacher.py / test.py outputs)")
    p.add_argument("--format", default="text", choices=["text", "markdown", "csv"])
    args = p.parse_args(argv)
    print(format_table(collect(args.output_dirs), args.format))


if __name__ == "__main__":
    main()
