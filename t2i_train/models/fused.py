"""Fused pixel-level MLP sub-block of the PiT block, with a hand-written backward.

    out = x + gate ⊙ fc2(gelu(fc1(rmsnorm(x)·w ⊙ scale + shift)))      per pixel token, D_pix channels

Done op by op, this runs a dozen passes over [B·L·p², 4·D_pix] and [B·L·p², D_pix] tensors in main memory,
and its matmuls contract only D_pix = 16 channels, so it is bound by memory traffic, not arithmetic. Here the
pixel rows are processed in chunks that stay in the CPU's cache; backward recomputes the chunk's MLP (cheap:
2·D_pix·4·D_pix multiply-adds per pixel) instead of saving the 4·D_pix-wide hidden activations, so it keeps
only x, scale, gate, the MLP input and one RMS statistic per pixel.

Same mathematics as the op-by-op path (models.blocks.PiTBlock with `fused_mlp` off); only the order of float
sums differs (the parameter-gradient reductions run chunk by chunk). CPU float32 only (fused_mlp_applies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Pixel rows per chunk: the 4·D_pix-wide hidden activation of a chunk (4096 × 64 × 4 bytes) stays in a 1 MB L2
# (one core, forward + backward of 262144 rows: 0.13 s in 4096-row chunks, 0.18 s in 1024, 0.15 s in 32768).
CHUNK_ROWS = 4096


class _PixelMLPResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, gate, norm_w, w1, b1, w2, b2, eps):
        shape, D = x.shape, x.shape[-1]
        xf, sh, sc, gt = (t.reshape(-1, D) for t in (x, shift, scale, gate))
        N = xf.shape[0]
        out = torch.empty_like(xf)
        h = torch.empty_like(xf)
        rstd = torch.empty(N, 1, dtype=xf.dtype, device=xf.device)
        w1t, w2t = w1.t(), w2.t()
        for i in range(0, N, CHUNK_ROWS):
            j = min(i + CHUNK_ROWS, N)
            xc = xf[i:j]
            r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True).add_(eps), out=rstd[i:j])
            n = (xc * r).mul_(norm_w)
            hc = torch.addcmul(sh[i:j], n, sc[i:j], out=h[i:j])
            a = F.gelu(torch.addmm(b1, hc, w1t))
            torch.addcmul(xc, gt[i:j], torch.addmm(b2, a, w2t), out=out[i:j])
        ctx.save_for_backward(xf, sc, gt, h, rstd, norm_w, w1, b1, w2, b2)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        xf, sc, gt, h, rstd, norm_w, w1, b1, w2, b2 = ctx.saved_tensors
        D = xf.shape[-1]
        G = grad_out.reshape(-1, D)
        N = xf.shape[0]
        need = ctx.needs_input_grad
        dx = torch.empty_like(xf)
        dshift = torch.empty_like(xf)
        dscale = torch.empty_like(xf)
        dgate = torch.empty_like(xf)
        dnw = torch.zeros_like(norm_w, dtype=torch.float32)
        dw1, db1 = torch.zeros_like(w1), torch.zeros_like(b1)
        dw2, db2 = torch.zeros_like(w2), torch.zeros_like(b2)
        w1t, w2t = w1.t(), w2.t()
        for i in range(0, N, CHUNK_ROWS):
            j = min(i + CHUNK_ROWS, N)
            xc, r, hc, scc, Gc = xf[i:j], rstd[i:j], h[i:j], sc[i:j], G[i:j]
            pre = torch.addmm(b1, hc, w1t)
            act = F.gelu(pre)
            torch.mul(Gc, torch.addmm(b2, act, w2t), out=dgate[i:j])
            dm = Gc * gt[i:j]
            dw2.addmm_(dm.t(), act)
            db2 += dm.sum(0)
            da = torch.ops.aten.gelu_backward(torch.mm(dm, w2), pre)
            dw1.addmm_(da.t(), hc)
            db1 += da.sum(0)
            dh = torch.mm(da, w1, out=dshift[i:j])
            xh = xc * r
            torch.mul(dh, xh * norm_w, out=dscale[i:j])
            dn = dh * scc
            dnw += (dn * xh).sum(0)
            dxh = dn.mul_(norm_w)
            proj = (dxh * xh).mean(-1, keepdim=True)
            torch.addcmul(Gc, dxh.sub_(xh.mul_(proj)), r, out=dx[i:j])
        shape = ctx.shape
        grads = [dx.view(shape), dshift.view(shape), dscale.view(shape), dgate.view(shape),
                 dnw.to(norm_w.dtype), dw1, db1, dw2, db2, None]
        return tuple(g if n else None for g, n in zip(grads, need))


def fused_mlp_applies(x: torch.Tensor) -> bool:
    """The fused path runs eagerly on CPU for float32 activations outside autocast. Its chunks are sized for
    a CPU cache; on GPUs, and under torch.compile (inductor fuses the op-by-op path itself), the op-by-op
    path runs."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def pixel_mlp_residual(x, shift, scale, gate, norm, mlp):
    """x + gate ⊙ mlp(norm(x) ⊙ scale + shift) for a PiT block's `norm` (RMSNorm) and `mlp` (GeluMLP)."""
    return _PixelMLPResidual.apply(x, shift, scale, gate, norm.weight, mlp.fc1.weight, mlp.fc1.bias,
                                   mlp.fc2.weight, mlp.fc2.bias, norm.eps)
