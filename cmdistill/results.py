"""Accumulated evaluation results and the paper-style table (docs/method.md §9, §10).

Every evaluated setting is one entry of ``OUTPUT_DIR/metrics.json`` and one line of
``OUTPUT_DIR/results.csv``; a rerun of a setting replaces its entry, other settings stay. Both files
are rewritten atomically under a lock, so evaluations sharing an output folder do not clobber each other.

    python -m cmdistill.results results/teacher-ddim runs/cm_seed0 runs/cm_seed1 runs/direct_cm_seed0 --out report

The table shows every metric present in the runs (the paper's, the toy world's, pixel errors), known ones
first; runs whose training configuration differs only by the seed are one row, mean ± standard deviation
over the seeds (the column ``seeds`` says how many). ``--out DIR`` also writes the table (``table.md``,
``table.csv``, ``table.json``) and the plots of ``cmdistill.plots`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Iterable

from . import plots
from .errors import UserError, exit_on_user_error
from .files import atomic_write_text
from .run_folder import COMPARED_SETTINGS, CONFIG_NAME, METRICS_NAME
from .summary import (METHOD_NAMES, SETTING_FIELDS, aggregate, finite_number, metric_format, metric_header,
                      metric_keys)

RESULTS_NAME = "results.csv"
LEADING_COLUMNS = ["setting", "kind", "method", "solver", "num_original_inference_steps", "guidance_scale",
                   "num_inference_steps", "weights", "lora_scale", "num_images", "fid", "fd_dinov2", "clip_score",
                   "aesthetic_score", "ode_error", "pixel_mse", "psnr"]


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
        atomic_write_text(output_dir / RESULTS_NAME, rows_csv(data.values()))


def rows_csv(rows: Iterable[dict], leading: list[str] = LEADING_COLUMNS) -> str:
    """Results rows as CSV: the ``leading`` columns, then every other field alphabetically; empty for None."""
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(leading))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(leading) + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Rows of run folders

# Training settings that do not change what is learned (paths, logging, speed): ignored when runs are grouped.
# A run's recipe: the settings that change what is trained (the resume check's list), less the seed. Speed flags,
# folders, the split of the global batch over processes and the cadence of checkpoints and logs leave it alone.
RECIPE_SETTINGS = tuple(k for k in COMPARED_SETTINGS if k != "seed")
# Fields of a results row that do not identify the evaluated setting.
IGNORED_ROW = {"folder", "time", "run", "run_dir", "train_seed", "group", "recipe", "training_step", "lora_sha256"}


def _recipe(cfg: dict) -> str:
    """A training configuration's recipe (``RECIPE_SETTINGS``): runs that differ only by seed share it."""
    return json.dumps({k: cfg[k] for k in RECIPE_SETTINGS if k in cfg}, sort_keys=True, default=str)


def _read_config(folder: Path) -> dict:
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def collect(paths: list[str]) -> list[dict]:
    """Every results row of the run folders ``paths`` (or their metrics.json), with ``run`` (the folder's name),
    ``run_dir``, ``train_seed`` (the training seed, None for the teacher) and ``group`` (the row's identity less
    the training seed: rows sharing it are the same model and setting over seeds)."""
    rows = []
    for p in paths:
        p = Path(p)
        folder = p.parent if p.name == METRICS_NAME else p
        if not (folder / METRICS_NAME).is_file():
            raise UserError(f"'{p}' has no {METRICS_NAME}: evaluate it first with test_teacher.py or test.py")
        cfg = _read_config(folder)
        recipe = _recipe(cfg) if cfg else f"folder:{folder.resolve()}"
        for r in load(folder).values():
            ident = {k: v for k, v in r.items() if k not in IGNORED_ROW and not (k not in SETTING_FIELDS and
                                                                                   finite_number(v))}
            rows.append({**r, "run": folder.name, "run_dir": str(folder), "train_seed": cfg.get("seed"),
                         "recipe": recipe, "group": recipe + "|" + json.dumps(ident, sort_keys=True, default=str)})
    return sorted(rows, key=_order)


def _order(r: dict):
    methods = list(METHOD_NAMES)
    m = r.get("method") or ""
    w = r.get("weights") or ""
    step = r.get("training_step")
    wkey = (0 if w == "final" else 1, step if step is not None else -1, w)
    return (methods.index(m) if m in methods else len(methods), m, wkey, r.get("num_inference_steps") or 0,
            r.get("num_original_inference_steps") or 0, r.get("run", ""))


# ---------------------------------------------------------------------------------------------
# The table and the report


def _cell(stat, key: str) -> str:
    if stat is None:
        return "-"
    m, sd, n = stat
    fmt = metric_format(key)
    return fmt.format(m) if n == 1 else f"{fmt.format(m)} ± {sd:.2g}"


def _runs_cell(e: dict) -> str:
    runs = list(dict.fromkeys(e["runs"]))
    return runs[0] if len(runs) == 1 else f"{runs[0]} +{len(runs) - 1}"


def table_rows(entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = metric_keys(r for e in entries for r in e["rows"])
    header = ["Model", "Steps", "Seeds", *[metric_header(k) for k in keys], "Runs"]
    body = [[e["model"], str(e["steps"]), str(e["n"]), *[_cell(e["metrics"].get(k), k) for k in keys], _runs_cell(e)]
            for e in entries]
    return header, body


def format_table(rows: list[dict], style: str = "text") -> str:
    """The table of the rows of :func:`collect`: one line per model and number of sampling steps, every metric
    present, mean ± standard deviation over the training seeds of a group."""
    entries = aggregate(rows)
    header, body = table_rows(entries)
    if style == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header] + body)
        return buf.getvalue().rstrip("\n")
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *body)]

        def line(cells):
            return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    seeds = sorted({s for e in entries for s in e["seeds"]})
    if any(e["n"] > 1 for e in entries):
        lines.append(f"\n(mean ± standard deviation over the training seeds of each row, 'Seeds' of them; "
                     f"seeds {', '.join(map(str, seeds))})")
    return "\n".join(lines)


def write_report(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """``table.md``, ``table.csv``, ``table.json`` and the plots (``cmdistill.plots``) in ``out_dir``. Returns
    name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, style in (("table.md", "markdown"), ("table.csv", "csv")):
        files[name] = out_dir / name
        atomic_write_text(files[name], format_table(rows, style) + "\n")
    entries = aggregate(rows)
    files["table.json"] = out_dir / "table.json"
    summary = [{k: v for k, v in e.items() if k not in ("rows", "model_key")} for e in entries]
    atomic_write_text(files["table.json"], json.dumps(summary, indent=1, default=str) + "\n")
    files.update(plots.write_plots(rows, out_dir))
    return files


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cmdistill.results",
                                description="The table of evaluated output folders (teacher, CM, Direct CM x sampling "
                                            "steps; every metric present; mean ± std over runs that differ only by "
                                            "the training seed) and, with --out, its plots.")
    p.add_argument("output_dirs", nargs="+", help="folders holding metrics.json (test_teacher.py / test.py outputs)")
    p.add_argument("--format", default="text", choices=["text", "markdown", "csv"])
    p.add_argument("--out", default=None, help="folder for table.md/.csv/.json and the plots (PNG)")
    args = p.parse_args(argv)
    rows = collect(args.output_dirs)
    print(format_table(rows, args.format))
    if args.out:
        files = write_report(rows, args.out)
        print(f"\nwrote {', '.join(str(f) for f in files.values())}")


if __name__ == "__main__":
    main()
