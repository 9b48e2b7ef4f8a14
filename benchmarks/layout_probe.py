#!/usr/bin/env python
"""Inductor settings for the teacher's forward, compared block by block instead of on the whole UNet.

A whole-UNet compile takes 3-4 min on an H100, so a setting costs a GPU call to compare there. This script runs one
eager teacher forward of the full-size SDXL-architecture UNet (random weights, batch 16, 1024 px, bf16 weights
under bf16 autocast, as the teacher runs), keeps the inputs of the chosen blocks, then compiles each block with
each setting (batch dimension dynamic, as ``UNetEps(dynamic_batch=True)``), checks its output against the eager
block and times it (back to back, CUDA events), with one profiled call per block and setting: kernel time by kind
(cuDNN's NCHW <-> NHWC conversions separately).

    python benchmarks/layout_probe.py --json probe.json
    python benchmarks/layout_probe.py --tiny --device cpu --variants eager,default,nhwc   # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the checkout on sys.path)
import torch  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from cmdistill import models  # noqa: E402

TILED = {"triton.tile_reductions": True, "triton.prefer_nd_tiling": True}
NHWC = {"force_layout_optimization": True}  # inductor's layout pass even with a symbolic batch
VARIANTS = {  # name -> torch.compile options (None: eager)
    "eager": None,
    "default": {},
    "tiled": TILED,
    "nhwc": NHWC,
    "nhwc_tiled": {**NHWC, **TILED},
    "freezing": {"freezing": True},
    "nhwc_freezing": {**NHWC, "freezing": True},
    "nhwc_tiled_freezing": {**NHWC, **TILED, "freezing": True},
    # + group norms with per-channel statistics (cmdistill.models.ChannelwiseGroupNorm)
    "gn": {},
    "nhwc_gn": NHWC,
    "nhwc_gn_freezing": {**NHWC, "freezing": True},
    "freezing_gn": {"freezing": True},
}
CHANNELWISE = {"gn", "nhwc_gn", "nhwc_gn_freezing", "freezing_gn"}
BLOCKS = ("down0", "down1", "down2", "mid", "up0", "up1", "up2")


def block(unet, name: str):
    kind, i = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
    return unet.mid_block if kind == "mid" else getattr(unet, f"{kind}_blocks")[int(i)]


def capture(unet, names, fwd) -> dict:
    """The (args, kwargs) each named block receives during ``fwd()``."""
    seen, hooks = {}, []
    for n in names:
        hooks.append(block(unet, n).register_forward_pre_hook(
            lambda m, a, k, n=n: seen.setdefault(n, (a, dict(k))), with_kwargs=True))
    try:
        fwd()
    finally:
        for h in hooks:
            h.remove()
    return seen


def tensors(x) -> list:
    """The tensors in a nest of tuples, lists and dicts."""
    return [v for v in tree_leaves(x) if isinstance(v, torch.Tensor)]


def first_tensor(out):
    return tensors(out)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny random SDXL (cmdistill.tiny), e.g. on a CPU")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--blocks", default="down0,down1,up1,up2", help=f"comma-separated, of {','.join(BLOCKS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time_limit_s", type=float, default=float("inf"),
                   help="start no new setting after this many seconds (the JSON so far is kept)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    names = args.blocks.split(",")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown '{v}' (known: {', '.join(VARIANTS)})")
    for n in names:
        if n not in BLOCKS:
            p.error(f"--blocks: unknown '{n}' (known: {', '.join(BLOCKS)})")
    t_start = time.perf_counter()

    if args.tiny:
        from cmdistill.tiny import tiny_sdxl_components

        unet = tiny_sdxl_components(seed=0, sample_size=args.resolution // 8)["unet"].to(dev)
    else:
        unet = bench.build_sdxl_modules(dev)[0]
    dtype = torch.bfloat16
    unet.to(dtype).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    B, h = args.batch_size, args.resolution // 8
    x = torch.randn(B, 4, h, h, generator=g).to(dev, dtype)
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    cond = dict(encoder_hidden_states=torch.randn(B, 77, unet.config.cross_attention_dim, generator=g).to(dev, dtype),
                added_cond_kwargs={"text_embeds": torch.randn(B, text_dim, generator=g).to(dev, dtype),
                                   "time_ids": torch.tensor([[h * 8, h * 8, 0, 0, h * 8, h * 8]] * B).to(dev, dtype)})
    t = torch.full((B,), 500, device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=dtype)

    with torch.no_grad(), autocast():
        inputs = capture(unet, names, lambda: unet(x, t, **cond))
    for a, k in inputs.values():
        for v in tensors((a, k)):
            torch._dynamo.maybe_mark_dynamic(v, 0)
    bench.log(f"captured the inputs of {', '.join(names)} (batch {B}, {args.resolution} px)")

    eager_out = {n: first_tensor(run_block(block(unet, n), *inputs[n], autocast)).clone() for n in names}
    env = bench.environment(dev)
    results = {"env": env, "settings": vars(args), "variants": {v: VARIANTS[v] for v in variants}, "rows": {}}
    for v in variants:
        if time.perf_counter() - t_start > args.time_limit_s:
            bench.log(f"time limit: {v} and later settings skipped")
            break
        opts = VARIANTS[v]
        torch._dynamo.reset()
        row = results["rows"].setdefault(v, {})
        for n in names:
            mod = block(unet, n)
            if v in CHANNELWISE:  # a copy of the block with its own module lists (the weights shared)
                mod = models.channelwise_norms(mod)
            fn = mod if opts is None else torch.compile(mod, **({"options": opts} if opts else {}))
            call = functools.partial(run_block, fn, *inputs[n], autocast)
            try:
                with bench.Timer(dev) as tm:
                    out = first_tensor(call())
                ref = eager_out[n]
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                call()
                with bench.Timer(dev) as tb:
                    for _ in range(args.repeats):
                        call()
                prof = bench.profile_once(dev, call) if dev.type == "cuda" else None
                r = {"ms": 1000 * tb.seconds / args.repeats, "first_call_s": tm.seconds, "rel_err_vs_eager": err}
                if prof:
                    r["kernel_ms_by_kind"] = {kk: 1000 * s for kk, s in prof["by_kind_s"].items()}
                    r["kernel_ms"] = 1000 * prof["busy_s"]
                row[n] = r
                bench.log(f"[{v}] {n}: {r['ms']:.2f} ms (first call {tm.seconds:.1f} s, rel. err {err:.1e})"
                          + (f"; kernels {r['kernel_ms']:.2f} ms: " + ", ".join(
                              f"{kk} {ms:.2f}" for kk, ms in r["kernel_ms_by_kind"].items()) if prof else ""))
            except Exception as e:  # noqa: BLE001 - a failing setting is recorded; the others still run
                row[n] = {"error": bench.error_line(e)}
                bench.log(f"[{v}] {n}: FAILED {row[n]['error']}")
        ok = [r["ms"] for r in row.values() if "ms" in r]
        if len(ok) == len(names):
            row["total_ms"] = sum(ok)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print("\nms per call, back to back (blocks: " + ", ".join(names) + ")")
    print(f"{'setting':<22}" + "".join(f"{n:>10}" for n in names) + f"{'total':>10}")
    for v, row in results["rows"].items():
        print(f"{v:<22}" + "".join(f"{row[n]['ms']:>10.2f}" if "ms" in row.get(n, {}) else f"{'-':>10}" for n in names)
              + (f"{row['total_ms']:>10.2f}" if "total_ms" in row else f"{'-':>10}"))
    if args.json:  # (also written after every setting: a run cut short keeps what it measured)
        Path(args.json).write_text(json.dumps(results, indent=1))
        bench.log(f"wrote {args.json}")


def run_block(mod, a, k, autocast):
    """One no-grad call of a block with its captured (args, kwargs), under the teacher's autocast."""
    with torch.no_grad(), autocast():
        return mod(*a, **k)


if __name__ == "__main__":
    main()
