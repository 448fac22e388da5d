"""Training-time timestep sampling and the resolution shift, in our convention (t = 1 is data)."""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift written for t = 1 = data: t → t / (t + (1 − t)·s).

    s > 1 moves mass towards noise (small t). It is the same map as SANA's σ → sσ / (1 + (s − 1)σ) with σ = 1 − t.
    """
    if shift == 1.0:
        return t
    return t / (t + (1.0 - t) * shift)


def sample_timesteps(
    batch_size: int,
    *,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw `batch_size` training times in [0, 1] (float32): uniform or sigmoid(N(mean, std)), then shifted."""
    gen_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(batch_size, generator=generator, device=gen_device)
    elif kind == "logit_normal":
        t = torch.sigmoid(torch.randn(batch_size, generator=generator, device=gen_device) * std + mean)
    else:
        raise ValueError(f"timestep sampling kind {kind!r} is not one of 'uniform', 'logit_normal'")
    return shift_time(t.to(device=device, dtype=torch.float32), shift)
