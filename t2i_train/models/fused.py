"""Fused pixel-level MLP sub-block of the PiT block, with a hand-written backward.

    out = x + gate ⊙ fc2(gelu(fc1(rmsnorm(x)·w ⊙ scale + shift)))      per pixel token, D_pix channels

Done op by op, this runs a dozen passes over [B·L·p², 4·D_pix] and [B·L·p², D_pix] tensors in main memory,
and its matmuls contract only D_pix = 16 channels, so it is bound by memory traffic, not arithmetic. Here the
pixel rows are processed in chunks that stay in the CPU's cache; backward recomputes the chunk's MLP (cheap:
2·D_pix·4·D_pix multiply-adds per pixel) instead of saving the 4·D_pix-wide hidden activations, so it keeps
only x, scale, gate, the MLP input and one RMS statistic per pixel.

Same mathematics as the op-by-op path (models.blocks.PiTBlock with `fused_mlp` off); only the order of float
sums differs (the parameter-gradient reductions run chunk by chunk). CPU only, float32 or bfloat16 autocast
(fused_mlp_applies); in bfloat16 the rounding points are those of the op-by-op path under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Pixel rows per chunk: the 4·D_pix-wide hidden activation of a chunk (4096 × 64 × 4 bytes) stays in a 1 MB L2
# (one core, forward + backward of 262144 rows: 0.13 s in 4096-row chunks, 0.18 s in 1024, 0.15 s in 32768).
CHUNK_ROWS = 4096


class _PixelMLPResidual(torch.autograd.Function):
    """Activations x, shift, scale, gate in the compute dtype `cd` (float32, or bfloat16 under autocast);
    parameters in float32. Rounding points follow the op-by-op path under autocast: the RMS statistics and
    the modulated input run in float32, the normalised value and the MLP input are rounded to `cd`, the
    matmuls and GELU run in `cd`; parameter gradients accumulate in float32."""

    @staticmethod
    def forward(ctx, x, shift, scale, gate, norm_w, w1, b1, w2, b2, eps):
        shape, D, cd = x.shape, x.shape[-1], x.dtype
        xf, sh, sc, gt = (t.reshape(-1, D) for t in (x, shift, scale, gate))
        N = xf.shape[0]
        out = torch.empty_like(xf)
        h = torch.empty_like(xf)
        rstd = torch.empty(N, 1, dtype=torch.float32, device=xf.device)
        w1t, b1c, w2t, b2c = w1.to(cd).t(), b1.to(cd), w2.to(cd).t(), b2.to(cd)
        with torch.autocast(xf.device.type, enabled=False):
            for i in range(0, N, CHUNK_ROWS):
                j = min(i + CHUNK_ROWS, N)
                xc = xf[i:j]
                x32 = xc.float()
                r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps), out=rstd[i:j])
                n = (x32 * r).to(cd).float().mul_(norm_w)
                h[i:j] = torch.addcmul(sh[i:j].float(), n, sc[i:j].float())
                a = F.gelu(torch.addmm(b1c, h[i:j], w1t))
                torch.addcmul(xc, gt[i:j], torch.addmm(b2c, a, w2t), out=out[i:j])
        ctx.save_for_backward(xf, sc, gt, h, rstd, norm_w, w1, b1, w2, b2)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        xf, sc, gt, h, rstd, norm_w, w1, b1, w2, b2 = ctx.saved_tensors
        D, cd = xf.shape[-1], xf.dtype
        G = grad_out.reshape(-1, D)
        N = xf.shape[0]
        need = ctx.needs_input_grad
        dx = torch.empty_like(xf)
        dshift = torch.empty_like(xf)
        dscale = torch.empty_like(xf)
        dgate = torch.empty_like(xf)
        f32 = dict(dtype=torch.float32, device=xf.device)
        dnw = torch.zeros(norm_w.shape, **f32)
        dw1, db1 = torch.zeros(w1.shape, **f32), torch.zeros(b1.shape, **f32)
        dw2, db2 = torch.zeros(w2.shape, **f32), torch.zeros(b2.shape, **f32)
        w1c, b1c, w2c, b2c = w1.to(cd), b1.to(cd), w2.to(cd), b2.to(cd)
        w1t, w2t = w1c.t(), w2c.t()
        with torch.autocast(xf.device.type, enabled=False):
            for i in range(0, N, CHUNK_ROWS):
                j = min(i + CHUNK_ROWS, N)
                xc, r, hc, Gc = xf[i:j], rstd[i:j], h[i:j], G[i:j]
                pre = torch.addmm(b1c, hc, w1t)
                act = F.gelu(pre)
                torch.mul(Gc, torch.addmm(b2c, act, w2t), out=dgate[i:j])
                dm = Gc * gt[i:j]
                dw2 += torch.mm(dm.t(), act).float()
                db2 += dm.float().sum(0)
                da = torch.ops.aten.gelu_backward(torch.mm(dm, w2c), pre)
                dw1 += torch.mm(da.t(), hc).float()
                db1 += da.float().sum(0)
                dh = torch.mm(da, w1c, out=dshift[i:j]).float()
                xh = xc.float() * r
                nb = xh.to(cd).float()
                dscale[i:j] = dh * nb * norm_w
                dn = dh * sc[i:j].float()
                dnw += (dn * nb).sum(0)
                dxh = (dn * norm_w).to(cd).float()
                proj = (dxh * xh).mean(-1, keepdim=True)
                dx[i:j] = torch.addcmul(Gc.float(), dxh - xh * proj, r)
        shape = ctx.shape
        grads = [dx.view(shape), dshift.view(shape), dscale.view(shape), dgate.view(shape),
                 dnw.to(norm_w.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype), None]
        return tuple(g if n else None for g, n in zip(grads, need))


def fused_mlp_applies(x: torch.Tensor) -> bool:
    """The fused path runs eagerly on CPU for float32 activations without autocast or bfloat16 activations
    under bfloat16 autocast. Its chunks are sized for a CPU cache; on GPUs, and under torch.compile
    (inductor fuses the op-by-op path itself), the op-by-op path runs."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return x.dtype == torch.bfloat16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.float32


def pixel_mlp_residual(x, shift, scale, gate, norm, mlp):
    """x + gate ⊙ mlp(norm(x) ⊙ scale + shift) for a PiT block's `norm` (RMSNorm) and `mlp` (GeluMLP)."""
    return _PixelMLPResidual.apply(x, shift, scale, gate, norm.weight, mlp.fc1.weight, mlp.fc1.bias,
                                   mlp.fc2.weight, mlp.fc2.bias, norm.eps)
