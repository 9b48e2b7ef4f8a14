"""``python -m cmdistill.toy build --out toy/world --seed 0``: build the toy world (data, toy metric
encoder, VAE, teacher, evidence), printing the time of each stage; stages already built are skipped.

``python -m cmdistill.toy eval --world toy/world --ws 1 3 5``: rerun the evidence at other settings.

``python -m cmdistill.toy sweep [--dry_run] [--only budget|grid|guidance] [--time_limit_s S]``: the toy study
over training budget, teacher grid and guidance (``cmdistill.toy.sweep``); ``python -m cmdistill.toy report``:
docs/toy_study.md from its finished cells. ``python -m cmdistill.toy sweep -h`` lists their flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ..errors import exit_on_user_error
from .build import BuildConfig, build, world_paths

# The reduced world of the tests and CI: every stage runs, in about a minute or two on 2 cores.
REDUCED = dict(num_images=600, num_holdout=200, vae_steps=250, vae_batch_size=8, encoder_steps=300,
               encoder_batch_size=64, teacher_steps=400, batch_size=32, eval_num=128, eval_steps=20)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmdistill.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or complete) a toy world")
    b.add_argument("--out", default="toy/world", help="world folder (default: toy/world)")
    b.add_argument("--reduced", action="store_true", help="the small CI/test world (explicit flags still win): "
                   + ", ".join(f"{k}={v}" for k, v in REDUCED.items()))
    for f in fields(BuildConfig):
        if f.name == "eval_ws":
            b.add_argument("--eval_ws", type=float, nargs="+", default=None, help="guidance scales of the evidence "
                           f"(default: {' '.join(map(str, f.default))})")
        else:
            b.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"default: {f.default}")
    e = sub.add_parser("eval", help="toy metrics of a built world's teacher (trained vs untrained)")
    e.add_argument("--world", default="toy/world")
    e.add_argument("--ws", type=float, nargs="+", default=[1.0, 3.0, 9.0])
    e.add_argument("--num", type=int, default=500, help="captions to sample (the first of the training set)")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps (N of the grid)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", default=None, help="also write the result here")
    sub.add_parser("sweep", add_help=False, help="the toy study over budget, grid and guidance (see sweep -h)")
    sub.add_parser("report", add_help=False, help="docs/toy_study.md from the sweep's finished cells (see report -h)")
    return p


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["sweep"], ["report"]):
        from . import study

        return (study.main if argv[0] == "sweep" else study.report_main)(argv[1:])
    args = _parser().parse_args(argv)
    if args.cmd == "build":
        kw = dict(REDUCED) if args.reduced else {}
        kw.update({f.name: getattr(args, f.name) for f in fields(BuildConfig) if getattr(args, f.name) is not None})
        if "eval_ws" in kw:
            kw["eval_ws"] = tuple(kw["eval_ws"])
        rec = build(args.out, BuildConfig(**kw))
        print("stage times (s):", json.dumps(rec["stage_seconds"]))
        return 0
    import torch

    from . import data as D
    from . import teacher as T
    from ..models import load_teacher
    from .encoders import load_encoder
    from .evaluate import evaluate_teacher

    torch.set_num_threads(args.threads)
    P = world_paths(args.world)
    cfg = json.loads(P["build"].read_text())["config"] if P["build"].is_file() else {}
    paths, caps, _ = D.read_dataset(P["data"])
    hp, hc, _ = D.read_dataset(P["holdout"])
    n = min(args.num, len(caps))
    res = evaluate_teacher(load_teacher(str(P["teacher"])), load_encoder(P["encoder"]), D.load_images(paths[:n]),
                           caps[:n], holdout=(D.load_images(hp[:n]), hc[:n]), ws=tuple(args.ws),
                           N=args.steps, seed=args.seed, resolution=cfg.get("resolution", 64),
                           untrained_unet=T.teacher_components(cfg.get("seed", 0), cfg.get("resolution", 64))["unet"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
