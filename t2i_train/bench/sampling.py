"""Sampling-overhead benchmark: a full CFG sampling run against the model forwards it cannot avoid.

    python -m t2i_train.bench.sampling [--preset pixeldit_mini_t2i] [--size 128] [--batch 1] [--steps 25]

Measured in the same process, alternating so that machine load affects both alike:
  run      = one complete `sample(...)` call (flow DPM-Solver++ 2M by default, CFG on every step, so every step
             is one batched cond+uncond forward of 2·batch images),
  baseline = one batched cond+uncond forward of the same model on the same inputs.
Prints ratio = median run / (steps × median baseline) — the sampler's own overhead is ratio − 1 (target < 5%) —
and the same with the best (minimum) times. On a shared CPU both are dominated by load noise, so the run also
times every model call made INSIDE the sampling run: in_run_overhead = (run − Σ model calls) / Σ model calls is
the sampler's own cost measured on the very same steps, immune to load drifting between the two measurements,
and the sampler driving a free model (one returning a cached output of the right shape): its time over
steps × baseline is the overhead with the model's cost taken out altogether.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from ..diffusion.samplers import SAMPLERS, SamplerConfig, make_noise, sample
from ..models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(preset: str = "pixeldit_mini_t2i", size: int = 128, batch: int = 1, steps: int = 25,
        sampler: str = "dpm_solver_2m", repeats: int = 3, dtype: str = "float32", device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model(preset).to(dev).eval()
    c = model.config
    noise = make_noise(range(batch), (c["in_channels"], size, size), dev)
    if model.is_t2i:
        cond = torch.randn(batch, c["txt_len"], c["txt_dim"], device=dev)
        mask = torch.ones(batch, c["txt_len"], dtype=torch.long, device=dev)
        uncond, uncond_mask = torch.randn(batch, c["txt_len"], c["txt_dim"], device=dev), mask.clone()
        uncond_mask[:, 1:] = 0
        cond_in, mask_in = torch.cat([uncond, cond]), torch.cat([uncond_mask, mask])
    else:
        cond = torch.arange(batch, device=dev) % c["num_classes"]
        uncond, mask, uncond_mask = torch.full_like(cond, c["num_classes"]), None, None
        cond_in, mask_in = torch.cat([uncond, cond]), None
    cfg = SamplerConfig(name=sampler, steps=steps, shift=3.0, cfg_scale=4.5, cfg_interval=(0.0, 1.0), dtype=dtype)
    x_in = torch.cat([noise, noise])
    t_in = torch.full((2 * batch,), 0.5, device=dev)
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext

    def forward_once():
        with torch.no_grad(), ctx():
            model(x_in, t_in, cond_in, mask_in)

    inside: list[float] = []

    class Timed(torch.nn.Module):  # times each model call the sampler makes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            _sync(dev)
            t0 = time.perf_counter()
            out = self.inner(*args)
            _sync(dev)
            inside.append(time.perf_counter() - t0)
            return out

    timed = Timed(model)

    def sample_once():
        return sample(timed, noise, cond, mask, uncond, uncond_mask, cfg, return_calls=True)[1]

    forward_once()  # warm-up (allocator, kernels)
    _, calls = sample(model, noise, cond, mask, uncond, uncond_mask,
                      SamplerConfig(**{**cfg.to_dict(), "steps": 2}), return_calls=True)
    with torch.no_grad():
        cached = model(x_in, t_in, cond_in, mask_in)

    class Free(torch.nn.Module):  # costs nothing: isolates the sampler's own work
        def forward(self, x, t, c, m=None):
            return cached[: x.shape[0]]

    free_times = []
    for _ in range(3):
        _sync(dev)
        t0 = time.perf_counter()
        sample(Free(), noise, cond, mask, uncond, uncond_mask, cfg)
        _sync(dev)
        free_times.append(time.perf_counter() - t0)

    run_times, fwd_times, in_run = [], [], []
    for _ in range(repeats):
        inside.clear()
        _sync(dev)
        t0 = time.perf_counter()
        calls = sample_once()
        _sync(dev)
        run_times.append(time.perf_counter() - t0)
        in_run.append(run_times[-1] / sum(inside) - 1)
        per = []
        for _ in range(steps):  # the baseline: exactly as many batched forwards as the run makes
            _sync(dev)
            t0 = time.perf_counter()
            forward_once()
            _sync(dev)
            per.append(time.perf_counter() - t0)
        fwd_times.append(sum(per))
    t_run, t_fwd = statistics.median(run_times), statistics.median(fwd_times)
    return {"device": str(dev), "preset": preset, "size": size, "batch": batch, "steps": steps, "sampler": sampler,
            "dtype": dtype, "model_calls": calls, "run_s": round(t_run, 4),
            "forward_x_steps_s": round(t_fwd, 4), "forward_s": round(t_fwd / steps, 5),
            "ratio": round(t_run / t_fwd, 4), "overhead_pct": round(100 * (t_run / t_fwd - 1), 2),
            "ratio_best": round(min(run_times) / min(fwd_times), 4),
            "in_run_overhead_pct": round(100 * statistics.median(in_run), 3),
            "free_model_run_s": round(min(free_times), 5),
            "free_model_overhead_pct": round(100 * min(free_times) / t_fwd, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t2i_train.bench.sampling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="pixeldit_mini_t2i")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpm_solver_2m", choices=SAMPLERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    res = run(args.preset, args.size, args.batch, args.steps, args.sampler, args.repeats, args.dtype, args.device)
    print(json.dumps(res))
    print(f"sampling run {res['run_s']:.3f}s vs {res['steps']} x batched cond+uncond forward "
          f"{res['forward_x_steps_s']:.3f}s: ratio {res['ratio']:.4f} (sampler overhead {res['overhead_pct']:+.2f}%, "
          f"target < 5%); best-of-{args.repeats} ratio {res['ratio_best']:.4f}; in-run sampler overhead "
          f"{res['in_run_overhead_pct']:+.3f}% of the model time; sampler alone (free model) "
          f"{res['free_model_run_s'] * 1e3:.1f} ms = {res['free_model_overhead_pct']:.3f}% of {res['steps']} forwards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
