"""Fused per-pixel sub-blocks of the PiT block, chunked, with hand-written backwards.

    u   = rmsnorm₁(x)·w₁ ⊙ scale₁ [+ shift₁]                             (input of the compaction linear)
    out = y + gate₂ ⊙ fc2(gelu(fc1(rmsnorm₂(y)·w₂ ⊙ scale₂ + shift₂))),   y = x + gate₁ ⊙ h
                                                                          (h: the expanded attention output)
    v   = linear(rmsnorm(x)·w)                                            (the final layer, D_pix → 3)
per pixel token, D_pix channels. Done op by op, these run a few dozen passes over [B·L·p², D_pix] and
[B·L·p², 4·D_pix] tensors in main memory (under bf16 autocast, casts to and from float32 besides), and the
MLP's matmuls contract only D_pix = 16 channels, so the work is bound by memory traffic, not arithmetic.
Here the pixel rows are processed in chunks that stay in the CPU's cache, spread over the intra-op threads
(`_for_chunks`). Backward recomputes a chunk's MLP (cheap: 2·D_pix·4·D_pix multiply-adds per pixel) instead
of saving its 4·D_pix-wide hidden activations, and the normalised values from x and one RMS statistic per
pixel.

Same mathematics as the op-by-op path (models.blocks.PiTBlock with `fused` off); only the order of float
sums differs (the parameter-gradient reductions run chunk by chunk). CPU only, float32 or bfloat16 autocast
(fused_applies); in bfloat16 the rounding points are those of the op-by-op path under autocast: the RMS
statistics and the modulated values run in float32, the normalised value, the modulated value and every
activation are rounded to bfloat16 where the op-by-op path rounds them; parameter gradients accumulate in
float32.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as _ckpt
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode_temporarily

from . import native

# None: the native kernels (models.native) where they load, else the Python chunk loops; False: always the loops
NATIVE: bool | None = None

# Pixel rows per chunk: the 4·D_pix-wide hidden activation of a chunk (4096 × 64 × 4 bytes) stays in a 1 MB L2
# (one core, forward + backward of 262144 rows: 0.13 s in 4096-row chunks, 0.18 s in 1024, 0.15 s in 32768).
CHUNK_ROWS = 4096


def _chunks(n: int, start: int = 0):
    for i in range(start, n, CHUNK_ROWS):
        yield i, min(i + CHUNK_ROWS, n)


_POOL: tuple[ThreadPoolExecutor, int] | None = None  # (helper threads, their number)
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least `workers` helper threads (grown, never shrunk)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] < workers:
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            _POOL = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pixdit-fused"), workers)
        return _POOL[0]


_SAC_MODES = (_ckpt._CachingTorchDispatchMode, _ckpt._CachedTorchDispatchMode)

def _moded(but_checkpointing: bool = False) -> bool:
    """A dispatch or function mode is active (fake tensors for memory plans, tracing, device contexts);
    `but_checkpointing`: not counting selective checkpointing's modes."""
    stack = _get_current_dispatch_mode_stack()
    if but_checkpointing:
        stack = [m for m in stack if not isinstance(m, _SAC_MODES)]
    return bool(stack) or torch._C._len_torch_function_stack() > 0


def _use_native(*params) -> bool:
    """Whether this call runs the native kernels: enabled, outside any mode (they have no fake or traced
    form), float32 parameters, and the library loads (built on first use)."""
    return NATIVE is not False and not _moded(but_checkpointing=True) \
        and all(p.dtype == torch.float32 for p in params) and native.load()


def _rows(t, D, dtype):
    return t.reshape(-1, D).to(dtype).contiguous()


def _for_chunks(n: int, body, accumulators=()):
    """body(i, j, accs) for every chunk of rows [i, j) of n, where accs are float32 zeros shaped like
    `accumulators` (parameter-gradient sums); returns those sums over all chunks.

    With T > 1 intra-op threads (torch.get_num_threads) and at least T chunks, the chunks are split into T
    contiguous ranges run by T Python threads at one intra-op thread each: a chunk's ops are too small for
    intra-op threading to pay (the op-by-op parallelism leaves most of a second core idle), and ATen releases
    the GIL inside each op. Each range has its own accumulators, summed at the end."""
    def zeros():
        return [torch.zeros(a.shape, dtype=torch.float32, device=a.device) for a in accumulators]

    threads = torch.get_num_threads()
    n_chunks = -(-n // CHUNK_ROWS)
    # dispatch and function modes (fake tensors for memory plans, tracing, device contexts) are per thread:
    # under one, stay on this thread
    moded = _moded()
    workers = 1 if moded else min(threads, n_chunks)
    per = -(-n_chunks // max(workers, 1)) * CHUNK_ROWS
    ranges = [(a, min(a + per, n)) for a in range(0, n, per)] or [(0, 0)]
    parts = [zeros() for _ in ranges]

    inference = torch.is_inference_mode_enabled()  # writes into inference tensors need inference mode

    def run(k):
        a, b = ranges[k]
        # worker threads start with the default grad, inference and autocast states
        with torch.inference_mode() if inference else torch.no_grad(), torch.autocast("cpu", enabled=False):
            for i, j in _chunks(b, a):
                body(i, j, parts[k])

    if len(ranges) == 1:  # one thread: the serial loop, in the caller's states
        for i, j in _chunks(n):
            body(i, j, parts[0])
        return parts[0]
    torch.set_num_threads(1)
    try:
        pool = _pool(len(ranges) - 1)
        futures = [pool.submit(run, k) for k in range(1, len(ranges))]
        run(0)
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(threads)
    totals = parts[0]
    for part in parts[1:]:
        totals = [a + b for a, b in zip(totals, part)]
    return totals



def _opaque_to_selective_checkpointing():
    """Run a fused forward's chunk loop outside selective checkpointing's dispatch mode when that mode is
    innermost: every op inside is one the policy recomputes anyway (reductions of D_pix or 4·D_pix channels),
    so nothing changes but the mode's per-op Python call on hundreds of small chunk ops (in the first forward
    and again in the recomputation)."""
    stack = _get_current_dispatch_mode_stack()
    if stack and isinstance(stack[-1], _SAC_MODES):
        return _pop_mode_temporarily()
    return contextlib.nullcontext()


def _norm_forward(xc, rstd_out, norm_w, eps, cd):
    """rmsnorm(x)·w for a chunk, float32, with the normalised value rounded to `cd` as RMSNorm does (one fused
    kernel: statistics in float32, x·rstd rounded to x's dtype); the chunk's rstd goes to rstd_out."""
    xh, r = torch.ops.aten._fused_rms_norm(xc, [xc.shape[-1]], None, eps)
    rstd_out.copy_(r)
    return xh.to(cd).float().mul_(norm_w)


def _normalized(xc, r, cd):
    """x·rstd of a chunk in float32 (xh) and its value rounded to `cd` as the forward used it (nb)."""
    xh = xc.float() * r
    return xh, xh.to(cd).float()


def _norm_backward(xh, nb, r, dn, norm_w, dnw, cd):
    """Gradient of rmsnorm(x)·w for a chunk given x·rstd (xh, float32), its rounded value nb and dn (float32,
    w.r.t. the output): returns d x (float32) and accumulates d w into dnw."""
    dnw += (dn * nb).sum(0)
    dxh = (dn * norm_w).to(cd).float()
    proj = (dxh * xh).mean(-1, keepdim=True)
    return (dxh - xh * proj).mul_(r)


def _bias_table(biases, D, cd):
    """Modulation biases [P·D] (float32 parameters' pieces, None where absent) as the native kernels' table
    [pieces, P, D]: rounded to the compute dtype as autocast's addmm would round them, then float32. None when
    all are absent."""
    if all(b is None for b in biases):
        return None
    return torch.stack([b.detach().to(cd).float().view(-1, D) for b in biases]).contiguous()


def _bias_grads(table_grad, biases):
    """Gradients of the biases from the kernels' [pieces, P, D] sums (None where absent)."""
    if table_grad is None:
        return [None] * len(biases)
    return [None if b is None else g.reshape(b.shape).to(b.dtype) for g, b in zip(table_grad, biases)]


class _NormScale(torch.autograd.Function):
    """u = rmsnorm(x)·w ⊙ scale (+ shift) (activations in the compute dtype `cd`, u in `cd`, parameters
    float32)."""

    @staticmethod
    def forward(ctx, x, shift, scale, norm_w, eps, scale_bias=None):
        shape, D, cd = x.shape, x.shape[-1], x.dtype
        xf, sc = x.reshape(-1, D), scale.reshape(-1, D)
        sh = shift.reshape(-1, D) if shift is not None else None
        N = xf.shape[0]

        def body(i, j, _):
            n = _norm_forward(xf[i:j], rstd[i:j], norm_w, eps, cd)
            if sh is None:
                torch.mul(n, sc[i:j], out=u[i:j])
            else:
                torch.addcmul(sh[i:j].float(), n, sc[i:j], out=u[i:j])

        with torch.autocast(xf.device.type, enabled=False):
            if _use_native(norm_w):  # one op, seen by selective checkpointing (its policy recomputes it)
                xf, sc = xf.contiguous(), sc.contiguous()
                sb = _bias_table([scale_bias], D, cd)
                u, rstd = torch.ops.pixdit_fused.norm_scale_fwd(
                    xf, sh.contiguous() if sh is not None else None, sc, norm_w, eps, sb)
            else:
                assert scale_bias is None, "modulation biases are folded only into the native kernels"
                u = torch.empty_like(xf)
                rstd = torch.empty(N, 1, dtype=torch.float32, device=xf.device)
                with _opaque_to_selective_checkpointing():
                    _for_chunks(N, body)
        ctx.save_for_backward(xf, sc, rstd, norm_w, scale_bias)
        ctx.shape = shape
        return u.view(shape)

    @staticmethod
    def backward(ctx, grad_u):
        xf, sc, rstd, norm_w, scale_bias = ctx.saved_tensors
        D, cd = xf.shape[-1], xf.dtype
        dsb = None
        G = grad_u.reshape(-1, D)
        N = xf.shape[0]

        def body(i, j, accs):
            r, Gc = rstd[i:j], G[i:j].float()
            xh, nb = _normalized(xf[i:j], r, cd)
            torch.mul(Gc, nb * norm_w, out=dscale[i:j])
            dx[i:j] = _norm_backward(xh, nb, r, Gc * sc[i:j], norm_w, accs[0], cd)

        with torch.autocast(xf.device.type, enabled=False):
            if _use_native(norm_w):
                dx, dscale, dnw, dsb = torch.ops.pixdit_fused.norm_scale_bwd(
                    _rows(grad_u, D, cd), xf, sc, rstd, norm_w, _bias_table([scale_bias], D, cd))
            else:
                dx = torch.empty_like(xf)
                dscale = torch.empty_like(xf)
                (dnw,) = _for_chunks(N, body, (norm_w,))
        shape = ctx.shape
        grads = (dx.view(shape), grad_u.to(cd).view(shape), dscale.view(shape), dnw.to(norm_w.dtype), None,
                 _bias_grads(dsb, [scale_bias])[0])
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad))


class _PixelMLPResidual(torch.autograd.Function):
    """y = x + gate₁ ⊙ h, out = y + gate ⊙ mlp(rmsnorm(y)·w ⊙ scale + shift).

    Activations x, h, gate₁, shift, scale, gate in the compute dtype `cd` (float32, or bfloat16 under
    autocast); parameters in float32. The MLP input and the matmuls and GELU run in `cd`."""

    @staticmethod
    def forward(ctx, x, h, gate1, shift, scale, gate, norm_w, w1, b1, w2, b2, eps,
                bias_gate1=None, bias_shift=None, bias_scale=None, bias_gate=None):
        shape, D, cd = x.shape, x.shape[-1], x.dtype
        xf, hf, g1, sh, sc, gt = (t.reshape(-1, D) for t in (x, h, gate1, shift, scale, gate))
        N = xf.shape[0]
        def body(i, j, _):
            yc = torch.addcmul(xf[i:j], g1[i:j], hf[i:j], out=y[i:j])
            n = _norm_forward(yc, rstd[i:j], norm_w, eps, cd)
            mc = torch.addcmul(sh[i:j].float(), n, sc[i:j].float(), out=m[i:j])
            a = F.gelu(torch.addmm(b1c, mc, w1t))
            torch.addcmul(yc, gt[i:j], torch.addmm(b2c, a, w2t), out=out[i:j])

        with torch.autocast(xf.device.type, enabled=False):
            if _use_native(norm_w, w1, b1, w2, b2):  # one op, seen by selective checkpointing (policy: keep)
                xf, hf, g1, sh, sc, gt = (t.contiguous() for t in (xf, hf, g1, sh, sc, gt))
                biases = (bias_gate1, bias_shift, bias_scale, bias_gate)
                out, y, m, rstd = torch.ops.pixdit_fused.mlp_residual_fwd(xf, hf, g1, sh, sc, gt, norm_w, w1, b1,
                                                                          w2, b2, eps, _bias_table(biases, D, cd))
            else:
                assert bias_gate1 is None, "modulation biases are folded only into the native kernels"
                w1t, b1c, w2t, b2c = w1.to(cd).t(), b1.to(cd), w2.to(cd).t(), b2.to(cd)
                y = torch.empty_like(xf)
                out = torch.empty_like(xf)
                m = torch.empty_like(xf)
                rstd = torch.empty(N, 1, dtype=torch.float32, device=xf.device)
                with _opaque_to_selective_checkpointing():
                    _for_chunks(N, body)
        ctx.save_for_backward(y, sc, gt, m, rstd, norm_w, w1, b1, w2, b2, hf, g1, bias_gate1, bias_shift,
                              bias_scale, bias_gate)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        y, sc, gt, m, rstd, norm_w, w1, b1, w2, b2, hf, g1, *biases = ctx.saved_tensors
        D, cd = y.shape[-1], y.dtype
        dmb = None
        G = grad_out.reshape(-1, D)
        N = y.shape[0]

        def body(i, j, accs):
            dnw, dw1, db1, dw2, db2 = accs
            yc, r, mc, Gc = y[i:j], rstd[i:j], m[i:j], G[i:j]
            pre = torch.addmm(b1c, mc, w1t)
            act = F.gelu(pre)
            torch.mul(Gc, torch.addmm(b2c, act, w2t), out=dgate[i:j])
            dmlp = Gc * gt[i:j]
            dw2 += torch.mm(dmlp.t(), act).float()
            db2 += dmlp.float().sum(0)
            da = torch.ops.aten.gelu_backward(torch.mm(dmlp, w2c), pre)
            dw1 += torch.mm(da.t(), mc).float()
            db1 += da.float().sum(0)
            dm = torch.mm(da, w1c, out=dshift[i:j]).float()
            xh, nb = _normalized(yc, r, cd)
            torch.mul(dm * nb, norm_w, out=dscale[i:j])
            dyc = torch.add(Gc.float(), _norm_backward(xh, nb, r, dm * sc[i:j].float(), norm_w, dnw, cd),
                            out=dy[i:j])
            torch.mul(dyc, hf[i:j], out=dgate1[i:j])
            torch.mul(dyc, g1[i:j], out=dh[i:j])

        with torch.autocast(y.device.type, enabled=False):
            if _use_native(norm_w, w1, b1, w2, b2):
                dy, dh, dgate1, dshift, dscale, dgate, dnw, dw1, db1, dw2, db2, dmb = \
                    torch.ops.pixdit_fused.mlp_residual_bwd(_rows(grad_out, D, cd), y, sc, gt, m, rstd, norm_w,
                                                            w1, b1, w2, b2, hf, g1, _bias_table(biases, D, cd))
            else:
                dy = torch.empty_like(y)
                dshift = torch.empty_like(y)
                dscale = torch.empty_like(y)
                dgate = torch.empty_like(y)
                dh, dgate1 = torch.empty_like(y), torch.empty_like(y)
                w1c, b1c, w2c, b2c = w1.to(cd), b1.to(cd), w2.to(cd), b2.to(cd)
                w1t, w2t = w1c.t(), w2c.t()
                dnw, dw1, db1, dw2, db2 = _for_chunks(N, body, (norm_w, w1, b1, w2, b2))
        shape = ctx.shape
        grads = [dy.view(shape), dh.view(shape), dgate1.view(shape), dshift.view(shape), dscale.view(shape), dgate.view(shape),
                 dnw.to(norm_w.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype), None,
                 *_bias_grads(dmb, biases)]
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad))


class _NormLinear(torch.autograd.Function):
    """out = linear(rmsnorm(x)·w) for a narrow linear (the final layer: D_pix → 3 channels); the normalised
    input is rounded to `cd` before the linear, as autocast does."""

    @staticmethod
    def forward(ctx, x, norm_w, weight, bias, eps):
        D, cd = x.shape[-1], x.dtype
        xf = x.reshape(-1, D)
        N = xf.shape[0]
        def body(i, j, _):
            n = _norm_forward(xf[i:j], rstd[i:j], norm_w, eps, cd)
            torch.addmm(bc, n.to(cd), wt, out=out[i:j])

        with torch.autocast(xf.device.type, enabled=False):
            if _use_native(norm_w, weight, bias):
                xf = xf.contiguous()
                out, rstd = torch.ops.pixdit_fused.norm_linear_fwd(xf, norm_w, weight.contiguous(), bias, eps)
            else:
                out = torch.empty(N, weight.shape[0], dtype=cd, device=x.device)
                wt, bc = weight.to(cd).t(), bias.to(cd)
                rstd = torch.empty(N, 1, dtype=torch.float32, device=xf.device)
                with _opaque_to_selective_checkpointing():
                    _for_chunks(N, body)
        ctx.save_for_backward(xf, rstd, norm_w, weight, bias)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        xf, rstd, norm_w, weight, bias = ctx.saved_tensors
        D, cd = xf.shape[-1], xf.dtype
        G = grad_out.reshape(-1, weight.shape[0])
        N = xf.shape[0]

        def body(i, j, accs):
            dnw, dw, db = accs
            r, Gc = rstd[i:j], G[i:j]
            xh, nb = _normalized(xf[i:j], r, cd)
            dw += torch.mm(Gc.t(), (nb * norm_w).to(cd)).float()
            db += Gc.float().sum(0)
            dx[i:j] = _norm_backward(xh, nb, r, torch.mm(Gc, wc).float(), norm_w, dnw, cd)

        with torch.autocast(xf.device.type, enabled=False):
            if _use_native(norm_w, weight, bias):
                dx, dnw, dw, db = torch.ops.pixdit_fused.norm_linear_bwd(
                    _rows(grad_out, weight.shape[0], cd), xf, rstd, norm_w, weight.contiguous())
            else:
                dx = torch.empty_like(xf)
                wc = weight.to(cd)
                dnw, dw, db = _for_chunks(N, body, (norm_w, weight, bias))
        grads = (dx.view(ctx.shape), dnw.to(norm_w.dtype), dw.to(weight.dtype), db.to(bias.dtype), None)
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad))


class _ChunkMajor(torch.autograd.Function):
    """The `pieces` row blocks of a weight viewed as [groups, pieces, rows, cols], each gathered into its own
    contiguous [groups·rows, cols] matrix in `dtype` (a cast to the autocast dtype happens in the same copy).
    Backward writes each piece's gradient straight into its place in the weight's gradient."""

    @staticmethod
    def forward(ctx, weight, groups, pieces, dtype):
        wv = weight.view(groups, pieces, -1, weight.shape[-1])
        ctx.shape, ctx.groups, ctx.pieces = weight.shape, groups, pieces
        ctx.like = dict(dtype=weight.dtype, device=weight.device)
        # one out-of-place op per piece (a cast, or a clone without autocast): selective checkpointing sees a
        # copy of a parameter (models.wrapping keeps the casts rather than redoing them)
        out = []
        for k in range(pieces):
            piece = wv[:, k]
            w = piece.contiguous() if dtype == weight.dtype else \
                piece.to(dtype=dtype, memory_format=torch.contiguous_format)
            out.append(w.view(-1, weight.shape[-1]))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.empty(ctx.shape, **ctx.like)
        gv = g.view(ctx.groups, ctx.pieces, -1, ctx.shape[-1])
        for k, gk in enumerate(grads):
            if gk is None:
                gv[:, k].zero_()
            else:
                gv[:, k].copy_(gk.view(ctx.groups, -1, ctx.shape[-1]))
        return g, None, None, None


def chunk_major(weight, groups: int, pieces: int):
    """The row blocks k of `weight` viewed as [groups, pieces, rows, cols] as `pieces` contiguous matrices
    [groups·rows, cols], already in the autocast dtype where autocast is on (see _ChunkMajor)."""
    dev = weight.device.type
    autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else weight.dtype
    return _ChunkMajor.apply(weight, groups, pieces, dtype)


def fused_applies(x: torch.Tensor) -> bool:
    """The fused path runs eagerly on CPU for float32 activations without autocast or bfloat16 activations
    under bfloat16 autocast. Its chunks are sized for a CPU cache; on GPUs, and under torch.compile
    (inductor fuses the op-by-op path itself), the op-by-op path runs."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return x.dtype == torch.bfloat16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.float32


def _with_bias(mod, bias):
    """mod + bias for a modulation [..., P, D] computed without its bias [P·D] (op by op, in mod's dtype)."""
    return mod if bias is None else mod + bias.view(mod.shape[-2:]).to(mod.dtype)


def folds_bias(norm) -> bool:
    """Whether the fused ops take modulation biases apart (the native kernels add them in their own pass: no
    bias broadcast in the modulation GEMMs, no separate bias-gradient reductions)."""
    return _use_native(norm.weight)


def norm_scale(x, scale, norm, shift=None, scale_bias=None):
    """norm(x) ⊙ (scale + scale_bias) (+ shift) for a PiT block's `norm` (RMSNorm), in x's dtype; `scale`
    [..., P, D] may come without its bias [P·D] (see folds_bias)."""
    return norm_scale_w(x, scale, norm.weight, norm.eps, shift, scale_bias)


def norm_scale_w(x, scale, norm_w, eps, shift=None, scale_bias=None):
    """norm_scale with the norm's gain `norm_w` and `eps` given apart."""
    if scale_bias is not None and not _use_native(norm_w):
        scale, scale_bias = _with_bias(scale, scale_bias), None
    return _NormScale.apply(x, shift, scale, norm_w, eps, scale_bias)


def norm_linear(x, norm, linear):
    """linear(norm(x)) for an RMSNorm `norm` and a narrow nn.Linear `linear`, in x's dtype."""
    return _NormLinear.apply(x, norm.weight, linear.weight, linear.bias, norm.eps)


def pixel_mlp_residual(x, shift, scale, gate, norm, mlp, attn, gate1, biases=None):
    """y + gate ⊙ mlp(norm(y) ⊙ scale + shift) for a PiT block's `norm` (RMSNorm) and `mlp` (GeluMLP), where
    y = x + gate1 ⊙ attn (the gated attention residual). `biases`: (gate1, shift, scale, gate) biases [P·D]
    when those modulations come without them (see folds_bias)."""
    biases = tuple(biases) if biases is not None else (None,) * 4
    if any(b is not None for b in biases) and not folds_bias(norm):
        gate1, shift, scale, gate = (_with_bias(t, b) for t, b in zip((gate1, shift, scale, gate), biases))
        biases = (None,) * 4
    return _PixelMLPResidual.apply(x, attn, gate1, shift, scale, gate, norm.weight, mlp.fc1.weight,
                                   mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, norm.eps, *biases)
