"""Transformer blocks of the two PixelDiT pathways.

Patch level: a DiT block (class-conditional) or an MM-DiT block (text-to-image) over p×p patch tokens.
Pixel level: the PiT block over per-pixel tokens, conditioned pixel by pixel (pixel-wise AdaLN) and attending
across patches through pixel token compaction.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import (chunk_major, folds_bias, fused_applies, norm_linear, norm_scale, norm_scale_w,
                    pixel_mlp_residual)
from .layers import Attention, GeluMLP, JointAttention, RMSNorm, SwiGLU, modulate, sincos_2d
from .recompute import NormModulate, linears_of_recomputed
from .wrapping import selective_region


def _swiglu_hidden(g, u):
    return F.silu(g) * u


def _pixel_norm_scale(x, scale, norm_w, shift, scale_bias, eps, shape):
    return norm_scale_w(x, scale, norm_w, eps, shift, scale_bias).reshape(shape)


class _RecomputingBlock(nn.Module):
    """`selective` activation checkpointing built from the block's structure (models.recompute) instead of op by
    op: the model sets `recompute_regions` under `selective` while the block runs eagerly; compiled blocks keep
    the op-by-op policy, which torch.compile applies at no runtime cost. Outputs are bit-identical to the plain
    forward, and what is kept is what the op-by-op policy keeps."""

    recompute_regions = False

    def _regions(self) -> bool:
        return self.recompute_regions and torch.is_grad_enabled() and not torch.compiler.is_compiling()


class _PatchBlock(_RecomputingBlock):
    """What the patch-level blocks share under `recompute_regions`."""

    @staticmethod
    def _qkv(x, norm, mods, qkv):
        """(norm(x) ⊙ (1 + scale1) + shift1) Wᵀ; the normalised input is recomputed in backward."""
        (out,) = linears_of_recomputed(NormModulate(norm.eps, residual=False),
                                       (x, norm.weight, mods[0], mods[1]), [qkv.weight])
        return out

    @staticmethod
    def _after_attention(x, mods, attn_out, norm, mlp):
        """x + gate1 ⊙ attn, then the gated SwiGLU residual. The residual sum (again), its norm and modulation
        and the MLP's hidden product are recomputed in backward; the MLP's matmul outputs are kept."""
        _, _, gate1, shift2, scale2, gate2 = mods
        g, u = linears_of_recomputed(NormModulate(norm.eps, residual=True),
                                     (x, gate1, attn_out, norm.weight, shift2, scale2),
                                     [mlp.gate.weight, mlp.up.weight])
        (m,) = linears_of_recomputed(_swiglu_hidden, (g, u), [mlp.down.weight])
        return torch.addcmul(torch.addcmul(x, gate1, attn_out), gate2, m)


class DiTBlock(_PatchBlock):
    """Patch-level block: RMSNorm + AdaLN-modulated self-attention and SwiGLU, gated residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, rope):
        mods = self.modulation(c).chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        if self._regions():
            qkv = self._qkv(x, self.norm1, mods, self.attn.qkv)
            attn = selective_region(self.attn.attend, qkv, rope)
            return self._after_attention(x, mods, attn, self.norm2, self.mlp)
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope))
        x = torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class MMDiTBlock(_PatchBlock):
    """Patch-level text-to-image block: separate image/text weights, one joint attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.img_norm1 = RMSNorm(dim)
        self.txt_norm1 = RMSNorm(dim)
        self.attn = JointAttention(dim, heads)
        self.img_norm2 = RMSNorm(dim)
        self.txt_norm2 = RMSNorm(dim)
        self.img_mlp = SwiGLU(dim, mlp_ratio)
        self.txt_mlp = SwiGLU(dim, mlp_ratio)
        self.img_modulation = nn.Linear(dim, 6 * dim)
        self.txt_modulation = nn.Linear(dim, 6 * dim)

    def forward(self, img, txt, c, img_rope, txt_rope=None, attn_mask=None):
        i_mods = self.img_modulation(c).chunk(6, dim=-1)
        t_mods = self.txt_modulation(c).chunk(6, dim=-1)
        if self._regions():
            qkv_i = self._qkv(img, self.img_norm1, i_mods, self.attn.img_qkv)
            qkv_t = self._qkv(txt, self.txt_norm1, t_mods, self.attn.txt_qkv)
            img_attn, txt_attn = selective_region(self.attn.attend, qkv_i, qkv_t, img_rope, txt_rope, attn_mask)
            img = self._after_attention(img, i_mods, img_attn, self.img_norm2, self.img_mlp)
            txt = self._after_attention(txt, t_mods, txt_attn, self.txt_norm2, self.txt_mlp)
            return img, txt
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = i_mods
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = t_mods
        img_attn, txt_attn = self.attn(
            modulate(self.img_norm1(img), i_shift1, i_scale1),
            modulate(self.txt_norm1(txt), t_shift1, t_scale1),
            img_rope, txt_rope, attn_mask,
        )
        img = torch.addcmul(img, i_gate1, img_attn)
        txt = torch.addcmul(txt, t_gate1, txt_attn)
        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2)))
        return img, txt


class PixelTokenEmbedder(nn.Module):
    """Each pixel → a D_pix token (linear + fixed 2D sin-cos position), grouped patch by patch.

    Output [B·L, p², D_pix] where L = (H/p)·(W/p) patches in row-major order and pixels row-major inside
    each patch.
    """

    def __init__(self, in_channels: int, dim: int, use_abs_pos: bool = True):
        super().__init__()
        self.dim = dim
        self.use_abs_pos = use_abs_pos
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x: torch.Tensor, patch: int) -> torch.Tensor:
        B, _, H, W = x.shape
        tok = self.proj(x.permute(0, 2, 3, 1))  # [B, H, W, D]
        if self.use_abs_pos:
            tok = tok + sincos_2d(self.dim, H, W, x.device, tok.dtype)
        hp, wp = H // patch, W // patch
        tok = tok.view(B, hp, patch, wp, patch, self.dim).transpose(2, 3)
        return tok.reshape(B * hp * wp, patch * patch, self.dim)


class PiTBlock(_RecomputingBlock):
    """Pixel Transformer block.

    - Pixel-wise AdaLN: the patch condition s [B·L, D] is mapped to p²·6·D_pix values, i.e. a distinct
      shift/scale/gate for every pixel of the patch (Φ: D → p²·6·D_pix).
    - Pixel token compaction: the p² pixel tokens of a patch are flattened (p²·D_pix) and linearly
      compacted to the attention width, attention runs across the L patches, and the result is expanded back.
    - A GELU MLP acts on each pixel token.

    The six p²·D_pix modulations are computed one at a time, right where they are used, from a chunk-major
    view of Φ's weights (layout on disk unchanged): the [B·L, p², 6·D_pix] tensor never exists, shifts die
    as soon as they are added, and only scales and gates stay alive for backward. The "+1" of each scale
    is folded into its bias.

    Shift fold: the first shift only ever reaches the compaction linear, so
    compact(n·scale1 + shift1) = W_c·(n·scale1) + (W_c·W_shift1)·s + (W_c·b_shift1 + b_c): the
    [B·L, p²·D_pix] shift is replaced by a [D_attn, D] product of weights, an exact rewrite (up to float
    rounding order). It is taken when it executes fewer FLOPs (training batches; not small sampling batches)
    and when `fold_shift` is on; FLOP counts of the nominal architecture switch it off
    (`PixelDiT.nominal_flops`).

    Where models.fused applies (eager CPU, `fused` on), norm1 ⊙ scale1 (+ shift1) and the gated attention
    residual + pixel MLP run as chunked fused ops with hand-written backwards; elsewhere, op by op.
    """

    fold_shift = True
    fused = True  # per-pixel sub-blocks through models.fused where it applies (eager CPU, float32 or bf16)

    def __init__(self, pixel_dim: int, cond_dim: int, patch: int, attn_dim: int, attn_heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.pixel_dim = pixel_dim
        self.patch = patch
        self.attn_dim = attn_dim
        p2 = patch * patch
        self.modulation = nn.Linear(cond_dim, 6 * p2 * pixel_dim)
        self.norm1 = RMSNorm(pixel_dim)
        self.compact = nn.Linear(p2 * pixel_dim, attn_dim)
        self.attn = Attention(attn_dim, attn_heads)
        self.expand = nn.Linear(attn_dim, p2 * pixel_dim)
        self.norm2 = RMSNorm(pixel_dim)
        self.mlp = GeluMLP(pixel_dim, mlp_ratio)

    def _chunk_major_modulation(self):
        """Φ's weight [p²·6·D_pix, D] and bias regrouped as six [p²·D_pix, D] / [p²·D_pix] pieces:
        shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2."""
        P2, D = self.patch * self.patch, self.pixel_dim
        if torch.compiler.is_compiling():
            w = self.modulation.weight.view(P2, 6, D, -1).transpose(0, 1).reshape(6, P2 * D, -1).unbind(0)
        else:  # one gathering copy per piece, cast to the autocast dtype on the way, one copy back in backward
            w = chunk_major(self.modulation.weight, P2, 6)
        b = self.modulation.bias.view(P2, 6, D).transpose(0, 1).reshape(6, P2 * D)
        b = b + b.new_tensor([0, 1, 0, 0, 1, 0])[:, None]
        return w, b.unbind(0)

    def shift_fold_pays(self, tokens: int) -> bool:
        """Whether folding shift1 into the compaction executes fewer FLOPs for `tokens` = B·L patch tokens:
        B·L·D·p²D_pix (the shift) > D_attn·p²D_pix·D (W_c·W_shift1) + B·L·D·D_attn (its product with s)."""
        cond_dim = self.modulation.in_features
        pix = self.compact.in_features
        return tokens * cond_dim * pix > self.attn_dim * pix * cond_dim + tokens * cond_dim * self.attn_dim

    def forward(self, x, s_cond, batch: int, rope):
        fused = self.fused and fused_applies(x)
        if self._regions() and not fused:  # op by op: the dispatch-mode policy over the whole block
            return selective_region(self._forward, x, s_cond, batch, rope, False, False)
        return self._forward(x, s_cond, batch, rope, fused, self._regions())

    def _forward(self, x, s_cond, batch: int, rope, fused: bool, regions: bool):
        """`regions`: `selective` from the structure (fused path only): the fused norm ⊙ scale feeding the
        compaction is recomputed in backward, the attention core runs under the dispatch-mode policy."""
        BL, P2, D = x.shape
        w, b = self._chunk_major_modulation()
        # where the fused kernels add the modulation biases themselves (native kernels), the modulation GEMMs
        # run without them: no bias broadcast per GEMM, no separate bias-gradient reductions
        fold_bias = fused and folds_bias(self.norm1)

        def modulation(k, bias=True):
            return F.linear(s_cond, w[k], b[k] if bias else None).view(BL, P2, D)

        def fused_mod(k):
            return modulation(k, bias=not fold_bias)

        def fused_bias(k):
            return b[k] if fold_bias else None

        fold = self.fold_shift and self.shift_fold_pays(BL)
        wc = self.compact.weight
        if fold:
            shift_term = F.linear(s_cond, wc @ w[0], torch.addmv(self.compact.bias, wc, b[0]))
        if regions:  # the compaction's input u = norm1(x) ⊙ scale1 (+ shift1) is not kept
            shape = (BL, P2 * D) if fold else (batch, BL // batch, P2 * D)
            shift1, add = (None, shift_term) if fold else (modulation(0), self.compact.bias)
            (h,) = linears_of_recomputed(partial(_pixel_norm_scale, eps=self.norm1.eps, shape=shape),
                                         (x, fused_mod(1), self.norm1.weight, shift1, fused_bias(1)), [wc], [add])
            h = h.view(batch, BL // batch, -1)
        elif fold:
            h = norm_scale(x, fused_mod(1), self.norm1, scale_bias=fused_bias(1)) if fused \
                else self.norm1(x) * modulation(1)
            h = torch.addmm(shift_term, h.view(BL, P2 * D), wc.t()).view(batch, BL // batch, -1)
        else:
            shift1 = modulation(0)
            h = norm_scale(x, fused_mod(1), self.norm1, shift1, scale_bias=fused_bias(1)) if fused \
                else torch.addcmul(shift1, self.norm1(x), modulation(1))
            h = self.compact(h.reshape(batch, BL // batch, P2 * D))
        h = selective_region(self.attn.attend, self.attn.qkv(h), rope) if regions else self.attn(h, rope)
        h = self.expand(h).view(BL, P2, D)
        if fused:  # x + gate1 ⊙ h and the pixel MLP sub-block in one pass
            return pixel_mlp_residual(x, fused_mod(3), fused_mod(4), fused_mod(5), self.norm2, self.mlp,
                                      attn=h, gate1=fused_mod(2), biases=[fused_bias(k) for k in (2, 3, 4, 5)])
        x = torch.addcmul(x, modulation(2), h)
        h = torch.addcmul(modulation(3), self.norm2(x), modulation(4))
        return torch.addcmul(x, modulation(5), self.mlp(h))


class FinalLayer(nn.Module):
    fused = True  # norm + linear in one chunked pass where models.fused applies

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x):
        if self.fused and fused_applies(x):
            return norm_linear(x, self.norm, self.linear)
        return self.linear(self.norm(x))
