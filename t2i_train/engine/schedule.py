"""Learning rate and clip threshold as pure functions of the optimizer step (so resume needs only the step).

Linear warm-up to `lr`, then constant; `step_downs` replace the lr and/or the clip threshold from their step on
(ImageNet: lr 1e-4 → 1e-5 and clip 1.0 → 0.5 at the configured step).
"""
from __future__ import annotations


def lr_at(step: int, optim_cfg) -> float:
    lr = optim_cfg.lr
    for sd in optim_cfg.step_downs:
        if step >= sd.step and sd.lr is not None:
            lr = sd.lr
    if optim_cfg.warmup_steps > 0 and step < optim_cfg.warmup_steps:
        lr = lr * (step + 1) / optim_cfg.warmup_steps
    return lr


def clip_at(step: int, optim_cfg) -> float:
    clip = optim_cfg.grad_clip
    for sd in optim_cfg.step_downs:
        if step >= sd.step and sd.clip is not None:
            clip = sd.clip
    return clip
