"""Small building blocks of PixelDiT: norms, positional encodings, attention, MLPs, conditioning.

Everything numerically delicate (RMS statistics, rotary embeddings) runs in float32 even under bf16
autocast; results are cast back to the activation dtype.
"""
from __future__ import annotations

import math
from functools import lru_cache, wraps

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes


def _constant_table(fn):
    """Memoise a table builder; tables are built outside any dispatch mode (fake or meta tensors, memory
    trackers), so the cache only ever holds real CPU tensors."""
    cached = lru_cache(maxsize=64)(fn)

    @wraps(fn)
    def build(*args):
        with _disable_current_modes():
            return cached(*args)

    return build


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain (statistics in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's forward as a function (statistics in float32, result in x's dtype)."""
    if x.dtype == torch.float32:  # one fused pass; same result as normalising, then scaling
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x·(1 + scale) + shift."""
    return torch.addcmul(shift, x, 1 + scale)


# --------------------------------------------------------------------------------------------------
# Positional encodings
# --------------------------------------------------------------------------------------------------

@_constant_table
def _rope_2d_cached(head_dim: int, grid_h: int, grid_w: int, theta: float, extent: float) -> torch.Tensor:
    # Positions span [0, extent] whatever the grid size (resolution-independent), as in the release.
    xs = torch.linspace(0, extent, grid_w)
    ys = torch.linspace(0, extent, grid_h)
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    ang_x = torch.outer(xs.reshape(-1), freqs)
    ang_y = torch.outer(ys.reshape(-1), freqs)
    # Complex pairs alternate x-frequency, y-frequency: [N, head_dim/4, 2] -> [N, head_dim/2].
    ang = torch.stack([ang_x, ang_y], dim=-1).reshape(grid_h * grid_w, -1)
    return torch.polar(torch.ones_like(ang), ang)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, device, theta: float = 10000.0,
            extent: float = 16.0) -> torch.Tensor:
    """Complex rotary factors [grid_h·grid_w, head_dim/2] for a row-major patch grid."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    return _rope_2d_cached(head_dim, grid_h, grid_w, float(theta), float(extent)).to(device)


@_constant_table
def _rope_1d_cached(head_dim: int, length: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.outer(torch.arange(length).float(), freqs)
    return torch.polar(torch.ones_like(ang), ang)


def rope_1d(head_dim: int, length: int, device, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotary factors [length, head_dim/2] for a token sequence."""
    return _rope_1d_cached(head_dim, length, float(theta)).to(device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, N, ..., head_dim] (e.g. [B, N, heads, head_dim]) by
    freqs [N, head_dim/2] (in float32)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs.view(freqs.shape[0], *([1] * (x.dim() - 3)), -1)).flatten(-2)
    return out.type_as(x)


@_constant_table
def _sincos_2d_cached(dim: int, height: int, width: int) -> torch.Tensor:
    # First half of the channels encodes the column (x), the second half the row (y);
    # each half is [sin | cos] of positions times 1/10000^(k/(dim/4)). Float64 like the release.
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    ax = torch.outer(xs.reshape(-1), omega)
    ay = torch.outer(ys.reshape(-1), omega)
    emb = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    return emb.float().reshape(height, width, dim)


def sincos_2d(dim: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """Fixed 2D sin-cos embedding [height, width, dim] of every pixel position."""
    if dim % 4:
        raise ValueError(f"pixel sin-cos embedding needs a width divisible by 4, got {dim}")
    return _sincos_2d_cached(dim, height, width).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

def _head_dim(dim: int, heads: int) -> int:
    if dim % heads:
        raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
    return dim // heads


def qk_norm(qk: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm) -> torch.Tensor:
    """q_norm(q) and k_norm(k) for qk [..., 2, heads, head_dim] (q, then k) in one pass: element for element
    the ops of the two RMSNorm calls, half as many dispatches (each one costs under selective checkpointing)."""
    if q_norm.eps != k_norm.eps:
        return torch.stack([q_norm(qk[..., 0, :, :]), k_norm(qk[..., 1, :, :])], dim=-3)
    w = torch.stack([q_norm.weight, k_norm.weight])[:, None, :]  # [2, 1, head_dim]
    if qk.dtype == torch.float32:
        return F.rms_norm(qk, (qk.shape[-1],), eps=q_norm.eps) * w
    return w * F.rms_norm(qk.float(), (qk.shape[-1],), eps=q_norm.eps).to(qk.dtype)


class Attention(nn.Module):
    """Self-attention with QK-RMSNorm and rotary positions, through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, _head_dim(dim, heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x), rope)

    def attend(self, qkv: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Everything after the qkv projection: qkv [B, N, 3·C] → projected attention output [B, N, C]."""
        B, N, C3 = qkv.shape
        qkv = qkv.view(B, N, 3, self.heads, self.head_dim)
        qk = apply_rope(qk_norm(qkv[:, :, :2], self.q_norm, self.k_norm), rope)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, qkv[:, :, 2].transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(B, N, C3 // 3))


def joint_attention_mask(key_mask: torch.Tensor | None, n_img: int) -> torch.Tensor | None:
    """SDPA mask [B, 1, 1, L_txt + n_img] for the joint sequence (text first) from a text key mask [B, L_txt]
    (True = real token); built once per forward and shared by every block."""
    if key_mask is None:
        return None
    keep = torch.cat([key_mask.bool(), key_mask.new_ones(key_mask.shape[0], n_img, dtype=torch.bool)], dim=1)
    return keep[:, None, None, :]


class JointAttention(nn.Module):
    """MM-DiT attention: separate projections for image and text tokens, one attention over both.

    Text tokens come first in the joint sequence. `attn_mask` (see `joint_attention_mask`) hides padded
    text tokens from every query.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, _head_dim(dim, heads)
        self.img_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.txt_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.img_q_norm = RMSNorm(self.head_dim)
        self.img_k_norm = RMSNorm(self.head_dim)
        self.txt_q_norm = RMSNorm(self.head_dim)
        self.txt_k_norm = RMSNorm(self.head_dim)
        self.img_proj = nn.Linear(dim, dim)
        self.txt_proj = nn.Linear(dim, dim)

    def forward(self, img, txt, img_rope, txt_rope=None, attn_mask=None):
        return self.attend(self.img_qkv(img), self.txt_qkv(txt), img_rope, txt_rope, attn_mask)

    def attend(self, qkv_i, qkv_t, img_rope, txt_rope=None, attn_mask=None):
        """Everything after the qkv projections: image and text qkv [B, N, 3·C] → projected attention outputs
        [B, N, C] of both streams."""
        B, Ni, C3 = qkv_i.shape
        Nt, C = qkv_t.shape[1], C3 // 3
        qkv_i = qkv_i.view(B, Ni, 3, self.heads, self.head_dim)
        qkv_t = qkv_t.view(B, Nt, 3, self.heads, self.head_dim)
        qk_i = apply_rope(qk_norm(qkv_i[:, :, :2], self.img_q_norm, self.img_k_norm), img_rope)
        qk_t = qk_norm(qkv_t[:, :, :2], self.txt_q_norm, self.txt_k_norm)
        if txt_rope is not None:
            qk_t = apply_rope(qk_t, txt_rope)
        qk = torch.cat([qk_t, qk_i], dim=1)  # [B, Nt + Ni, 2, heads, head_dim]
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
        v = torch.cat([qkv_t[:, :, 2], qkv_i[:, :, 2]], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2)
        return self.img_proj(out[:, Nt:].reshape(B, Ni, C)), self.txt_proj(out[:, :Nt].reshape(B, Nt, C))


# --------------------------------------------------------------------------------------------------
# MLPs and conditioning
# --------------------------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """SwiGLU MLP; the hidden width is 2/3 of dim·mlp_ratio (so the cost matches a 4× GELU MLP)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """[cos | sin] frequency features of t (max period 10, as released) followed by a 2-layer SiLU MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))
