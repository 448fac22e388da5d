"""Training-step benchmark of a mini text-to-image PixelDiT, ours beside the official implementation.

    python -m t2i_train.bench.step --reference /tmp/ref [--precision fp32|bf16] [--compile] [--ac none,selective]

Config (issue spec): hidden 384, 6 heads, N=4, M=2, pixel attention 384 / 6 heads, D_pix 16, patch 16,
text 256-d × 64 tokens, 256² images, batch 4; one step = forward + MSE-on-v backward, under bf16 autocast
with `--precision bf16`. With `--compile` our blocks are compiled one by one (model.compile_blocks) and the
reference model is compiled whole. `--ac` lists our activation-checkpointing policies to measure.

Timing: every implementation lives in one process and they take turns step by step, so load on the machine
hits them alike; the printed ratios are medians of the per-round ratios (paired repeats).
Memory: each implementation runs alone in its own process; "step peak" is the peak of live heap bytes above
the start of one step (glibc mallinfo2 polled every millisecond on CPU, torch.cuda.max_memory_allocated on
CUDA): activations, gradients and temporaries, not the parameters, which are the same for both.
FLOPs are model FLOPs, 3 × the forward pass (patch + pixel pathways, FlopCounterMode), whatever
recomputation checkpointing adds, counted on the nominal architecture (our PiT shift fold switched off, so
both implementations are credited the same FLOPs; what ours executes is printed beside it); MFU is against
an fp32 matmul peak measured in the same run on CPU and
against the device's dense bf16 peak on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
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


class HeapPeak:
    """Peak of glibc's live heap bytes (mallinfo2: in-use arena + mmapped chunks) above its value at entry,
    polled from a thread while the body runs (torch kernels release the GIL)."""

    def __init__(self, interval_s: float = 0.001):
        libc = ctypes.CDLL("libc.so.6")

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        libc.mallinfo2.restype = MallInfo2
        self._info, self.interval_s, self.peak = libc.mallinfo2, interval_s, 0

    def live(self) -> int:
        info = self._info()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        self._start, self.peak, self._stop = self.live(), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.live() - self._start)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.live() - self._start)


def _ours(policy: str):
    from t2i_train.models import build_model

    model = build_model("pixeldit_mini_t2i")
    model.set_activation_checkpointing(policy)
    return model


def _reference(path: str):
    sys.path.insert(0, path)
    from importlib import import_module

    cls = getattr(import_module("pixdit_core.pixeldit_t2i"), "PixDiT_T2I")
    model = cls(in_channels=3, num_groups=6, hidden_size=384, pixel_hidden_size=16, pixel_attn_hidden_size=384,
                pixel_num_groups=6, patch_depth=4, pixel_depth=2, patch_size=16, txt_embed_dim=TXT_DIM,
                txt_max_length=TXT_LEN)
    return model


def _setup(impl: str, args, device):
    torch.manual_seed(0)
    model = _reference(args.reference) if impl == "reference" else _ours(impl.split(":", 1)[1])
    model.to(device).train()
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=device)
    y = torch.randn(BATCH, TXT_LEN, TXT_DIM, device=device)
    t = torch.rand(BATCH, device=device)
    target = torch.randn_like(x)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    # before compiling: FLOPs of the eager model, nominal architecture (MFU) and, for ours, as executed
    nominal = model.nominal_flops() if hasattr(model, "nominal_flops") else contextlib.nullcontext()
    with nominal:
        flops = _forward_flops(model, autocast, x, t, y)
    executed = _forward_flops(model, autocast, x, t, y)
    fwd = model
    if args.compile:
        if impl == "reference":
            fwd = torch.compile(model)
        else:
            model.compile_blocks()

    def step():
        with autocast():
            out = fwd(x, t, y)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step, (flops, executed)


def _forward_flops(model, autocast, *inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), autocast():
        model(*inputs)
    return counter.get_total_flops()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timing(impls: list[str], args, device) -> dict:
    setups = {impl: _setup(impl, args, device) for impl in impls}
    results = {impl: {"params_M": sum(p.numel() for p in m.parameters()) / 1e6,
                      "train_step_gflops": 3 * flops / 1e9, "executed_gflops": 3 * executed / 1e9, "times": []}
               for impl, (m, _, (flops, executed)) in setups.items()}
    for _ in range(args.warmup):
        for _, step, _ in setups.values():
            step()
    for _ in range(args.steps):
        for impl, (_, step, _) in setups.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            results[impl]["times"].append(time.perf_counter() - t0)
    return results


def run_memory(impl: str, args, device) -> dict:
    _, step, _ = _setup(impl, args, device)
    for _ in range(max(args.warmup, 1)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"step_peak_gb": (torch.cuda.max_memory_allocated(device) - start) / 1e9}
    with HeapPeak() as heap:
        step()
    return {"step_peak_gb": heap.peak / 1e9}


def _paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _peak_gflops(device) -> tuple[float, str]:
    if device.type == "cuda":
        from t2i_train.engine.monitor import peak_flops

        peak = peak_flops(device)
        return (peak / 1e9 if peak else float("nan")), f"dense bf16 peak of {torch.cuda.get_device_name(device)}"
    return matmul_peak_gflops(), f"fp32 matmul peak measured in this run ({torch.get_num_threads()} threads)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m t2i_train.bench.step", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (each implementation once per round)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation happens here)")
    ap.add_argument("--reference", default=None, help="checkout of the official implementation (optional)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, both models")
    ap.add_argument("--compile", action="store_true", help="torch.compile ours per block, the reference whole")
    ap.add_argument("--ac", default="none,selective", help="our activation-checkpointing policies to measure")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory runs")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)

    if args.child:
        impls = args.child.split(",")
        out = run_memory(impls[0], args, device) if args.memory else run_timing(impls, args, device)
        print(json.dumps(out))
        return 0

    from t2i_train.models.wrapping import normalize_ac_policy

    policies = [normalize_ac_policy(p.strip()) for p in args.ac.split(",") if p.strip()]
    impls = [f"ours:{p}" for p in policies] + (["reference"] if args.reference else [])

    def child(names, memory=False):
        cmd = [sys.executable, "-m", "t2i_train.bench.step", "--child", ",".join(names), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--precision", args.precision, "--device", args.device]
        cmd += (["--reference", args.reference] if args.reference else []) + (["--compile"] if args.compile else [])
        cmd += ["--memory"] if memory else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            raise SystemExit(f"benchmark child {names} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    peak, peak_what = _peak_gflops(device)
    results = child(impls)
    for impl in impls:
        results[impl].update({"step_peak_gb": float("nan")} if args.no_memory else child([impl], memory=True))
        r = results[impl]
        r["step_s"] = statistics.median(r["times"])
        r["achieved_gflops_s"] = r["train_step_gflops"] / r["step_s"]
        r["mfu"] = r["achieved_gflops_s"] / peak

    print(f"{args.device}, {args.precision}{', compiled' if args.compile else ''}, batch {BATCH} at {SIZE}²; "
          f"MFU against the {peak_what}: {peak:.1f} GFLOP/s")
    for impl, r in results.items():
        executed = "" if abs(r["executed_gflops"] - r["train_step_gflops"]) < 0.05 \
            else f", {r['executed_gflops']:.1f} executed"
        print(f"{impl:>15}: step {r['step_s']:.3f} s (median of {args.steps}), {r['train_step_gflops']:.1f} GFLOP "
              f"(3× forward{executed}), {r['achieved_gflops_s']:.1f} GFLOP/s, MFU {r['mfu']:.3f}, "
              f"step peak {r['step_peak_gb']:.3f} GB, {r['params_M']:.2f}M params")
    base = results.get("ours:none")
    for impl, r in results.items():
        if impl == "reference":
            continue
        if "reference" in results:
            ref = results["reference"]
            print(f"ratios {impl}/reference: step time {_paired_median(r['times'], ref['times']):.3f} "
                  f"(median of paired rounds), step peak memory {r['step_peak_gb'] / ref['step_peak_gb']:.3f}")
        if base is not None and r is not base:
            print(f"ratios {impl}/ours:none: step time {_paired_median(r['times'], base['times']):.3f}, "
                  f"step peak memory {r['step_peak_gb'] / base['step_peak_gb']:.3f}")
    if args.json:
        print(json.dumps({"peak_gflops": peak, "precision": args.precision, "compile": args.compile, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
