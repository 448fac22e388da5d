"""ODE samplers for the rectified flow, all in our convention (integrate dx/dt = v from t = 0 noise to t = 1 data).

* `euler`            — first order.
* `heun`             — second order. Default mirrors the ImageNet reference (one model call per step: the
                       predictor's velocity is reused as the next step's start slope, last step plain Euler);
                       `heun_exact=True` re-evaluates at every corrected point (two calls per step).
* `flow_dpm_solver`  — the ImageNet reference's "FlowDPMSolver": second-order Adams–Bashforth on v
                       (x += dt·(1.5·v_k − 0.5·v_{k−1}), Euler first step), uniform grid t_k = k/N then shifted.
* `dpm_solver_2m`    — DPM-Solver++(2M) in flow form, as the T2I reference's `flow_dpm-solver`
                       (data prediction x̂ = x_t + (1 − t)·v, α_t = t, σ_t = 1 − t, λ = log(α/σ); first-order
                       first and last step; grid `time_uniform_flow`: u_k = 1e-3 + (1 − 1e-3)·k/N, then shifted).

Classifier-free guidance: v = v_u + s·(v_c − v_u), applied only where t_min < t < t_max (strict, as the
reference); there the conditional and unconditional halves go through ONE batched forward; elsewhere only the
conditional half is evaluated. Solver state is float32; `dtype=bfloat16` runs the model under autocast.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .timesteps import shift_time

SAMPLERS = ("euler", "heun", "flow_dpm_solver", "dpm_solver_2m")
_ALIASES = {"flow_dpm-solver": "dpm_solver_2m", "dpm-solver++": "dpm_solver_2m", "flowdpmsolver": "flow_dpm_solver"}
FLOW_DPM_T0 = 1e-3  # the T2I reference's t_0 = 1 / 1000 (discrete_flow schedule, total_N = 1000)


@dataclass
class SamplerConfig:
    name: str = "dpm_solver_2m"
    steps: int = 25
    shift: float = 1.0
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance where t_min < t < t_max (t = 1 is data)
    dtype: str = "float32"  # "float32" | "bfloat16" (model forward under autocast)
    heun_exact: bool = False
    spacing: str = "uniform"  # "uniform" (the references' grids) | "logsnr" (λ-uniform, DPM-Solver's native grid)

    def __post_init__(self):
        self.name = _ALIASES.get(self.name, self.name)
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {SAMPLERS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.cfg_interval = (float(self.cfg_interval[0]), float(self.cfg_interval[1]))
        if self.spacing not in ("uniform", "logsnr"):
            raise ValueError(f"sampler spacing must be 'uniform' or 'logsnr', got {self.spacing!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"sampler dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cfg_interval"] = list(self.cfg_interval)
        return d


def time_grid(name: str, steps: int, shift: float = 1.0, spacing: str = "uniform") -> torch.Tensor:
    """The N + 1 times (float64, increasing, ending at 1) a sampler visits.

    "uniform": the references' grids. Note that on DPM-Solver's t-uniform flow grid the log-SNR step sizes at
    both ends do not shrink with N, so its observed order there sits between 1 and 2; "logsnr" spaces
    the first N points uniformly in λ over [λ(1e-3), λ(1 − 1e-3)] (then t = 1), where 2M is second order.
    """
    name = _ALIASES.get(name, name)
    if spacing == "logsnr":
        lam_max = math.log((1.0 - FLOW_DPM_T0) / FLOW_DPM_T0)
        u = torch.sigmoid(torch.linspace(-lam_max, lam_max, steps, dtype=torch.float64))
        u = torch.cat([u, torch.ones(1, dtype=torch.float64)])
    else:
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        if name == "dpm_solver_2m":
            u = FLOW_DPM_T0 + (1.0 - FLOW_DPM_T0) * u
    t = shift_time(u, shift)
    t[-1] = 1.0
    return t


def make_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal tensor per seed, drawn on the CPU: the same seed gives the same noise whatever the
    batch composition, rank or device."""
    out = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


class GuidedVelocity:
    """v(x, t) with CFG; counts model calls (`calls`) and batched forwards."""

    def __init__(self, model, cond, mask=None, uncond=None, uncond_mask=None, *, cfg_scale=1.0,
                 cfg_interval=(0.0, 1.0), dtype="float32"):
        self.model, self.cond, self.mask = model, cond, mask
        self.uncond, self.uncond_mask = uncond, uncond_mask
        self.scale = float(cfg_scale)
        self.lo, self.hi = cfg_interval
        self.guided = self.scale != 1.0 and uncond is not None
        if self.guided:
            self.cond_in = torch.cat([uncond, cond], 0)
            self.mask_in = None if mask is None else torch.cat([uncond_mask if uncond_mask is not None
                                                                else torch.ones_like(mask), mask], 0)
        self.dtype = dtype
        self.calls = 0

    def _forward(self, x, t, cond, mask):
        self.calls += 1
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        if self.dtype == "bfloat16":
            ctx = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return self.model(x, tt, cond, mask).float()

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        if self.guided and self.lo < t < self.hi:
            v_u, v_c = self._forward(torch.cat([x, x], 0), t, self.cond_in, self.mask_in).chunk(2)
            return v_u + self.scale * (v_c - v_u)
        return self._forward(x, t, self.cond, self.mask)


def _euler(f, x, ts):
    for k in range(len(ts) - 1):
        x = x + (ts[k + 1] - ts[k]) * f(x, ts[k])
    return x


def _heun(f, x, ts, exact=False):
    n = len(ts) - 1
    v_next = None
    for k in range(n):
        dt = ts[k + 1] - ts[k]
        v = f(x, ts[k]) if (k == 0 or exact) else v_next
        x_pred = x + dt * v
        if k == n - 1:  # no evaluation at t = 1, as the reference
            x = x_pred
        else:
            v_next = f(x_pred, ts[k + 1])
            x = x + dt * 0.5 * (v + v_next)
    return x


def _flow_dpm_solver(f, x, ts):
    v_prev = None
    for k in range(len(ts) - 1):
        dt = ts[k + 1] - ts[k]
        v = f(x, ts[k])
        x = x + dt * (v if v_prev is None else 1.5 * v - 0.5 * v_prev)
        v_prev = v
    return x


def _lam(t: float) -> float:
    return math.log(t / (1.0 - t))


def _dpm_solver_2m(f, x, ts):
    n = len(ts) - 1
    x0_prev = None
    for k in range(n):
        s, t = ts[k], ts[k + 1]
        x0 = x + (1.0 - s) * f(x, s)  # data prediction
        if t >= 1.0:  # σ_t = 0: first-order update lands exactly on the data prediction
            x = x0
            break
        # first-order part: x_t = (σ_t/σ_s)·x_s − α_t·expm1(−h)·D
        h = _lam(t) - _lam(s)
        phi = math.expm1(-h)
        if x0_prev is None or k == n - 1:
            d = x0
        else:
            r = (_lam(s) - _lam(ts[k - 1])) / h
            d = x0 + (0.5 / r) * (x0 - x0_prev)
        x = ((1.0 - t) / (1.0 - s)) * x - t * phi * d
        x0_prev = x0
    return x


@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, cond, mask=None, uncond=None, uncond_mask=None,
           cfg: SamplerConfig | None = None, *, return_calls: bool = False):
    """Integrate from `noise` (t = 0) to data (t = 1). `cond`/`uncond`: class indices [B] or text [B, L, D]."""
    cfg = cfg or SamplerConfig()
    f = GuidedVelocity(model, cond, mask, uncond, uncond_mask, cfg_scale=cfg.cfg_scale,
                       cfg_interval=cfg.cfg_interval, dtype=cfg.dtype)
    ts = time_grid(cfg.name, cfg.steps, cfg.shift, cfg.spacing).tolist()
    x = noise.float()
    if cfg.name == "euler":
        x = _euler(f, x, ts)
    elif cfg.name == "heun":
        x = _heun(f, x, ts, exact=cfg.heun_exact)
    elif cfg.name == "flow_dpm_solver":
        x = _flow_dpm_solver(f, x, ts)
    else:
        x = _dpm_solver_2m(f, x, ts)
    return (x, f.calls) if return_calls else x
