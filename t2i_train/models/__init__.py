"""PixelDiT denoisers. See docs/INTERFACES.md for the calling convention."""
from .pixeldit import DEFAULTS, PixelDiT, resolve_config
from .presets import PRESETS, build_model, model_config

__all__ = ["DEFAULTS", "PRESETS", "PixelDiT", "build_model", "model_config", "resolve_config"]
