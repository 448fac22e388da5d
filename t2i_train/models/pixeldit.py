"""PixelDiT: a dual-level pixel-space diffusion transformer (paper §3).

The patch-level pathway (N blocks over p×p patch tokens, DiT or MM-DiT) builds semantics; the pixel-level
pathway (M PiT blocks over per-pixel tokens) renders detail, conditioned per patch by
s_cond = SiLU(s_N + t_emb). One class serves class-conditional (arch "c2i") and text-to-image
(arch "t2i") models; `config` is a plain dict that rebuilds the model.

Interface: `model(x_t, t, cond, mask=None) -> v` in the project convention (t = 0 noise, t = 1 data,
v = x − ε). Released text-to-image weights were trained in SANA's convention (input 1000·σ with σ = 1 − t,
output ε − x); `timestep_convention: sana_flow` adapts at this boundary.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import DiTBlock, FinalLayer, MMDiTBlock, PiTBlock, PixelTokenEmbedder
from .layers import RMSNorm, TimestepEmbedder, joint_attention_mask, rope_1d, rope_2d
from .wrapping import compile_blocks, normalize_ac_policy, run_block, set_recompute_regions

DEFAULTS: dict[str, Any] = dict(
    arch="c2i",
    in_channels=3,
    patch_size=16,
    hidden_size=1152,
    num_heads=16,
    depth=26,                 # N, patch-level blocks
    pixel_depth=4,            # M, PiT blocks
    pixel_dim=16,             # D_pix
    pixel_attn_dim=None,      # compaction width (default: hidden_size)
    pixel_attn_heads=None,    # default: num_heads
    mlp_ratio=4.0,
    rope_theta=10000.0,
    rope_extent=16.0,         # 2D RoPE positions span [0, extent] at any resolution
    use_pixel_abs_pos=True,
    num_classes=1000,         # c2i only; class index num_classes is the null class
    txt_dim=2304,             # t2i only
    txt_len=300,
    text_rope=True,
    text_rope_theta=10000.0,
    use_text_mask=True,
    repa_block=0,             # 1-based patch block whose output feeds REPA; 0 = none
    timestep_convention="native",
    # what the network's last layer predicts: "v" (the paper's main setting) or "x" (its appendix G: the clean
    # image, returned as v = (x̂ − x_t) / max(1 − t, x_min_sigma) so the loss, samplers and CFG are unchanged)
    prediction="v",
    x_min_sigma=0.05,
    grad_checkpointing="none",  # activation checkpointing per block: none | selective | full (true = full)
)


def resolve_config(cfg: dict) -> dict:
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if out["arch"] not in ("c2i", "t2i"):
        raise ValueError(f"model.arch must be 'c2i' or 't2i', got {out['arch']!r}")
    if out["timestep_convention"] not in ("native", "sana_flow"):
        raise ValueError("model.timestep_convention must be 'native' or 'sana_flow', "
                         f"got {out['timestep_convention']!r}")
    if out["prediction"] not in ("v", "x"):
        raise ValueError(f"model.prediction must be 'v' or 'x', got {out['prediction']!r}")
    if out["prediction"] == "x" and out["timestep_convention"] != "native":
        raise ValueError("model.prediction 'x' needs timestep_convention 'native'")
    if not out["x_min_sigma"] > 0:
        raise ValueError(f"model.x_min_sigma must be > 0, got {out['x_min_sigma']}")
    out["grad_checkpointing"] = normalize_ac_policy(out["grad_checkpointing"])
    if out["pixel_attn_dim"] is None:
        out["pixel_attn_dim"] = out["hidden_size"]
    if out["pixel_attn_heads"] is None:
        out["pixel_attn_heads"] = out["num_heads"]
    if out["pixel_depth"] < 1:
        raise ValueError("model.pixel_depth must be >= 1 (the pixel pathway is the model's output)")
    if not 0 <= out["repa_block"] <= out["depth"]:
        raise ValueError(f"model.repa_block must be in [0, depth={out['depth']}], got {out['repa_block']}")
    return out


class PixelDiT(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        cfg = resolve_config(cfg)
        self.config = cfg
        self.is_t2i = cfg["arch"] == "t2i"
        self.patch_size = p = cfg["patch_size"]
        self.hidden_size = D = cfg["hidden_size"]
        self.num_heads = cfg["num_heads"]
        self.in_channels = C = cfg["in_channels"]
        self.grad_checkpointing = cfg["grad_checkpointing"]
        self.compiled = False

        self.patch_embed = nn.Linear(C * p * p, D)
        self.pixel_embed = PixelTokenEmbedder(C, cfg["pixel_dim"], cfg["use_pixel_abs_pos"])
        self.t_embed = TimestepEmbedder(D)
        if self.is_t2i:
            self.num_classes = None
            self.text_proj = nn.Linear(cfg["txt_dim"], D)
            self.text_norm = RMSNorm(D)
            self.text_pos = nn.Parameter(torch.randn(1, cfg["txt_len"], D))
            block = MMDiTBlock
        else:
            self.num_classes = cfg["num_classes"]
            self.class_embed = nn.Embedding(cfg["num_classes"] + 1, D)
            block = DiTBlock
        self.patch_blocks = nn.ModuleList(
            block(D, cfg["num_heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth"]))
        self.pixel_blocks = nn.ModuleList(
            PiTBlock(cfg["pixel_dim"], D, p, cfg["pixel_attn_dim"], cfg["pixel_attn_heads"], cfg["mlp_ratio"])
            for _ in range(cfg["pixel_depth"]))
        self.final = FinalLayer(cfg["pixel_dim"], C)
        set_recompute_regions(self.shard_units(), self.grad_checkpointing, self.compiled)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    def reset_parameters(self):
        """Initialisation of the release: xavier patch embedding, N(0, 0.02) embeddings, zero output layer;
        the class-conditional model also zeroes every AdaLN projection (the text model keeps the default)."""
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if not self.is_t2i:
            nn.init.normal_(self.class_embed.weight, std=0.02)
            for blk in [*self.patch_blocks, *self.pixel_blocks]:
                nn.init.zeros_(blk.modulation.weight)
                nn.init.zeros_(blk.modulation.bias)

    def set_activation_checkpointing(self, policy: str | bool = True):
        """'none' | 'selective' | 'full' per block (a boolean means 'full' / 'none')."""
        self.grad_checkpointing = normalize_ac_policy(policy)
        self.config["grad_checkpointing"] = self.grad_checkpointing
        set_recompute_regions(self.shard_units(), self.grad_checkpointing, self.compiled)

    def compile_blocks(self):
        """Regional torch.compile: each transformer block is compiled in place (see models.wrapping)."""
        if not self.compiled:
            compile_blocks(self.shard_units())
            self.compiled = True
            set_recompute_regions(self.shard_units(), self.grad_checkpointing, self.compiled)

    @contextlib.contextmanager
    def nominal_flops(self):
        """Within this context the model executes the nominal architecture (no shift fold, see PiTBlock), so
        that FLOP counters see the paper's FLOPs (Table 16); MFU is computed from these."""
        saved = [blk.fold_shift for blk in self.pixel_blocks]
        for blk in self.pixel_blocks:
            blk.fold_shift = False
        try:
            yield self
        finally:
            for blk, v in zip(self.pixel_blocks, saved):
                blk.fold_shift = v

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks, each a unit for FSDP2 `fully_shard` and activation checkpointing."""
        return [*self.patch_blocks, *self.pixel_blocks]

    def _run(self, block, *args):
        return run_block(self.grad_checkpointing, block, *args)

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, x, t, cond, mask):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(f"image size {H}x{W} is not a positive multiple of the patch size {p}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or [B={B}], got {tuple(t.shape)}")
        if self.is_t2i:
            if cond.dim() != 3 or cond.shape[0] != B or cond.shape[2] != self.config["txt_dim"]:
                raise ValueError(f"text condition must be [B={B}, L, {self.config['txt_dim']}], "
                                 f"got {tuple(cond.shape)}")
            if mask is not None and (mask.dim() != 2 or mask.shape != cond.shape[:2]):
                raise ValueError(f"text mask must be [B, L]={tuple(cond.shape[:2])}, got {tuple(mask.shape)}")
        else:
            if cond.dim() != 1 or cond.shape[0] != B or cond.dtype.is_floating_point:
                raise ValueError(f"class condition must be an integer tensor [B={B}], got "
                                 f"{tuple(cond.shape)} {cond.dtype}")
        return t

    def forward(self, x, t, cond, mask=None, return_repa: bool = False):
        t = self._check_inputs(x, t, cond, mask)
        t_data = t
        if self.config["timestep_convention"] == "sana_flow":
            t = 1000.0 * (1.0 - t)
        B, C, H, W = x.shape
        p, D = self.patch_size, self.hidden_size
        hp, wp = H // p, W // p
        L = hp * wp
        cfg = self.config
        if return_repa and cfg["repa_block"] <= 0:
            raise ValueError("return_repa=True needs model.repa_block > 0")

        rope = rope_2d(D // self.num_heads, hp, wp, x.device, cfg["rope_theta"], cfg["rope_extent"])
        patches = x.view(B, C, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(B, L, C * p * p)
        s = self.patch_embed(patches)
        t_emb = self.t_embed(t)[:, None]  # [B, 1, D]
        repa_h = None

        if self.is_t2i:
            Lt = min(cond.shape[1], cfg["txt_len"])
            txt = self.text_norm(self.text_proj(cond[:, :Lt]))
            txt = txt + self.text_pos[:, :Lt].to(txt.dtype)
            c = F.silu(t_emb)
            txt_rope = rope_1d(D // self.num_heads, Lt, x.device, cfg["text_rope_theta"]) \
                if cfg["text_rope"] else None
            key_mask = mask[:, :Lt].bool() if (mask is not None and cfg["use_text_mask"]) else None
            attn_mask = joint_attention_mask(key_mask, L)
            for i, blk in enumerate(self.patch_blocks):
                s, txt = self._run(blk, s, txt, c, rope, txt_rope, attn_mask)
                if i + 1 == cfg["repa_block"]:
                    repa_h = s
        else:
            c = F.silu(t_emb + self.class_embed(cond)[:, None])
            for i, blk in enumerate(self.patch_blocks):
                s = self._run(blk, s, c, rope)
                if i + 1 == cfg["repa_block"]:
                    repa_h = s

        s_cond = F.silu(t_emb + s).reshape(B * L, D)
        pix = self.pixel_embed(x, p)
        pix_rope = rope_2d(cfg["pixel_attn_dim"] // cfg["pixel_attn_heads"], hp, wp, x.device,
                           cfg["rope_theta"], cfg["rope_extent"])
        for blk in self.pixel_blocks:
            pix = self._run(blk, pix, s_cond, B, pix_rope)
        out = self.final(pix)  # [B·L, p², C]
        out = out.view(B, hp, wp, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        if cfg["timestep_convention"] == "sana_flow":
            out = -out
        elif cfg["prediction"] == "x":  # x̂ → v̂ in float32: the division magnifies rounding near t = 1
            sigma = (1.0 - t_data.float()).clamp_min(cfg["x_min_sigma"]).view(B, 1, 1, 1)
            out = ((out.float() - x.float()) / sigma).to(x.dtype)
        return (out, repa_h) if return_repa else out

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={c['arch']}, D={c['hidden_size']}, heads={c['num_heads']}, N={c['depth']}, "
                f"M={c['pixel_depth']}, p={c['patch_size']}, D_pix={c['pixel_dim']}")

    def export_config(self) -> dict:
        return copy.deepcopy(self.config)
