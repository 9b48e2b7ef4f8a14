"""What a set of evaluation results rows (``cmdistill.results.collect``) says, for the table and the plots: the
metrics present with their names and formats, the model of a row, and one entry per model and setting with the
mean ± standard deviation over the training seeds of its runs.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

METHOD_NAMES = {"teacher": "Teacher", "cm": "CM", "direct_cm": "Direct CM"}

# (key, header, format): known metrics in the table's order; any other numeric field of a row is a metric too.
KNOWN_METRICS = [("fid", "FID", "{:.2f}"), ("fd_dinov2", "FD-DINO", "{:.2f}"), ("fd_toy", "toy FD", "{:.4g}"),
                 ("clip_score", "CLIP", "{:.4f}"), ("aesthetic_score", "Aesthetic", "{:.3f}"),
                 ("toy_caption_acc", "caption acc.", "{:.3f}"), ("ode_error", "ODE error", "{:.4g}"),
                 ("pixel_mse", "pixel MSE", "{:.4g}"), ("psnr", "PSNR", "{:.2f}")]
# Numeric fields of a row that describe the setting, not a measurement.
SETTING_FIELDS = {"num_original_inference_steps", "guidance_scale", "num_inference_steps", "lora_scale", "num_images",
                  "timestep_scaling_factor", "resolution", "seed", "training_step", "train_seed"}


def finite_number(v) -> bool:
    """A number that can be a measurement: int or float (not bool), finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_keys(rows: Iterable[dict]) -> list[str]:
    """The metrics present in ``rows``: known ones in the table's order, then the others alphabetically."""
    present = {k for r in rows for k, v in r.items() if k not in SETTING_FIELDS and finite_number(v)}
    known = [k for k, _, _ in KNOWN_METRICS]
    return [k for k in known if k in present] + sorted(present - set(known))


def metric_header(key: str) -> str:
    """The table's and the plots' name of a metric."""
    return next((h for k, h, _ in KNOWN_METRICS if k == key), key)


def metric_format(key: str) -> str:
    """The format of a metric's value in the table."""
    return next((f for k, _, f in KNOWN_METRICS if k == key), "{:.4g}")


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def model_label(r: dict) -> str:
    """The model of a row, without its number of sampling steps: 'Teacher (DDIM, N=100, w=9.0)', 'CM',
    'Direct CM (checkpoint-500)', 'CM (LoRA x0.5)'."""
    if r.get("kind") == "teacher":
        return f"Teacher ({str(r.get('solver', '')).upper()}, N={r.get('num_original_inference_steps')}, " \
               f"w={r.get('guidance_scale')})"
    name = METHOD_NAMES.get(r.get("method"), r.get("method") or "student")
    extra = [r["weights"]] if r.get("weights") not in (None, "final") else []
    if r.get("lora_scale", 1.0) not in (None, 1, 1.0):
        extra.append(f"LoRA x{r['lora_scale']}")
    return name + (f" ({', '.join(extra)})" if extra else "")


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per group (same model and setting, runs differing only by the training seed), in the rows'
    order: ``model``, ``steps``, ``runs``, ``seeds`` (training seeds), ``n``, ``training_step``, ``rows``,
    ``metrics`` = {key: (mean, std, count)}. Models of different recipes whose labels collide get the recipe
    settings in which they differ added ('CM [max_train_steps=600, w=9.0]'), or their first run's name where a
    recipe is unknown."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    keys = metric_keys(rows)
    out = []
    for members in groups.values():
        r0 = members[0]
        metrics = {}
        for k in keys:
            vals = [m[k] for m in members if finite_number(m.get(k))]
            if vals:
                metrics[k] = (*mean_spread(vals), len(vals))
        model_key = r0["recipe"] + "|" + json.dumps({k: v for k, v in r0.items() if k in
                                                            ("kind", "method", "weights", "lora_scale", "solver")},
                                                           sort_keys=True, default=str)
        out.append({"model": model_label(r0), "model_key": model_key, "steps": r0.get("num_inference_steps"),
                    "kind": r0.get("kind"), "weights": r0.get("weights"), "training_step": r0.get("training_step"),
                    "runs": [m["run"] for m in members], "run_dirs": sorted({m["run_dir"] for m in members}),
                    "seeds": [m["train_seed"] for m in members if m.get("train_seed") is not None],
                    "n": len(members), "rows": members, "metrics": metrics})
    labels: dict[str, set] = {}
    for e in out:
        labels.setdefault(e["model"], set()).add(e["rows"][0]["recipe"])
    for e in out:
        recipes = labels[e["model"]]
        if len(recipes) > 1:
            e["model"] += f" [{_differing(e['rows'][0]['recipe'], recipes) or e['runs'][0]}]"
    return out

def _recipe_dict(recipe: str) -> dict | None:
    try:
        d = json.loads(recipe)
    except ValueError:  # 'folder:...': a run without its training configuration
        return None
    return d if isinstance(d, dict) else None


def _differing(recipe: str, recipes: set) -> str:
    """'key=value, ...' of the settings of ``recipe`` that differ among ``recipes``; '' where one is unknown."""
    dicts = [_recipe_dict(r) for r in recipes]
    mine = _recipe_dict(recipe)
    if mine is None or any(d is None for d in dicts):
        return ""
    keys = sorted({k for d in dicts for k in d if len({json.dumps(x.get(k), default=str) for x in dicts}) > 1})
    return ", ".join(f"{k}={mine.get(k)}" for k in keys)


def compare(rows: list[dict], key: str, lower_is_better: bool = True, a: str = "direct_cm",
            b: str = "cm") -> list[dict]:
    """Method ``a`` against method ``b`` on metric ``key`` (rows of ``results.collect``; final weights at LoRA scale
    1), per setting (the training recipe less its objective) and number of sampling steps: ``a`` and ``b``
    (means over the training seeds both have), ``better`` and ``worse`` (in how many of those seeds ``a`` is
    strictly better, strictly worse; paired by seed), ``n``, ``seeds``, ``setting`` (the recipe, a dict) and
    ``steps``."""
    by: dict[tuple, dict] = {}
    for r in rows:
        if (r.get("kind") == "teacher" or r.get("method") not in (a, b) or r.get("weights", "final") != "final"
                or r.get("lora_scale", 1.0) not in (None, 1, 1.0) or not finite_number(r.get(key))):
            continue
        setting = _recipe_dict(r["recipe"])
        if setting is None:
            continue
        setting.pop("objective", None)
        ident = (json.dumps(setting, sort_keys=True, default=str), r.get("num_inference_steps"))
        by.setdefault(ident, {}).setdefault(r["method"], {})[r.get("train_seed")] = r[key]
    out = []
    for (setting, steps), m in by.items():
        seeds = sorted(set(m.get(a, {})) & set(m.get(b, {})), key=str)
        if not seeds:
            continue
        va, vb = [m[a][s] for s in seeds], [m[b][s] for s in seeds]
        sign = 1 if lower_is_better else -1
        out.append({"setting": json.loads(setting), "steps": steps, "a": mean_spread(va)[0], "b": mean_spread(vb)[0],
                    "better": sum(sign * (x - y) < 0 for x, y in zip(va, vb)),
                    "worse": sum(sign * (x - y) > 0 for x, y in zip(va, vb)), "n": len(seeds), "seeds": seeds})
    return sorted(out, key=lambda c: (json.dumps(c["setting"], sort_keys=True, default=str), c["steps"] or 0))

