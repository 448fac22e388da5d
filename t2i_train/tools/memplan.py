"""`t2i-memplan`: per-GPU memory of a training run at full scale, without a GPU and without real memory.

    t2i-memplan --config configs/t2i_1024.yaml --gpus 64 --gpu-mem-gb 80

Model states are counted from the parameter shapes (built on the `meta` device), per backend:

  backend   weights (bf16 run)        gradients        fp32 master + optimizer + EMA
  ZeRO-1    2·P                       2·P              (4 + opt + 4)·P / N
  ZeRO-2    2·P                       2·P / N          (4 + opt + 4)·P / N
  ZeRO-3    2·P / N + gathered units  2·P / N          (4 + opt + 4)·P / N
  FSDP2     4·P / N + gathered units  4·P / N          (opt + 4)·P / N    (fp32 sharded weights are the master)

with opt = AdamW's two fp32 moments (8 bytes/param), or CAME's: one fp32 moment plus factored row/column
statistics for 2-D weights. Under ZeRO the optimizer sees flat 1-D partitions, so CAME is unfactored there
(two full moments); FSDP2 with CAME is refused by the trainer. "gathered units" are the bf16 full weights of
the two largest blocks (the one computing and the one prefetched). Frozen encoders the trainer keeps on the
GPU (Gemma text encoder unless cached features are used, the REPA encoder) are added in bf16.

Activations of one micro-batch are measured, not modelled: the model is built under
`FakeTensorMode` and one forward + backward runs at the config's resolution, dtype and checkpointing policy
under torch's `MemTracker`; the peak of activations + temporaries is taken, at the configured micro-batch and
at twice that, whose difference gives the per-sample slope from which the largest micro-batch that fits
follows.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import torch

from ..models import build_model, model_config

GB = 1e9
BACKENDS = ("zero1", "zero2", "zero3", "fsdp")
# parameter counts of frozen encoders the trainer may hold on every GPU (bf16), by hub id
FROZEN_PARAMS = {"google/gemma-2-2b-it": 2_614_341_888, "google/gemma-2-2b": 2_614_341_888}


# ------------------------------------------------------------------------------------------------ activations

def _inputs(model, batch: int, height: int, width: int, dtype, text_tokens: int | None):
    x = torch.randn(batch, model.in_channels, height, width, dtype=dtype)
    t = torch.rand(batch)
    if model.is_t2i:
        n = text_tokens or model.config["txt_len"]
        cond = torch.randn(batch, n, model.config["txt_dim"], dtype=dtype)
        mask = torch.ones(batch, n, dtype=torch.bool) if model.config["use_text_mask"] else None
    else:
        cond, mask = torch.zeros(batch, dtype=torch.long), None
    return x, t, cond, mask


def train_step(model, inputs) -> None:
    """The step whose memory is measured: forward, a loss on the output, backward."""
    x, t, cond, mask = inputs
    out = model(x, t, cond, mask)
    (out.float() - x.float()).pow(2).mean().backward()


def peak_step_bytes(model, inputs, with_grads: bool = False) -> int:
    """Peak bytes of activations and temporaries (and, `with_grads`, the gradients live at that moment; not
    the parameters) of `train_step`, tracked by torch's MemTracker; real tensors and FakeTensorMode alike."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        train_step(model, inputs)
    peak = 0
    for dev, snap in tracker.get_tracker_snapshot("peak").items():
        grads = snap[_MemRefType.GRAD] if with_grads else 0
        peak = max(peak, snap[_MemRefType.ACT] + snap[_MemRefType.TEMP] + grads)
    return peak


def activation_bytes(spec: dict, height: int, width: int, batch: int, dtype=torch.bfloat16,
                     policy: str = "none", text_tokens: int | None = None, with_grads: bool = False) -> int:
    """Peak activation bytes of one micro-batch, measured under FakeTensorMode (no real memory used)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    default = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):  # cached RoPE / sin-cos tables are real constants
        try:
            torch.set_default_dtype(dtype)  # parameters are born in the run's dtype (fake ones cannot be cast)
            model = build_model(spec)
        finally:
            torch.set_default_dtype(default)
        model.set_activation_checkpointing(policy)
        inputs = _inputs(model, batch, height, width, dtype, text_tokens)
        return peak_step_bytes(model, inputs, with_grads)


# ------------------------------------------------------------------------------------------------ model states

def optimizer_bytes(params: list[torch.Tensor], name: str, flat: bool) -> int:
    """fp32 optimizer-state bytes for `params` (AdamW: two moments; CAME: factored unless `flat`)."""
    total = 0
    for p in params:
        n = p.numel()
        if name == "came" and not flat and p.dim() >= 2:
            rows, cols = p.shape[0], n // p.shape[0]
            total += 4 * (n + 2 * (rows + cols))  # exp_avg + row/col of exp_avg_sq and exp_avg_res
        else:
            total += 4 * 2 * n
    return total


@dataclass
class StateBytes:
    weights: float
    gradients: float
    master: float
    optimizer: float
    ema: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master + self.optimizer + self.ema


def state_bytes(model, backend: str, gpus: int, optimizer: str, bf16: bool = True) -> StateBytes | None:
    """Per-GPU bytes of weights, gradients, master copy, optimizer states and EMA; None if unsupported."""
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    half = 2 if bf16 else 4
    units = sorted((sum(p.numel() for p in u.parameters()) for u in model.shard_units()), reverse=True)
    gathered = half * sum(units[:2])
    if backend == "fsdp":
        if optimizer == "came":
            return None
        return StateBytes(weights=4 * P / gpus + gathered, gradients=4 * P / gpus, master=0.0,
                          optimizer=optimizer_bytes(params, optimizer, flat=False) / gpus, ema=4 * P / gpus)
    stage = int(backend[-1])
    return StateBytes(weights=half * P / (gpus if stage == 3 else 1) + (gathered if stage == 3 else 0),
                      gradients=half * P / (gpus if stage >= 2 else 1),
                      master=(4 * P / gpus) if bf16 else 0.0,
                      optimizer=optimizer_bytes(params, optimizer, flat=True) / gpus, ema=4 * P / gpus)


def frozen_bytes(cfg) -> float:
    """bf16 bytes of frozen encoders kept on each GPU: the text encoder (unless cached features are read) and
    the REPA encoder."""
    total = 0.0
    if cfg.run.task == "t2i" and cfg.text.encoder and not cfg.data.loader.get("use_text_emb", False):
        total += 2 * FROZEN_PARAMS.get(cfg.text.encoder, 0)
    if cfg.objective.repa_weight > 0 and cfg.objective.repa_encoder:
        try:
            import timm

            with torch.device("meta"):
                enc = timm.create_model(cfg.objective.repa_encoder.removeprefix("timm/"), pretrained=False)
            total += 2 * sum(p.numel() for p in enc.parameters())
        except Exception:  # an unknown encoder name: leave it out, the printout says what was counted
            pass
    return total


# ------------------------------------------------------------------------------------------------ the plan

def resolution_of(cfg) -> tuple[int, int]:
    """The largest image (by area) the config's loader yields: its resolution, or the largest bucket."""
    loader = cfg.data.loader
    res = int(loader.get("resolution", cfg.data.fixed_image_size))
    if loader.get("bucket_mode", "fixed") == "fixed":
        return res, res
    from data_pipeline.buckets import get_table

    height, width = max(get_table(res).values(), key=lambda hw: hw[0] * hw[1])
    return int(height), int(width)


def plan(config_path: str, gpus: int, gpu_mem_gb: float, reserve_gb: float = 4.0,
         overrides: tuple[str, ...] = ()) -> dict:
    from ..config import load_config

    cfg = load_config(config_path, list(overrides))
    spec = model_config(cfg.model.spec, **dict(cfg.model.overrides))
    policy = _policy(cfg.model.activation_checkpointing)
    bf16 = cfg.backend.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    height, width = resolution_of(cfg)
    text_tokens = cfg.text.max_length if spec.get("arch") == "t2i" else None
    with torch.device("meta"):
        meta_model = build_model(spec)
    micro = cfg.backend.micro_batch
    activations = activation_bytes(spec, height, width, micro, dtype, policy, text_tokens)
    doubled = activation_bytes(spec, height, width, 2 * micro, dtype, policy, text_tokens)
    per_sample = (doubled - activations) / micro
    fixed = activations - per_sample * micro
    frozen = frozen_bytes(cfg)
    budget = (gpu_mem_gb - reserve_gb) * GB
    configured = {"deepspeed": f"zero{cfg.backend.zero_stage}", "fsdp": "fsdp"}.get(cfg.backend.name)
    rows = {}
    for backend in BACKENDS:
        states = state_bytes(meta_model, backend, gpus, cfg.optim.name, bf16)
        if states is None:
            rows[backend] = None
            continue
        total = states.total + frozen + activations
        room = budget - states.total - frozen - fixed
        rows[backend] = {**{k: v / GB for k, v in vars(states).items()}, "frozen": frozen / GB,
                         "activations": activations / GB, "total": total / GB, "fits": total <= budget,
                         "max_micro_batch": max(0, math.floor(room / per_sample)) if per_sample > 0 else None}
    return {"config": config_path, "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "reserve_gb": reserve_gb,
            "params_M": sum(p.numel() for p in meta_model.parameters()) / 1e6, "image": [height, width],
            "dtype": str(dtype).removeprefix("torch."), "ac_policy": policy, "micro_batch": micro,
            "optimizer": cfg.optim.name, "configured_backend": configured,
            "activation_gb_per_sample": per_sample / GB, "activation_gb_fixed": fixed / GB, "backends": rows}


def _policy(value) -> str:
    from ..models.wrapping import normalize_ac_policy

    return normalize_ac_policy(value)


def format_plan(p: dict) -> str:
    h, w = p["image"]
    lines = [f"{p['config']}: {p['params_M']:.0f}M params, {h}x{w}, {p['dtype']}, checkpointing {p['ac_policy']}, "
             f"micro-batch {p['micro_batch']}, {p['optimizer']}, {p['gpus']} GPUs x {p['gpu_mem_gb']:g} GB "
             f"({p['reserve_gb']:g} GB kept for CUDA context, buffers and fragmentation)",
             f"activations (FakeTensorMode, forward + backward): {p['activation_gb_per_sample']:.2f} GB per sample "
             f"+ {max(p['activation_gb_fixed'], 0.0):.2f} GB",
             f"{'GB per GPU':<12}" + "".join(f"{b:>10}" for b in BACKENDS)]
    for key in ("weights", "gradients", "master", "optimizer", "ema", "frozen", "activations", "total"):
        lines.append(f"{key:<12}" + "".join(f"{r[key]:>10.2f}" if r else f"{'n/a':>10}"
                                            for r in p["backends"].values()))
    lines.append(f"{'fits':<12}" + "".join(f"{('yes' if r['fits'] else 'NO'):>10}" if r else f"{'n/a':>10}"
                                          for r in p["backends"].values()))
    lines.append(f"{'max micro':<12}" + "".join(f"{r['max_micro_batch']:>10}" if r else f"{'n/a':>10}"
                                               for r in p["backends"].values()))
    c = p["configured_backend"]
    if c in p["backends"] and p["backends"][c]:
        r = p["backends"][c]
        lines.append(f"verdict ({c}, as configured): {'fits' if r['fits'] else 'does NOT fit'} "
                     f"({r['total']:.1f} of {p['gpu_mem_gb']:g} GB); largest micro-batch that fits: "
                     f"{r['max_micro_batch']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="t2i-memplan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", required=True, help="a run YAML")
    ap.add_argument("--gpus", type=int, default=8, help="data-parallel world size")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU")
    ap.add_argument("--reserve-gb", type=float, default=4.0,
                    help="kept free for the CUDA context, communication buffers and fragmentation")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = ap.parse_args(argv)
    if args.gpus < 1 or args.gpu_mem_gb <= 0:
        raise SystemExit(f"--gpus must be >= 1 and --gpu-mem-gb > 0, got {args.gpus}, {args.gpu_mem_gb}")
    result = plan(args.config, args.gpus, args.gpu_mem_gb, args.reserve_gb, tuple(args.overrides))
    print(json.dumps(result) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
