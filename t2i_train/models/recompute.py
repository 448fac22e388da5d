"""Selective activation checkpointing built into the blocks, without a dispatch mode.

`torch.utils.checkpoint`'s selective mode decides op by op inside a Python `TorchDispatchMode` and re-runs the
block's Python in backward. On an MM-DiT block that is ~170 ops through Python twice per step, and on CPU the
mode costs ~40 µs per op for patch-sized tensors: more than the recomputed arithmetic itself. Eager blocks
therefore build the same policy from their structure:

- `linears_of_recomputed(prologue, inputs, weights, adds)`: y_k = prologue(*inputs) @ W_kᵀ (+ add_k). The
  prologue is elementwise work (norm and modulation, a residual sum, SiLU gating; in PiT blocks the fused
  norm ⊙ scale) whose output only feeds these linears. It is not kept: backward recomputes it from the inputs
  (kept anyway, or small), forms the linears' gradients by hand and backpropagates through the recomputed
  prologue. The linears' outputs are kept, as the op-by-op policy keeps matmul outputs.
- The attention core (QK norm, RoPE, concatenation, SDPA, output projection) still runs under the op-by-op
  policy (models.wrapping.selective_region), a region of a few dozen ops: it keeps the attention output and
  recomputes q and k, and leaves the choice of SDPA backend and its backward to PyTorch.

Forward values are bit-identical to the plain forward; gradients equal plain autograd's up to the order of
float sums in the matmul gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import modulate, rms_norm


def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _LinearsOfRecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prologue, n_inputs, n_weights, *tensors):
        inputs = tensors[:n_inputs]
        weights = tensors[n_inputs:n_inputs + n_weights]
        adds = tensors[n_inputs + n_weights:]
        h = prologue(*inputs)
        device_type = h.device.type
        cast = _autocast_state(device_type)

        def to_cast(t):
            return t.to(cast) if t is not None and cast is not None and t.dtype != cast else t

        # autocast's linear / addmm, spelt out: operands in the autocast dtype (the weights' copies are kept for
        # backward, as autocast's own linear keeps them), matmul in that dtype
        hc, wcs = to_cast(h), [to_cast(w) for w in weights]
        with torch.autocast(device_type, enabled=False):
            outs = tuple(F.linear(hc, wc) if add is None
                         else F.linear(hc, wc, to_cast(add)) if add.dim() == 1
                         else torch.addmm(to_cast(add), hc, wc.t())
                         for wc, add in zip(wcs, adds))
        ctx.prologue, ctx.n_inputs, ctx.cast, ctx.device_type = prologue, n_inputs, cast, device_type
        ctx.weight_dtypes = [w.dtype for w in weights]
        ctx.adds = [None if a is None else (a.dim(), a.dtype) for a in adds]
        ctx.save_for_backward(*inputs, *wcs)
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n_inputs
        saved = ctx.saved_tensors
        inputs, wcs = saved[:n], saved[n:]
        need_in = ctx.needs_input_grad[3:3 + n]
        need_w = ctx.needs_input_grad[3 + n:3 + n + len(wcs)]
        need_add = ctx.needs_input_grad[3 + n + len(wcs):]
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        hand = getattr(ctx.prologue, "recompute", None)
        h = hand(*inputs) if hand is not None else None
        recomputed = h is not None  # the prologue's own backward, no autograd graph
        if not recomputed:
            xs = [x.detach().requires_grad_(need) if x is not None and x.is_floating_point() else x
                  for x, need in zip(inputs, need_in)]
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ctx.cast or torch.bfloat16,
                                                     enabled=ctx.cast is not None):
                h = ctx.prologue(*xs)
        hc = h.detach()
        if ctx.cast is not None and hc.dtype != ctx.cast:
            hc = hc.to(ctx.cast)
        h2 = hc.reshape(-1, hc.shape[-1])
        dh, dws, dadds = None, [], []
        for wc, g, need, wdtype, add, need_a in zip(wcs, grads, need_w, ctx.weight_dtypes, ctx.adds, need_add):
            if g is None:
                dws.append(None)
                dadds.append(None)
                continue
            g2 = g.reshape(-1, g.shape[-1])
            dws.append(g2.t().mm(h2).to(wdtype) if need else None)
            if add is not None and need_a:
                dim, dtype = add
                dadds.append((g2.sum(0) if dim == 1 else g).to(dtype))
            else:
                dadds.append(None)
            if any(need_in):  # each linear's input gradient returns to h's dtype before the sum, as in autograd
                d = g2.mm(wc).view(hc.shape).to(h.dtype)
                dh = d if dh is None else dh.add_(d)
        if recomputed:
            h = hc = h2 = None  # the prologue's output is no longer needed: free it before its backward
            dxs = ctx.prologue.backward(dh, need_in) if dh is not None else [None] * n
        else:
            wanted = [x for x, need in zip(xs, need_in) if need]
            got = iter(torch.autograd.grad(h, wanted, dh, allow_unused=True) if wanted and dh is not None else ())
            dxs = [next(got, None) if need else None for need in need_in]
        return (None, None, None, *dxs, *dws, *dadds)


class NormModulate:
    """Prologue modulate(rms_norm(x₁, w), shift, scale) with x₁ = x, or x + gate ⊙ branch (`residual`), taking
    (x, w, shift, scale) or (x, gate, branch, w, shift, scale): the patch blocks' AdaLN input. Its backward is
    written out for a float32 stream and weight (a third of the passes of autograd's chain through the
    decomposed norm); other dtypes go through autograd. The recomputed output is the forward's bit for bit."""

    def __init__(self, eps: float, residual: bool):
        self.eps, self.residual = eps, residual

    def _split(self, inputs):
        if self.residual:
            return inputs
        x, w, shift, scale = inputs
        return x, None, None, w, shift, scale

    def __call__(self, *inputs):
        x, gate, branch, w, shift, scale = self._split(inputs)
        if gate is not None:
            x = torch.addcmul(x, gate, branch)
        return modulate(rms_norm(x, w, self.eps), shift, scale)

    def recompute(self, *inputs):
        """The output again (None where the written-out backward does not apply); keeps what `backward` needs."""
        x, gate, branch, w, shift, scale = self._split(inputs)
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            return None
        x1 = torch.addcmul(x, gate, branch) if gate is not None else x
        n, rstd = torch.ops.aten._fused_rms_norm(x1, [x1.shape[-1]], w, self.eps)  # = F.rms_norm's output
        s1 = 1 + scale
        self._state = [x1, n, rstd, gate, branch, w, shift, scale, s1]
        return torch.addcmul(shift, n, s1)

    def backward(self, dh, needs):
        """Gradients of the inputs from dh (float32, consumed: reused as workspace). Temporaries die early:
        besides the inputs, at most four stream-sized float32 tensors are alive at once."""
        state, self._state = self._state, None
        if not any(needs):
            return [None] * len(needs)
        x1, n, rstd, gate, branch, w, shift, scale, s1 = state
        state.clear()
        grads = {"shift": dh.sum_to_size(shift.shape).to(shift.dtype),
                 "scale": (dh * n).sum_to_size(scale.shape).to(scale.dtype)}
        del n
        dn = dh.mul_(s1)
        xhat = x1 * rstd
        del x1
        grads["w"] = (dn * xhat).sum_to_size(w.shape).to(w.dtype)
        g = dn.mul_(w)
        m = (g * xhat).mean(-1, keepdim=True)
        dx1 = g.sub_(xhat.mul_(m)).mul_(rstd)
        del xhat
        grads["x"] = dx1
        if gate is not None:
            grads["gate"] = (dx1 * branch).sum_to_size(gate.shape).to(gate.dtype)
            grads["branch"] = (dx1 * gate).to(branch.dtype)
        names = ("x", "gate", "branch", "w", "shift", "scale") if self.residual else ("x", "w", "shift", "scale")
        return [grads[k] if need else None for k, need in zip(names, needs)]


def linears_of_recomputed(prologue, inputs, weights, adds=None):
    """[prologue(*inputs) @ Wᵀ (+ add) for W, add in zip(weights, adds)] with prologue's output recomputed in
    backward instead of kept. An add is None, a bias [out] or a term shaped like the output (then the
    prologue's output must be 2-D). `prologue` must be a pure function of `inputs` (tensors it closes over get
    no gradient)."""
    adds = list(adds) if adds is not None else [None] * len(weights)
    return _LinearsOfRecomputed.apply(prologue, len(inputs), len(weights), *inputs, *weights, *adds)
