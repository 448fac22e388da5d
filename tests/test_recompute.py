"""Selective checkpointing built from the blocks' structure (models.recompute): the same values and gradients as
plain autograd, and what it keeps."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from t2i_train.models import build_model
from t2i_train.models.layers import modulate, rms_norm
from t2i_train.models.recompute import NormModulate, linears_of_recomputed
from t2i_train.tools.memplan import _inputs


def _prologue(x, gate, branch, w, shift, scale, eps):
    return modulate(rms_norm(torch.addcmul(x, gate, branch), w, eps), shift, scale)


def _leaves(dtype, rows=24, dim=16, out=(40, 24)):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    inputs = (r(2, rows // 2, dim), r(2, 1, dim), r(2, rows // 2, dim), r(dim), r(2, 1, dim), r(2, 1, dim))
    weights = [r(o, dim) for o in out]
    return inputs, weights


def _grads(outs, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("adds", ["none", "bias"])
def test_linears_of_recomputed_equal_autograd_float64(adds):
    inputs, weights = _leaves(torch.float64)
    biases = [torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True) for w in weights] \
        if adds == "bias" else [None] * len(weights)
    prologue = partial(_prologue, eps=1e-6)
    ref_h = prologue(*inputs)
    ref = [F.linear(ref_h, w, b) for w, b in zip(weights, biases)]
    got = linears_of_recomputed(prologue, inputs, weights, biases)
    leaves = [*inputs, *weights, *(b for b in biases if b is not None)]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for a, b in zip(_grads(ref, leaves), _grads(got, leaves)):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_linears_of_recomputed_full_shaped_add_and_missing_inputs():
    """An addend shaped like the output (2-D prologue output, addmm), an input that is None, an unused output."""
    g = torch.Generator().manual_seed(0)
    x, s = (torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w1, w2 = (torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    term = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def prologue(a, b, c):
        assert c is None
        return F.silu(a) * b

    ref = torch.addmm(term, prologue(x, s, None), w1.t())
    got, unused = linears_of_recomputed(prologue, (x, s, None), [w1, w2], [term, None])
    assert torch.equal(ref, got)
    *grads, dw2 = _grads([got], [x, s, w1, term, w2])  # `unused` gets no gradient
    for a, b in zip(_grads([ref], [x, s, w1, term]), grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert dw2 is None or torch.count_nonzero(dw2) == 0


def test_linears_of_recomputed_bf16_autocast_matches_autocast_linear():
    """Under bf16 autocast: the outputs are those of autocast's linear bit for bit; gradients agree to bf16
    rounding (the hand-written matmul gradients sum in another order)."""
    inputs, weights = _leaves(torch.float32, rows=64, dim=32, out=(96, 48))
    prologue = partial(_prologue, eps=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_h = prologue(*inputs)
        ref = [F.linear(ref_h, w) for w in weights]
        got = linears_of_recomputed(prologue, inputs, weights)
    for a, b in zip(ref, got):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b)
    leaves = [*inputs, *weights]
    for a, b in zip(_grads(ref, leaves), _grads(got, leaves)):
        assert b.dtype == a.dtype == torch.float32
        assert (b - a).norm() <= 1e-2 * a.norm(), ((b - a).norm(), a.norm())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_backward_equals_autograd(residual, mod_dtype):
    """NormModulate's written-out backward (float32 stream; modulations, gate and branch in bf16 as under
    autocast, or float32): its recomputed output is the forward's bit for bit, and its gradients are
    autograd's through the same ops up to float rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 32, generator=g)
    w = 1 + 0.1 * torch.randn(32, generator=g)
    shift, scale, gate = (0.5 * torch.randn(3, 1, 32, generator=g).to(mod_dtype) for _ in range(3))
    branch = torch.randn(3, 40, 32, generator=g).to(mod_dtype)
    inputs = (x, gate, branch, w, shift, scale) if residual else (x, w, shift, scale)
    pro = NormModulate(1e-6, residual)
    dh = torch.randn(3, 40, 32, generator=g)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref = pro(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, dh)
    h = pro.recompute(*inputs)
    assert torch.equal(h, ref.detach())
    got = pro.backward(dh.clone(), [True] * len(inputs))
    for a, b, t in zip(ref_grads, got, inputs):
        assert b.dtype == t.dtype and b.shape == t.shape
        tol = 1e-5 if b.dtype == torch.float32 else 1e-2
        assert (b.float() - a.float()).norm() <= tol * a.float().norm(), (t.shape, (b - a).norm() / a.norm())
    pro.recompute(*inputs)
    assert pro.backward(dh.clone(), [False] * len(inputs)) == [None] * len(inputs)
    assert pro.recompute(x.double(), *inputs[1:]) is None  # other dtypes: autograd's chain


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn's graph is alive."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


def test_linears_of_recomputed_keep_only_inputs_and_weight_copies():
    inputs, weights = _leaves(torch.float32, rows=256, dim=64, out=(128,))
    prologue = partial(_prologue, eps=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = _saved_bytes(lambda: [F.linear(prologue(*inputs), w) for w in weights])
        regions, _ = _saved_bytes(lambda: linears_of_recomputed(prologue, inputs, weights))
    expected = sum(t.numel() * 4 for t in inputs) + sum(w.numel() * 2 for w in weights)  # + bf16 weight copies
    assert regions == expected
    # plain autograd keeps the prologue's output besides (float32 normalised values, the bf16 matmul input)
    assert plain >= regions + inputs[0].numel() * (4 + 2)


@pytest.mark.parametrize("arch", ["t2i", "c2i"])
def test_selective_regions_bf16_gradients(arch):
    """The whole model under bf16 autocast: selective checkpointing from the blocks' structure gives the
    forward of no checkpointing bit for bit and its gradients to bf16 rounding; the blocks do use it."""
    torch.manual_seed(0)
    model = build_model(f"pixeldit_tiny_{arch}").train()
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)
    if arch == "c2i":
        for blk in [*model.patch_blocks, *model.pixel_blocks]:
            torch.nn.init.normal_(blk.modulation.weight, std=0.02)
    inputs = _inputs(model, 2, 32, 48, torch.float32, None)

    def run(policy):
        model.set_activation_checkpointing(policy)
        x, t, c, mask = inputs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, c, mask)
        (out.float() - x).pow(2).mean().backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                       for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return out.detach(), g

    out0, g0 = run("none")
    calls = []
    import t2i_train.models.recompute as R
    orig = R._LinearsOfRecomputed.backward

    def counting(ctx, *grads):
        calls.append(1)
        return orig(ctx, *grads)

    R._LinearsOfRecomputed.backward = staticmethod(counting)
    try:
        out, g = run("selective")
    finally:
        R._LinearsOfRecomputed.backward = staticmethod(orig)
    assert all(blk.recompute_regions for blk in model.shard_units())
    # 3 regions per stream per patch block (2 streams in MM-DiT, 1 in DiT), 1 per pixel block; the last MM-DiT
    # block's text stream after attention feeds nothing (as in the release), so its 2 regions see no backward
    streams = 2 if arch == "t2i" else 1
    unused = 2 if arch == "t2i" else 0
    assert len(calls) == 3 * streams * len(model.patch_blocks) + len(model.pixel_blocks) - unused
    assert torch.equal(out, out0)
    assert g0.abs().sum() > 0
    assert (g - g0).norm() <= 1e-3 * g0.norm(), ((g - g0).norm() / g0.norm()).item()
