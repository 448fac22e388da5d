"""Named model configurations (paper Tables 3 and 8) and the factory used from YAML `model:` sections."""
from __future__ import annotations

import copy
from typing import Any

from .pixeldit import PixelDiT

PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet class-conditional models, Table 3: patch 16, D_pix 16, 1000 classes.
    "pixeldit_b": dict(arch="c2i", hidden_size=768, num_heads=12, depth=12, pixel_depth=2),
    "pixeldit_l": dict(arch="c2i", hidden_size=1024, num_heads=16, depth=22, pixel_depth=4),
    "pixeldit_xl": dict(arch="c2i", hidden_size=1152, num_heads=16, depth=26, pixel_depth=4),
    # Text-to-image, Table 8 and the released stage configs: MM-DiT patch pathway, Gemma-2-2B text.
    "pixeldit_t2i": dict(arch="t2i", hidden_size=1536, num_heads=24, depth=14, pixel_depth=2,
                         pixel_attn_dim=1152, pixel_attn_heads=16, txt_dim=2304, txt_len=300),
    # Small models for tests, the step benchmark and the CPU demo.
    "pixeldit_tiny_c2i": dict(arch="c2i", patch_size=8, hidden_size=64, num_heads=4, depth=2,
                              pixel_depth=1, pixel_dim=8, num_classes=10),
    "pixeldit_tiny_t2i": dict(arch="t2i", patch_size=8, hidden_size=64, num_heads=4, depth=2,
                              pixel_depth=1, pixel_dim=8, pixel_attn_dim=48, pixel_attn_heads=3,
                              txt_dim=32, txt_len=16),
    "pixeldit_mini_t2i": dict(arch="t2i", patch_size=16, hidden_size=384, num_heads=6, depth=4,
                              pixel_depth=2, pixel_dim=16, pixel_attn_dim=384, pixel_attn_heads=6,
                              txt_dim=256, txt_len=64),
}


def model_config(spec: str | dict, **overrides) -> dict:
    """Resolve a preset name or a config dict (optionally naming a `preset`) plus overrides."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown model preset {spec!r}; known: {sorted(PRESETS)}")
        cfg = copy.deepcopy(PRESETS[spec])
    else:
        cfg = dict(spec)
        preset = cfg.pop("preset", None)
        if preset is not None:
            cfg = {**model_config(preset), **cfg}
    cfg.update(overrides)
    return cfg


def build_model(spec: str | dict, **overrides) -> PixelDiT:
    return PixelDiT(**model_config(spec, **overrides))
