"""Training-step benchmark of a mini text-to-image PixelDiT on CPU.

    python -m t2i_train.bench.step [--steps 8] [--reference /path/to/reference-checkout]

Config (issue spec): hidden 384, 6 heads, N=4, M=2, pixel attention 384 / 6 heads, D_pix 16, patch 16,
text 256-d × 64 tokens, 256² images, batch 4; one step = forward + MSE-on-v backward.
Prints the median step time, the train-step FLOPs (FlopCounterMode, forward+backward), the achieved GFLOP/s,
MFU against an fp32 matmul peak measured in the same run, and the peak RSS. Each implementation runs in its
own subprocess so that peak memory is its own; step times are taken in one process, alternating steps
between implementations so that load on the machine affects them alike. With `--reference`, the official
implementation (same architecture and sizes) is measured in the same run and ratios are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

BATCH, SIZE, TXT_LEN, TXT_DIM = 4, 256, 64, 256


def matmul_peak_gflops(n: int = 2048, repeats: int = 6) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _ours():
    from t2i_train.models import build_model

    model = build_model("pixeldit_mini_t2i")
    return model, lambda x, t, y: model(x, t, y)


def _reference(path: str):
    sys.path.insert(0, path)
    from importlib import import_module

    cls = getattr(import_module("pixdit_core.pixeldit_t2i"), "PixDiT_T2I")
    model = cls(in_channels=3, num_groups=6, hidden_size=384, pixel_hidden_size=16, pixel_attn_hidden_size=384,
                pixel_num_groups=6, patch_depth=4, pixel_depth=2, patch_size=16, txt_embed_dim=TXT_DIM,
                txt_max_length=TXT_LEN)
    return model, lambda x, t, y: model(x, t, y)


def _setup(impl: str, reference: str | None):
    torch.manual_seed(0)
    model, fwd = _ours() if impl == "ours" else _reference(reference)
    model.train()
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randn(BATCH, TXT_LEN, TXT_DIM)
    t = torch.rand(BATCH)
    target = torch.randn_like(x)

    def step():
        out = fwd(x, t, y)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def run_child(impls: list[str], steps: int, warmup: int, reference: str | None) -> dict:
    """Time the implementations in one process, alternating steps, so that load on the machine hits all of
    them alike; FLOPs come from FlopCounterMode; peak RSS is this process's (meaningful with one impl)."""
    from torch.utils.flop_counter import FlopCounterMode

    setups = {impl: _setup(impl, reference) for impl in impls}
    results = {}
    for impl, (model, step) in setups.items():
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        results[impl] = {"impl": impl, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                         "train_step_gflops": counter.get_total_flops() / 1e9, "times": []}
    for _ in range(warmup):
        for _, step in setups.values():
            step()
    for _ in range(steps):
        for impl, (_, step) in setups.items():
            t0 = time.perf_counter()
            step()
            results[impl]["times"].append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for r in results.values():
        med = statistics.median(r["times"])
        r.update(step_s=med, step_min_s=min(r["times"]), achieved_gflops_s=r["train_step_gflops"] / med,
                 peak_rss_gb=peak_rss / 1e9, threads=torch.get_num_threads())
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m t2i_train.bench.step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reference", default=None,
                    help="checkout of the official implementation to measure side by side (optional)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child.split(","), args.steps, args.warmup, args.reference)))
        return 0

    impls = ["ours"] + (["reference"] if args.reference else [])

    def child(names, steps, warmup):
        cmd = [sys.executable, "-m", "t2i_train.bench.step", "--child", ",".join(names), "--steps", str(steps),
               "--warmup", str(warmup)] + (["--reference", args.reference] if args.reference else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
        return json.loads(out.stdout.strip().splitlines()[-1])

    peak = matmul_peak_gflops()
    results = child(impls, args.steps, args.warmup)      # interleaved timing
    for impl in impls:                                    # peak memory, one implementation per process
        results[impl]["peak_rss_gb"] = child([impl], 2, 0)[impl]["peak_rss_gb"]
        results[impl]["mfu"] = results[impl]["achieved_gflops_s"] / peak
    print(f"fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    for impl, r in results.items():
        print(f"{impl:>9}: step {r['step_s']:.3f} s (median of {args.steps}), train-step {r['train_step_gflops']:.1f} "
              f"GFLOP, {r['achieved_gflops_s']:.1f} GFLOP/s, MFU {r['mfu']:.3f}, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"{r['params_M']:.2f}M params")
    if "reference" in results:
        o, ref = results["ours"], results["reference"]
        print(f"ratios ours/reference: step time {o['step_s'] / ref['step_s']:.3f}, "
              f"peak RSS {o['peak_rss_gb'] / ref['peak_rss_gb']:.3f}, MFU {o['mfu'] / ref['mfu']:.3f}")
    if args.json:
        print(json.dumps({"matmul_peak_gflops": peak, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
