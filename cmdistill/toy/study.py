"""The toy study's results (``cmdistill.toy.sweep``'s finished cells): the summary files, where each half of the
finding holds, docs/toy_study.md; and the command lines ``python -m cmdistill.toy sweep`` / ``report``.

Every statement of the report is computed from the cells' metrics (``cmdistill.summary.compare``: Direct CM
against CM per setting and number of sampling steps, paired by training seed); nothing in it is written by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import results, summary
from ..errors import UserError
from .sweep import (AXES, CONFIG_FLAGS, OBJECTIVES, SWEEP_CONFIG_NAME, Cell, cells, complete, dry_run, final_rows,
                    finished, parser, run, setting_name)

# The folder in --results with cells that ran again on another device (a results folder of its own): the report
# compares their numbers with the cells' own.
CHECK_NAME = "device_check"
CHECK_METRICS = (("fd_toy", "toy FD"), ("toy_caption_acc", "caption acc."), ("ode_error", "ODE error"))


def _rows(a, cell_names=None, teachers=None) -> list[dict]:
    res = Path(a.results)
    folders = [d for d in sorted((res / "cells").glob("*")) if (d / results.METRICS_NAME).is_file()
               and (cell_names is None or d.name in cell_names)]
    folders += [d for d in sorted((res / "teachers").glob("*")) if (d / results.METRICS_NAME).is_file()
                and (teachers is None or d.name in teachers)]
    if not folders:
        return []
    steps = set(a.num_inference_steps)
    return [r for r in results.collect([str(f) for f in folders])
            if r.get("kind") == "teacher" or r.get("num_inference_steps") in steps]


def _finished_cells(a) -> list[Cell]:
    out = []
    for d in sorted((Path(a.results) / "cells").glob("*")):
        try:
            c = Cell.parse(d.name)
        except UserError:
            continue
        if finished(a, c):
            out.append(c)
    return out


def summarize(a) -> dict[str, Path]:
    """``sweep.csv`` / ``sweep.json`` (every finished cell, mean ± std over seeds), ``cells.csv`` and, per setting,
    the table and plots of ``cmdistill.results`` in ``--results/<setting>/``."""
    res = Path(a.results)
    done = _finished_cells(a)
    files = {}
    if not done:
        return files
    rows = _rows(a, {c.name for c in done})
    files["sweep.csv"] = res / "sweep.csv"
    files["sweep.csv"].write_text(results.format_table(rows, "csv") + "\n")
    entries = [{**{k: v for k, v in e.items() if k not in ("rows", "model_key", "run_dirs")},
                "method": e["rows"][0].get("method"), **_setting_of(e["rows"][0])} for e in summary.aggregate(rows)]
    files["sweep.json"] = res / "sweep.json"
    files["sweep.json"].write_text(json.dumps(entries, indent=1, default=str) + "\n")
    files["cells.csv"] = res / "cells.csv"
    files["cells.csv"].write_text(results.rows_csv(
        [{"cell": r["run"], **{k: v for k, v in r.items() if k not in ("group", "recipe", "run_dir", "folder")}}
         for r in rows], ["cell", *results.LEADING_COLUMNS]))
    for setting in dict.fromkeys(c.setting for c in done):
        members = [c for c in done if c.setting == setting]
        c0 = members[0]
        rows = _rows(a, {c.name for c in members}, {f"N{c0.N}_w{c0.w:g}"})
        for name, path in results.write_report(rows, res / setting).items():
            files[f"{setting}/{name}"] = path
    return files


def _setting_of(r: dict) -> dict:
    """budget, N, w of a results row (from its recipe; the teacher's from its own fields)."""
    if r.get("kind") == "teacher":
        return {"N": r.get("num_original_inference_steps"), "w": r.get("guidance_scale")}
    rec = json.loads(r["recipe"]) if str(r.get("recipe", "")).startswith("{") else {}
    return {"budget": rec.get("max_train_steps"), "N": rec.get("num_discr_timesteps"), "w": rec.get("w")}


def _fmt_setting(s: dict) -> str:
    return f"budget {s.get('max_train_steps')}, N = {s.get('num_discr_timesteps')}, w = {s.get('w'):g}"


# The two halves of the paper's finding, as comparisons of Direct CM with CM: (metric, lower is better, the claim,
# whether the claim is that Direct CM is better on it).
HALVES = (("ode_error", True, "Direct CM's ODE error is lower than CM's", True),
          ("fd_toy", True, "Direct CM's toy FD is worse (higher) than CM's", False),
          ("toy_caption_acc", False, "Direct CM's caption accuracy is worse (lower) than CM's", False))


def findings(rows: list[dict]) -> list[dict]:
    """Per metric of the two halves: every comparison of Direct CM with CM (``summary.compare``), whether it goes
    the paper's way on the seed mean (``holds``) and in how many seeds (``seeds_way``; a tied seed goes neither
    way)."""
    out = []
    for key, lower_is_better, claim, dcm_better in HALVES:
        comps = summary.compare(rows, key, lower_is_better)
        for c in comps:
            sign = (1 if lower_is_better else -1) * (1 if dcm_better else -1)
            c["holds"] = sign * (c["a"] - c["b"]) < 0
            c["seeds_way"] = c["better"] if dcm_better else c["worse"]
        out.append({"key": key, "claim": claim, "comparisons": comps})
    return out


def _where(comps: list[dict], holds: bool) -> str:
    """'budget 150, N = 10, w = 3 at 1 step (3 of 3 seeds), 2 steps (2 of 3 seeds); ...': the comparisons that
    hold (or not), by setting, with the seeds that go the paper's way."""
    def order(c):
        s = c["setting"]
        return (s.get("max_train_steps") or 0, s.get("num_discr_timesteps") or 0, s.get("w") or 0, c["steps"] or 0)

    by: dict[str, list] = {}
    for c in sorted(comps, key=order):
        if c["holds"] == holds:
            by.setdefault(_fmt_setting(c["setting"]), []).append(c)
    parts = []
    for s, cs in by.items():
        parts.append(f"{s} at " + ", ".join(f"{c['steps']} step{'s' if c['steps'] != 1 else ''} ({c['seeds_way']} of "
                                            f"{c['n']} seeds)" for c in cs))
    return "; ".join(parts) or "nowhere"


AXIS_TITLES = {"budget": "Training budget (N = {N}, w = {w:g})", "grid": "Teacher grid N (budget {budget}, w = {w:g})",
               "guidance": "Guidance w (budget {budget}, N = {N})"}


def on_axis(a, axis: str, cell: Cell) -> bool:
    """Whether ``cell`` lies on ``axis`` around the base setting (N, w of the recipe, --fixed_budget)."""
    N, w, fixed = a.num_discr_timesteps, float(a.w), a.fixed_budget
    return {"budget": cell.N == N and cell.w == w, "grid": cell.budget == fixed and cell.w == w,
            "guidance": cell.budget == fixed and cell.N == N}[axis]


def _section(a, title: str, members: list[Cell], rel: Path) -> list[str]:
    """A report section: the table of ``members`` with their teachers' rows, the ODE-error-vs-FD plot per setting."""
    rows = _rows(a, {c.name for c in members}, {f"N{c.N}_w{c.w:g}" for c in members})
    lines = [f"## {title}", "", results.format_table(rows, "markdown"), ""]
    for c in sorted({(c.budget, c.N, c.w) for c in members}):
        s = setting_name(*c)
        if (Path(a.results) / s / "ode_error_vs_fd.png").is_file():
            lines.append(f"![ODE error against toy FD, {s}]({(rel / s / 'ode_error_vs_fd.png').as_posix()})")
    return lines + [""]


def _cells(n: int) -> str:
    return f"{n} cell{'s' if n != 1 else ''}"


def _devices(by_device: dict[str, list[str]], checked: bool) -> list[str]:
    """Which cells ran where (``by_device``: device -> its cells, the most used first), when they ran on more
    than one kind of device; ``checked``: the report has the section that compares devices."""
    if len(by_device) < 2:
        return []
    main, *others = by_device
    return [f"Devices: {_cells(len(by_device[main]))} ran on {main}; "
            + "; ".join(f"on {k}: {', '.join(sorted(by_device[k]))}" for k in others)
            + "." + (" The section \"Same cells on two devices\" measures what the device changes." if checked
                     else ""), ""]


def device_check(a, check: Path, shown: Path) -> list[str]:
    """The section comparing the cells in ``check`` (a results folder of the same recipe, run on another device;
    ``shown``: its path in the report) with the same cells in ``--results``: their numbers side by side, the
    largest differences, whether Direct CM against CM goes the same way on both devices, and the cells left out
    with the reason."""
    pairs, skipped = {}, []
    for d in sorted((check / "cells").glob("*")):
        try:
            c = Cell.parse(d.name)
        except UserError:
            continue
        here = Path(a.results) / "cells" / d.name
        try:
            ia, ib = (json.loads((f / "cell.json").read_text()) for f in (here, d))
            ra, rb = results.load(here), results.load(d)
        except (OSError, ValueError):
            skipped.append(f"{c.name} (no readable cell.json and metrics.json in both folders)")
            continue
        why = ("made with another recipe" if ia.get("recipe") != ib.get("recipe") else
               "the same device" if ia.get("device") == ib.get("device") else
               "not trained there (its cell.json has no training time)"
               if not any(k.startswith("train_") for k in ib.get("seconds", {})) else
               "incomplete metrics" if not (complete(a, ra) and complete(a, rb)) else None)
        if why:
            skipped.append(f"{c.name} ({why})")
            continue
        pairs[c] = (ia.get("device", "?"), ib.get("device", "?"), final_rows(ra), final_rows(rb))
    if not pairs and not skipped:
        return []
    steps = a.num_inference_steps
    table = ["| Cell | Devices | Steps | " + " | ".join(name for _, name in CHECK_METRICS) + " |",
             "|" + "---|" * (3 + len(CHECK_METRICS))]
    worst = {m: 0.0 for m, _ in CHECK_METRICS}
    for c, (da, db, ra, rb) in pairs.items():
        for k in steps:
            table.append(f"| {c.name} | {da} / {db} | {k} | " + " | ".join(
                f"{ra[k][m]:.4g} / {rb[k][m]:.4g}" for m, _ in CHECK_METRICS) + " |")
            for m, _ in CHECK_METRICS:
                worst[m] = max(worst[m], abs(ra[k][m] - rb[k][m]) / max(abs(ra[k][m]), 1e-12))
    same = total = 0
    for c, (da, db, ra, rb) in pairs.items():
        other = pairs.get(Cell(OBJECTIVES[1], c.budget, c.N, c.w, c.seed))
        if c.objective != OBJECTIVES[0] or other is None or other[:2] != (da, db):
            continue
        for k in steps:
            for m, _ in CHECK_METRICS:
                total += 1
                same += _sign(ra[k][m] - other[2][k][m]) == _sign(rb[k][m] - other[3][k][m])
    lines = ["## Same cells on two devices", ""]
    if pairs:
        lines += [f"{_cells(len(pairs))} ran again on another device (`{shown.as_posix()}`, each with its "
                  "command in its `cell.json`), with the same recipe and seeds; each entry below reads: on the "
                  "first device / on the second, as the Devices column names them. Largest relative difference: "
                  + ", ".join(f"{name} {100 * worst[m]:.2g} %" for m, name in CHECK_METRICS) + "."
                  + (f" Direct CM against CM goes the same way on both devices in {same} of {total} comparisons "
                     "(metric x sampling steps; a tie goes neither way)." if total else ""), "", *table, ""]
    if skipped:
        lines += [f"Not compared: {'; '.join(skipped)}.", ""]
    return lines


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def report(a) -> Path:
    """docs/toy_study.md from the finished cells: the statements of where each half holds, the tables per axis,
    the plots per setting; every number read from ``--results``."""
    files = summarize(a)
    done = _finished_cells(a)
    if not done:
        raise UserError(f"no finished cell in '{a.results}': run `python -m cmdistill.toy sweep` first")
    doc = Path(a.doc)
    rel = Path(os.path.relpath(Path(a.results), doc.parent))
    rows = _rows(a, {c.name for c in done})
    infos = [json.loads((Path(a.results) / "cells" / c.name / "cell.json").read_text()) for c in done]
    check = device_check(a, Path(a.results) / CHECK_NAME, rel / CHECK_NAME)
    by_device: dict[str, list[str]] = {}
    for i in infos:
        by_device.setdefault(i.get("device", "?"), []).append(i["cell"])
    by_device = dict(sorted(by_device.items(), key=lambda kv: -len(kv[1])))  # the most used device first
    devices = ", ".join(f"{len(v)} on {k}" for k, v in by_device.items())
    seeds = sorted({c.seed for c in done})
    steps = ", ".join(map(str, a.num_inference_steps))
    lines = [
        "# The toy study: where does \"better ODE solving, worse samples\" hold?",
        "",
        f"Written by `python -m cmdistill.toy report` from the {len(done)} finished cells in `{a.results}` "
        f"({devices}); every number below is read from there. The paper's finding has two halves: "
        "Direct CM solves the teacher's ODE better than CM (a lower ODE error), yet its samples are worse. Each "
        "cell distils one seed of one objective with the demo's recipe (batch "
        f"{a.train_batch_size}, LoRA rank {a.lora_rank}, lr {a.learning_rate:g}, {a.solver.upper()} teacher) and "
        f"is scored at {steps} sampling steps on {a.num_prompts} captions: toy FD against the teacher's samples, "
        "caption accuracy, ODE error (latent MSE to the teacher's ODE solution from the same noise). Seeds: "
        f"{', '.join(map(str, seeds))}; a comparison is made on the seeds both objectives have, and says in how "
        "many of them it goes the paper's way.",
        "",
        "Reproduce: `python -m cmdistill.toy sweep` (it skips finished cells), one cell with the command in its "
        "`cell.json`.",
        "",
        *_devices(by_device, bool(check)),
        "## Where each half holds",
        "",
    ]
    for f in findings(rows):
        comps = f["comparisons"]
        if not comps:
            continue
        held = [c for c in comps if c["holds"]]
        every = sum(1 for c in held if c["seeds_way"] == c["n"])
        half = "First half" if f["key"] == "ode_error" else "Second half"
        lines += [f"**{half}: {f['claim']}.** On the seed mean it holds in {len(held)} of {len(comps)} comparisons "
                  f"(setting x sampling steps), in every seed in {every} of them.",
                  "",
                  f"- holds: {_where(comps, True)}.",
                  f"- does not hold: {_where(comps, False)}.",
                  ""]
    # Tables and plots, axis by axis: every finished cell on the axis (whatever the sweep's lists say now).
    finished_names = {c.name for c in done}
    placed = set()
    for axis in AXES:
        members = [c for c in done if on_axis(a, axis, c)]
        placed.update(c.name for c in members)
        if members:
            lines += _section(a, AXIS_TITLES[axis].format(N=a.num_discr_timesteps, w=a.w, budget=a.fixed_budget),
                              members, rel)
    others = [c for c in done if c.name not in placed]
    if others:
        lines += _section(a, "Other settings", others, rel)
    lines += check
    missing = [c.name for c in cells(a) if c.name not in finished_names]
    if missing:
        lines += ["## Not run yet", "", f"{_cells(len(missing))}: " + ", ".join(missing) + ".", ""]
    lines += ["Files: " + ", ".join(f"`{(rel / k).as_posix()}`" for k in ("sweep.csv", "sweep.json", "cells.csv")
                                     if k in files) + "; per setting `<setting>/table.md` and its plots.", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    print(f"wrote {doc}", flush=True)
    return doc


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.dry_run:
        dry_run(a)
    else:
        run(a)
        summarize(a)
    return 0


def report_main(argv=None) -> int:
    """The report, its settings defaulting to those of the sweep that wrote --results (sweep_config.json)."""
    p = parser("python -m cmdistill.toy report", report_only=True)
    config = Path(p.parse_known_args(argv)[0].results) / SWEEP_CONFIG_NAME
    if config.is_file():
        p.set_defaults(**{k: v for k, v in json.loads(config.read_text()).items() if k in CONFIG_FLAGS})
    report(p.parse_args(argv))
    return 0
