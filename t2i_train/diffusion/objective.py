"""The training objective: rectified-flow velocity matching plus optional REPA alignment.

    x_t = t·x + (1 − t)·ε,   v = x − ε,   loss = mean‖model(x_t, t, c) − v‖² + λ·REPA

Backend-agnostic: no distributed code here. The trainer owns devices, precision (autocast) and optimisation;
the REPA projector's parameters (`objective.parameters()`) must be optimised together with the model's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from .repa import DINO_DIM, DINO_PATCH, DinoV2Teacher, RepaProjector, repa_loss, resize_tokens
from .timesteps import sample_timesteps


@dataclass
class FlowObjectiveConfig:
    timestep_sampling: str = "logit_normal"  # "uniform" | "logit_normal" (sigmoid of N(mean, std), t = 1 is data)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # 1.0 ImageNet-256, 3.0 T2I-512 (and ImageNet-512), 4.0 T2I-1024
    repa_weight: float = 0.0  # λ; 0 builds no teacher and no projector
    repa_block: int = 8  # 1-based patch block whose output is aligned; must equal model.config["repa_block"]
    repa_projector_dim: int | None = None  # None → denoiser width (ImageNet reference); the T2I reference uses 2048
    repa_encoder: str | None = None  # DINOv2 weights: local file or hub id; None = random init (tests only)
    # teacher input side: T2I reference 224² (16² DINOv2 tokens, the student's tokens resized to match);
    # None = the student's own token grid (ImageNet reference)
    repa_teacher_resolution: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FlowObjectiveConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown objective config keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)


class FlowObjective(nn.Module):
    """`loss(model, images, cond, mask)` → dict(loss, mse, repa_loss, per_sample [B], t [B]).

    Registered parameters are the REPA projector's only; the frozen DINOv2 teacher is kept out of
    `state_dict()` / `parameters()` but follows `.to()`.
    """

    def __init__(self, cfg: FlowObjectiveConfig | Mapping[str, Any] | None = None, hidden_size: int | None = None,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, FlowObjectiveConfig) else FlowObjectiveConfig.from_dict(cfg)
        self.projector: RepaProjector | None = None
        self._teacher: tuple[nn.Module, ...] = ()
        if self.cfg.repa_weight > 0:
            if hidden_size is None:
                raise ValueError("REPA needs the denoiser width: pass hidden_size=model.hidden_size")
            if self.cfg.repa_block <= 0:
                raise ValueError(f"repa_block must be >= 1 when repa_weight > 0, got {self.cfg.repa_block}")
            width = self.cfg.repa_projector_dim or hidden_size
            teacher = teacher if teacher is not None else DinoV2Teacher(self.cfg.repa_encoder)
            self.projector = RepaProjector(hidden_size, width, getattr(teacher, "dim", DINO_DIM))
            self._teacher = (teacher,)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._teacher:
            self._teacher[0]._apply(fn, recurse)
        return self

    def loss(self, model: nn.Module, images: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
             *, generator: torch.Generator | None = None, t: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        cfg = self.cfg
        b = images.shape[0]
        if t is None:
            t = sample_timesteps(b, kind=cfg.timestep_sampling, mean=cfg.logit_mean, std=cfg.logit_std,
                                 shift=cfg.shift, device=images.device, generator=generator)
        if generator is not None:
            noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=torch.float32)
            noise = noise.to(device=images.device, dtype=images.dtype)
        else:
            noise = torch.randn_like(images)
        tb = t.to(images.dtype).view(b, *([1] * (images.dim() - 1)))
        x_t = tb * images + (1.0 - tb) * noise
        target = images - noise

        if self.projector is not None:
            pred, hidden = model(x_t, t, cond, mask, return_repa=True)
        else:
            pred, hidden = model(x_t, t, cond, mask), None
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        mse = per_sample.mean()
        out = dict(loss=mse, mse=mse.detach(), repa_loss=None, per_sample=per_sample.detach(), t=t.detach())
        if hidden is not None:
            patch = int(_model_attr(model, "patch_size"))
            grid = (images.shape[-2] // patch, images.shape[-1] // patch)
            if hidden.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"REPA hidden state has {hidden.shape[1]} tokens, expected {grid[0]}x{grid[1]} "
                                 f"for images {tuple(images.shape[-2:])} and patch size {patch}")
            teacher_grid = grid
            if cfg.repa_teacher_resolution:
                side = cfg.repa_teacher_resolution // DINO_PATCH
                teacher_grid = (side, side)
            with torch.no_grad():
                target_tokens = self.teacher(images, teacher_grid)
            projected = self.projector(hidden)
            if teacher_grid != grid:  # as the reference: unit tokens, resized, then compared by cosine
                projected = resize_tokens(nn.functional.normalize(projected.float(), dim=-1), grid, teacher_grid)
            r = repa_loss(projected, target_tokens)
            out["loss"] = mse + cfg.repa_weight * r
            out["repa_loss"] = r.detach()
        return out


def _model_attr(model: nn.Module, name: str):
    """Read an attribute through DDP / DeepSpeed style wrappers (`.module`)."""
    while not hasattr(model, name) and hasattr(model, "module"):
        model = model.module
    return getattr(model, name)


class ConditionDropout:
    """Replace each sample's condition by the null condition with probability `prob` (for CFG training).

    Class conditions: the null class index `num_classes`. Text: the empty-prompt embedding `null_emb`
    ([L, D] or [1, L, D]) and its mask `null_mask` ([L] or [1, L]), as the reference does.
    """

    def __init__(self, prob: float, *, num_classes: int | None = None, null_emb: torch.Tensor | None = None,
                 null_mask: torch.Tensor | None = None):
        if (num_classes is None) == (null_emb is None):
            raise ValueError("ConditionDropout needs exactly one of num_classes (c2i) or null_emb (t2i)")
        self.prob = float(prob)
        self.num_classes = num_classes
        self.null_emb = None if null_emb is None else null_emb.reshape(-1, null_emb.shape[-1])
        self.null_mask = None if null_mask is None else null_mask.reshape(-1)

    def __call__(self, cond: torch.Tensor, mask: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.prob <= 0:
            return cond, mask
        b = cond.shape[0]
        gen_device = generator.device if generator is not None else cond.device
        drop = (torch.rand(b, generator=generator, device=gen_device) < self.prob).to(cond.device)
        if self.num_classes is not None:
            return torch.where(drop, torch.full_like(cond, self.num_classes), cond), mask
        null = self.null_emb.to(device=cond.device, dtype=cond.dtype)
        if null.shape != cond.shape[1:]:
            raise ValueError(f"null text embedding {tuple(null.shape)} does not match condition {tuple(cond.shape[1:])}")
        cond = torch.where(drop.view(b, 1, 1), null.unsqueeze(0), cond)
        if mask is not None and self.null_mask is not None:
            mask = torch.where(drop.view(b, 1), self.null_mask.to(device=mask.device, dtype=mask.dtype).unsqueeze(0), mask)
        return cond, mask
