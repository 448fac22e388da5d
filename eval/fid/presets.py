"""The paper's ImageNet sampler settings (model card, `shared/seeds/model-card-imagenet.md`): FlowDPMSolver,
100 steps, per checkpoint CFG scale, guidance interval (t = 1 data, our convention = the c2i reference's) and
time shift. Note the 512² shift is 2.0, not the 3.0 training shift `t2i-sample` would default to."""
from __future__ import annotations

PRESETS = {
    # name: resolution, cfg, interval, shift; the paper's gFID with 50K samples in the comment
    "256-ep80": dict(resolution=256, cfg_scale=3.25, cfg_interval=(0.1, 1.0), shift=1.0),   # 2.36
    "256-ep160": dict(resolution=256, cfg_scale=3.25, cfg_interval=(0.1, 1.0), shift=1.0),  # 1.97
    "256-ep320": dict(resolution=256, cfg_scale=2.75, cfg_interval=(0.1, 0.9), shift=1.0),  # 1.61
    "512": dict(resolution=512, cfg_scale=3.5, cfg_interval=(0.1, 1.0), shift=2.0),         # 1.78
}
SAMPLER = dict(name="flow_dpm_solver", steps=100)
DEFAULT_FOR_RESOLUTION = {256: "256-ep320", 512: "512"}


def sampler_overrides(preset: str) -> dict:
    """SamplerConfig fields of a preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown FID preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    return dict(SAMPLER, cfg_scale=p["cfg_scale"], cfg_interval=p["cfg_interval"], shift=p["shift"])
