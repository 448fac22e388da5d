"""Optimisers: AdamW (torch) and CAME (confidence-guided adaptive memory-efficient optimisation, Luo et al. 2023).

CAME keeps Adafactor-style factored second moments (row and column statistics) for 2-D weights and 1x1 convs,
and a factored "instability" statistic of (update − momentum)² that scales the momentum. Hyper-parameters follow
the T2I reference: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), update RMS clip 1.0, decoupled weight decay.
Under ZeRO the optimizer sees flat 1-D partitions (so CAME is unfactored there); under FSDP2 it works on each
rank's local shard (factored statistics per shard).
"""
from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class CAME(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                 clip_threshold: float = 1.0, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"CAME lr must be > 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"CAME needs three betas in [0, 1], got {betas}")
        if len(eps) != 2:
            raise ValueError(f"CAME needs two eps values, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold,
                                      weight_decay=weight_decay))

    @staticmethod
    def _factored_shape(shape: torch.Size):
        if len(shape) == 2:
            return shape[0], shape[1]
        if len(shape) == 4 and shape[2] == 1 and shape[3] == 1:
            return shape[0], shape[1]
        return None

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    @staticmethod
    def _approx(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        r = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        c = col.unsqueeze(-2).rsqrt()
        return r * c

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                param = _local(p)
                grad = _local(p.grad).float()
                if grad.numel() == 0:
                    continue
                fs = self._factored_shape(grad.shape)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    if fs is not None:
                        for k, n in (("row", fs[0]), ("col", fs[1])):
                            state[f"exp_avg_sq_{k}"] = grad.new_zeros(n)
                            state[f"exp_avg_res_{k}"] = grad.new_zeros(n)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1

                sq = grad.square() + eps1
                if fs is not None:
                    sq2 = sq.reshape(fs)
                    state["exp_avg_sq_row"].lerp_(sq2.mean(dim=1), 1 - b2)
                    state["exp_avg_sq_col"].lerp_(sq2.mean(dim=0), 1 - b2)
                    update = self._approx(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).reshape(grad.shape) * grad
                else:
                    state["exp_avg_sq"].lerp_(sq, 1 - b2)
                    update = state["exp_avg_sq"].rsqrt() * grad
                update = update / (self._rms(update) / group["clip_threshold"]).clamp(min=1.0)

                exp_avg = state["exp_avg"]
                exp_avg.lerp_(update, 1 - b1)
                if fs is not None:
                    res = ((update - exp_avg).square() + eps2).reshape(fs)
                    state["exp_avg_res_row"].lerp_(res.mean(dim=1), 1 - b3)
                    state["exp_avg_res_col"].lerp_(res.mean(dim=0), 1 - b3)
                    update = self._approx(state["exp_avg_res_row"], state["exp_avg_res_col"]).reshape(grad.shape) * exp_avg
                else:
                    update = exp_avg.clone()

                if group["weight_decay"] != 0:
                    param.mul_(1 - group["weight_decay"] * group["lr"])
                param.add_(update.to(param.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    """AdamW or CAME over `params` (an iterable of tensors or param groups); lr is set per step by the trainer."""
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps[0],
                                 weight_decay=optim_cfg.weight_decay, foreach=False)
    if optim_cfg.name == "came":
        return CAME(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=tuple(optim_cfg.eps),
                    weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"optim.name: {optim_cfg.name!r} is not one of 'adamw', 'came'")
