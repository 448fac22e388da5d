"""REPA: align an intermediate denoiser state with frozen DINOv2 patch features.

The teacher is timm's `vit_base_patch14_dinov2` (768-d patch tokens after the final norm). Images in [-1, 1]
are mapped to [0, 1], ImageNet-normalised and bicubically resized so that the DINOv2 token grid equals the
denoiser's patch grid (14·H/p × 14·W/p pixels), which also covers non-square images.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

DINO_DIM = 768
DINO_PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepaProjector(nn.Sequential):
    """3-layer SiLU MLP from the denoiser width to the teacher width.

    Parameter names `0.*, 2.*, 4.*` match both reference layouts after stripping their prefix:
    ImageNet trainer `proj.0.{0,2,4}.{weight,bias}` (projector width = denoiser width, e.g. 1152) and
    T2I trainer `_repa_projector.{0,2,4}.{weight,bias}` (projector width 2048). See `load_reference_state`.
    """

    REFERENCE_PREFIXES = ("proj.0.", "_repa_projector.", "module._repa_projector.", "proj.")

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = DINO_DIM):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def load_reference_state(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Load projector weights from a reference checkpoint's state dict, if it has them. Returns True if loaded."""
        for prefix in self.REFERENCE_PREFIXES:
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            sub = {k: v for k, v in sub.items() if k.split(".")[0] in {"0", "2", "4"}}
            if len(sub) == 6:
                self.load_state_dict(sub)
                return True
        return False


class DinoV2Teacher(nn.Module):
    """Frozen DINOv2 ViT-B/14 from timm; returns [B, (H/p)·(W/p), 768] patch tokens after the final norm.

    `weights`: None (random init, tests), a local file (.safetensors / .pth / .bin with timm key names), a local
    timm model folder (`config.json` + weights, any DINOv2 width: e.g. the CPU demo's tiny one), a hub id
    ('timm/vit_base_patch14_dinov2.lvd142m') or a tagged timm name ('vit_base_patch14_dinov2.lvd142m').
    `dim` is the width of the returned tokens.
    """

    def __init__(self, weights: str | None = None, model_name: str = "vit_base_patch14_dinov2"):
        super().__init__()
        import timm

        local = weights is not None and os.path.isfile(weights)
        kwargs = dict(num_classes=0, dynamic_img_size=True)
        if weights is not None and os.path.isdir(weights):
            self.encoder = timm.create_model(f"local-dir:{weights}", pretrained=True, **kwargs)
        elif weights is None or local:
            self.encoder = timm.create_model(model_name, pretrained=False, **kwargs)
            if local:
                self.encoder.load_state_dict(_read_state_dict(weights), strict=True)
        elif "/" in weights and not weights.startswith(("hf-hub:", "hf_hub:")):
            self.encoder = timm.create_model(f"hf-hub:{weights}", pretrained=True, **kwargs)
        else:  # "hf-hub:org/name" or a timm name with tag, e.g. "vit_base_patch14_dinov2.lvd142m"
            self.encoder = timm.create_model(weights, pretrained=True, **kwargs)
        self.encoder.requires_grad_(False).eval()
        self.dim = int(self.encoder.num_features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # always frozen, always eval (no dropout / drop-path)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = (images.float() + 1.0) / 2.0
        x = (x - self.mean) / self.std
        size = (DINO_PATCH * grid[0], DINO_PATCH * grid[1])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        tokens = self.encoder.forward_features(x.to(next(self.encoder.parameters()).dtype))
        return tokens[:, self.encoder.num_prefix_tokens:]


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, h·w, C] tokens on `grid` → [B, size[0]·size[1], C], bilinearly (the T2I reference's trainer.py brings
    its projected 32² student tokens to the 16² DINOv2 grid this way)."""
    if tuple(grid) == tuple(size):
        return tokens
    b, n, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(tokens.dtype)
    return x.flatten(2).transpose(1, 2)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over tokens and batch. Both [B, N, 768]."""
    if projected.shape != target.shape:
        raise ValueError(f"REPA token shapes differ: projected {tuple(projected.shape)} vs teacher {tuple(target.shape)}")
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
