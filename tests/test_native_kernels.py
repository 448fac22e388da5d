"""The native CPU kernels of the fused pixel sub-blocks (t2i_train/csrc/pixel_fused.cpp) against the Python chunk
loops of models.fused: same outputs and gradients in float32 (up to summation order), the same rounding
points under bfloat16 autocast, for the released D_pix = 16 (the unrolled path) and another width, over
partial chunks, on 1 and 2 threads, and the same bits on a rerun."""
import pytest
import torch

import t2i_train.models.fused as fused
from t2i_train.models import native

pytestmark = pytest.mark.skipif(not native.load(), reason="native pixel kernels cannot be built here")


def _leaves(D, dtype, rows=9001):
    g = torch.Generator().manual_seed(D)

    def act():
        return torch.randn(rows, D, generator=g).to(dtype).requires_grad_()

    def par(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=g)).requires_grad_()

    acts = [act() for _ in range(6)]  # x, h, gate1, shift, scale, gate
    params = [par(D, scale=0.1, offset=1.0), par(4 * D, D, scale=0.3), par(4 * D), par(D, 4 * D, scale=0.2), par(D),
              par(3, D), par(3)]  # norm w, fc1 w/b, fc2 w/b, final w/b
    return acts, params


def _run(acts, params, native_on, bf16):
    fused.NATIVE = None if native_on else False
    try:
        for t in acts + params:
            t.grad = None
        x, h, g1, sh, sc, gt = acts
        nw, w1, b1, w2, b2, fw, fb = params
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = fused._PixelMLPResidual.apply(x, h, g1, sh, sc, gt, nw, w1, b1, w2, b2, 1e-6)
            u = fused._NormScale.apply(y, sh, sc, nw, 1e-6)       # with shift
            v = fused._NormScale.apply(u, None, gt, nw, 1e-6)     # without
            out = fused._NormLinear.apply(v, nw, fw, fb, 1e-6)
        out.float().pow(2).mean().backward()
        return [t.detach().float() for t in (y, u, v, out)] + [t.grad.float() for t in acts + params]
    finally:
        fused.NATIVE = None


@pytest.mark.parametrize("D", [16, 12])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_matches_python_loops_float32(D, threads):
    acts, params = _leaves(D, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = _run(acts, params, False, False)
        got = _run(acts, params, True, False)
        again = _run(acts, params, True, False)
    finally:
        torch.set_num_threads(before)
    for i, (a, b, c) in enumerate(zip(ref, got, again)):
        assert a.shape == b.shape and a.abs().sum() > 0, i
        assert torch.equal(b, c), i  # deterministic
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-5, (i, rel)


@pytest.mark.parametrize("D", [16, 12])
def test_native_matches_python_loops_bf16(D):
    """Under bf16 autocast both round at the same points: activations agree to a few bf16 roundings that
    flip on float-order ties (relative 1e-3), parameter gradients to 1e-2 (the Python loop rounds each
    chunk's final-layer weight gradient to bf16 before summing; the native kernel sums in float32)."""
    acts, params = _leaves(D, torch.bfloat16)
    ref = _run(acts, params, False, True)
    got = _run(acts, params, True, True)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.shape == b.shape and a.abs().sum() > 0, i
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < (1e-2 if i >= 4 + 6 else 1e-3), (i, rel)
    # the forward outputs are bf16 values computed from bf16 inputs: most agree bit for bit
    assert (ref[0] == got[0]).float().mean() > 0.99


def test_native_ops_reject_wrong_inputs():
    x = torch.randn(10, 16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.pixdit_fused.norm_scale_fwd(x.double(), None, x.double(), torch.ones(16), 1e-6, None)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.pixdit_fused.norm_scale_fwd(x, None, x[:5], torch.ones(16), 1e-6, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.pixdit_fused.norm_scale_fwd(x, None, x, torch.ones(16, dtype=torch.bfloat16), 1e-6, None)
    with pytest.raises(RuntimeError, match="modulation bias"):
        torch.ops.pixdit_fused.norm_scale_fwd(x, None, x, torch.ones(16), 1e-6, torch.zeros(2, 5, 16))


def test_native_build_is_keyed_by_machine_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXDIT_EXT_DIR", str(tmp_path))
    d = native.build_dir()
    assert d.parent == tmp_path and d.name.startswith("pixel_fused-")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : other cpu")
    assert native.build_dir() != d
    monkeypatch.setenv("PIXDIT_NATIVE", "0")
    assert not native.enabled() and not native.available()


@pytest.mark.parametrize("bf16", [False, True])
def test_native_kernels_add_modulation_biases(bf16):
    """Modulations passed without their per-pixel bias [P·D] (row i uses pixel i mod P) give what the same
    modulations with the bias added beforehand give, and the bias gradients are the per-pixel sums of the
    modulation gradients."""
    P, D, rows = 16, 16, 64 * 16
    dtype = torch.bfloat16 if bf16 else torch.float32
    acts, params = _leaves(D, dtype, rows=rows)
    g = torch.Generator().manual_seed(7)
    biases = [(0.5 * torch.randn(P * D, generator=g)).requires_grad_() for _ in range(5)]  # scale1, g1, sh, sc, gt

    def run(folded):
        for t in acts + params + biases:
            t.grad = None
        x, h, g1, sh, sc, gt = acts
        nw, w1, b1, w2, b2, _, _ = params
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mods = [t.view(-1, P, D) for t in (sc, g1, sh, sc, gt)]
            if folded:
                u = fused.norm_scale(x.view(-1, P, D), mods[0], _Norm(nw), scale_bias=biases[0])
                y = fused.pixel_mlp_residual(u, mods[2], mods[3], mods[4], _Norm(nw), _Mlp(w1, b1, w2, b2),
                                             attn=h.view(-1, P, D), gate1=mods[1], biases=biases[1:])
            else:
                m = [t + b.view(P, D).to(t.dtype) for t, b in zip(mods, biases)]
                u = fused.norm_scale(x.view(-1, P, D), m[0], _Norm(nw))
                y = fused.pixel_mlp_residual(u, m[2], m[3], m[4], _Norm(nw), _Mlp(w1, b1, w2, b2),
                                             attn=h.view(-1, P, D), gate1=m[1])
        y.float().pow(2).mean().backward()
        return [y.detach().float()] + [t.grad.float() for t in acts + biases]

    assert fused.folds_bias(_Norm(params[0]))
    ref, got = run(False), run(True)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.abs().sum() > 0, i
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < (2e-2 if bf16 else 1e-5), (i, rel)


class _Norm(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight, self.eps = w, 1e-6


class _Mlp(torch.nn.Module):
    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.fc1 = torch.nn.Module()
        self.fc2 = torch.nn.Module()
        self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias = w1, b1, w2, b2
