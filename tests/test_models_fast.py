"""Fast path of the model: checkpointing policies, regional compile, the PiT shift fold and the fused pixel MLP
give the plain path's gradients."""
import copy

import pytest
import torch

from t2i_train.config import ConfigError, load_config
from t2i_train.models import build_model
from t2i_train.tools.memplan import _inputs, peak_step_bytes


def _grads(model, inputs):
    x, t, cond, mask = inputs
    out = model(x, t, cond, mask)
    (out - x).pow(2).mean().backward()
    # the last MM-DiT block's text stream feeds nothing (as in the release): no gradient there
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out.detach(), g


def _tiny(arch="t2i"):
    torch.manual_seed(0)
    model = build_model(f"pixeldit_tiny_{arch}").train()
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)  # non-zero output: gradients reach every block
    return model


@pytest.mark.parametrize("arch", ["t2i", "c2i"])
def test_checkpointing_policies_give_the_same_gradients(arch):
    model = _tiny(arch)
    torch.manual_seed(1)
    inputs = _inputs(model, 2, 32, 48, torch.float32, None)
    if arch == "t2i":
        inputs[3][0, 10:] = False  # a padded caption
    out0, g0 = _grads(model, inputs)
    assert g0.abs().sum() > 0
    for policy in ("selective", "full"):
        model.set_activation_checkpointing(policy)
        out, g = _grads(model, inputs)
        assert torch.equal(out, out0)
        assert torch.allclose(g, g0, rtol=0, atol=1e-6), policy


def test_checkpointing_policies_keep_less_memory():
    model = _tiny()
    inputs = _inputs(model, 4, 64, 64, torch.float32, None)
    peaks = {}
    for policy in ("none", "selective", "full"):
        model.set_activation_checkpointing(policy)
        peaks[policy] = peak_step_bytes(model, inputs)
        model.zero_grad(set_to_none=True)
    assert peaks["full"] < peaks["selective"] < 0.9 * peaks["none"], peaks


def test_checkpointing_policy_config_values():
    assert build_model("pixeldit_tiny_t2i", grad_checkpointing=True).grad_checkpointing == "full"
    assert build_model("pixeldit_tiny_t2i").export_config()["grad_checkpointing"] == "none"
    with pytest.raises(ValueError, match="selective"):
        build_model("pixeldit_tiny_t2i", grad_checkpointing="some")
    assert load_config(None, ["model.activation_checkpointing=selective"]).model.activation_checkpointing \
        == "selective"
    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        load_config(None, ["model.activation_checkpointing=partial"])


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_gradients():
    """Regional compile (inductor, fp32): outputs and gradients equal eager within 1e-5 (fusion reorders
    float sums); blocks of one class share one compiled graph; checkpointing still applies around them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = build_model("pixeldit_tiny_t2i", depth=4).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    inputs = _inputs(eager, 2, 32, 32, torch.float32, None)
    out0, g0 = _grads(eager, inputs)
    for policy in ("none", "selective", "full"):
        compiled.set_activation_checkpointing(policy)
        out, g = _grads(compiled, inputs)
        assert torch.allclose(out, out0, rtol=0, atol=1e-5), policy
        assert torch.allclose(g, g0, rtol=0, atol=1e-5), policy
    assert counters["stats"]["unique_graphs"] == 2  # one MM-DiT graph for 4 blocks, one PiT graph


@pytest.mark.parametrize("arch", ["t2i", "c2i"])
def test_shift_fold_gives_the_plain_gradients(arch):
    """PiT shift fold (compact(shift1) = (W_c·W_shift1)·s + W_c·b_shift1): outputs and every parameter
    gradient equal the plain path's within 1e-5 (fp32; only the order of float sums differs)."""
    model = _tiny(arch)
    torch.manual_seed(1)
    inputs = _inputs(model, 2, 64, 48, torch.float32, None)  # B·L = 96 patch tokens: the fold pays
    assert all(blk.fold_shift and blk.shift_fold_pays(96) for blk in model.pixel_blocks)
    out0, g0 = _grads(model, inputs)
    with model.nominal_flops():
        assert not any(blk.fold_shift for blk in model.pixel_blocks)
        out, g = _grads(model, inputs)
    assert all(blk.fold_shift for blk in model.pixel_blocks)
    assert g0.abs().sum() > 0
    assert torch.allclose(out, out0, rtol=0, atol=1e-5)
    assert torch.allclose(g, g0, rtol=0, atol=1e-5)


def test_shift_fold_only_where_it_saves_flops():
    """The fold runs when it executes fewer FLOPs (training batches), the plain path for a single small image;
    the FLOP counter reports the nominal architecture either way, and the executed count is lower."""
    from t2i_train.tools.flops import count_forward_flops

    with torch.device("meta"):
        model = build_model("pixeldit_xl")
    blk = model.pixel_blocks[0]
    assert not blk.shift_fold_pays(256)      # 256², batch 1
    assert blk.shift_fold_pays(8 * 256)      # 256², batch 8
    nominal = count_forward_flops(model, 256, 256, batch=8)
    executed = count_forward_flops(model, 256, 256, batch=8, nominal=False)
    assert nominal == 8 * count_forward_flops(model, 256, 256)
    assert executed < nominal


def _backend(monkeypatch, backend):
    """Select the fused path's kernels: "python" (the chunk loops) or "native" (models.native; skipped where
    it cannot be built). Returns a list that records, per fused call, whether the native kernels ran."""
    import t2i_train.models.fused as fused
    from t2i_train.models import native

    if backend == "native" and not native.load():
        pytest.skip("native pixel kernels cannot be built here")
    monkeypatch.setattr(fused, "NATIVE", None if backend == "native" else False)
    ran = []
    monkeypatch.setattr(fused, "_use_native", lambda *p, f=fused._use_native: ran.append(f(*p)) or ran[-1])
    return ran


@pytest.mark.parametrize("backend", ["python", "native"])
@pytest.mark.parametrize("arch,width,threads", [("t2i", 48, 1), ("t2i", 48, 2), ("c2i", 48, 2), ("t2i", 96, 3)])
def test_fused_pixel_path_gives_the_plain_gradients(arch, width, threads, backend, monkeypatch):
    """Fused per-pixel sub-blocks (models.fused, hand-written chunked backwards: norm ⊙ scale (+ shift) before
    the compaction, gated attention residual + pixel MLP after it): outputs equal and every gradient within
    1e-5 of the op-by-op path (fp32; chunked parameter-gradient sums change only the summation order). Small
    chunks, one of them partial, so the chunk loops really run; 32×48 takes the plain path before the
    compaction, 32×96 the shift fold. With 2 or 3 intra-op threads the chunks run on that many Python threads
    (per-thread parameter-gradient sums), and the intra-op thread count is restored afterwards."""
    import t2i_train.models.fused as fused

    ran = _backend(monkeypatch, backend)
    monkeypatch.setattr(fused, "CHUNK_ROWS", 1000)  # 2·(32/8)·(48/8)·64 = 3072 pixel rows: 4 chunks
    pools = []
    monkeypatch.setattr(fused, "_pool", lambda n, f=fused._pool: pools.append(n) or f(n))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pixel_blocks = _fused_matches_plain(arch, width, monkeypatch)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert ran and all(r == (backend == "native") for r in ran)
    if backend == "native":  # the native kernels thread themselves (ATen's intra-op pool), no Python threads
        assert pools == []
        return
    # forward and backward of every fused sub-block went through the thread pool (or none did, on one thread)
    assert len(pools) == (0 if threads == 1 else 2 * (2 * pixel_blocks + 1))
    # 2 threads, 4 chunks: 2 ranges (1 helper thread); 3 threads, 7 chunks: ranges of 3, 3, 1 (2 helpers)
    assert all(n == threads - 1 for n in pools)


@pytest.mark.parametrize("backend", ["python", "native"])
def test_fused_threads_under_inference_mode_and_fake_tensors(backend, monkeypatch):
    """Sampling runs under torch.inference_mode and memory plans under FakeTensorMode; both are per-thread
    states. With 2 threads: under inference mode the helper threads enter it too (the output equals the
    one-thread output), and under fake tensors (a dispatch mode) or a device context (a function mode) the
    chunks stay on the calling thread."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import t2i_train.models.fused as fused

    ran = _backend(monkeypatch, backend)
    monkeypatch.setattr(fused, "CHUNK_ROWS", 1000)
    model = _tiny("t2i").eval()
    torch.manual_seed(1)
    x, t, cond, mask = _inputs(model, 2, 32, 48, torch.float32, None)
    pools = []
    monkeypatch.setattr(fused, "_pool", lambda n, f=fused._pool: pools.append(n) or f(n))
    before = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs[threads] = model(x, t, cond, mask)
        assert (pools == []) if backend == "native" else pools
        assert torch.allclose(outs[2], outs[1], rtol=0, atol=1e-6)
        assert ran and all(r == (backend == "native") for r in ran)
        pools.clear()
        ran.clear()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = model(mode.from_tensor(x), mode.from_tensor(t), mode.from_tensor(cond), None)
        assert fake.shape == x.shape and pools == []
        with torch.device("cpu"), torch.no_grad():  # a function mode: also one thread
            model(x, t, cond, mask)
        assert pools == []
        assert ran and not any(ran)  # under a mode the Python loops run, native kernels or not
    finally:
        torch.set_num_threads(before)


def _fused_matches_plain(arch, width, monkeypatch):
    import t2i_train.models.fused as fused

    model = _tiny(arch)
    torch.manual_seed(1)
    inputs = _inputs(model, 2, 32, width, torch.float32, None)
    assert model.pixel_blocks[0].shift_fold_pays(2 * 4 * width // 8) == (width == 96)
    calls = []
    for fn in (fused._PixelMLPResidual, fused._NormScale, fused._NormLinear):
        monkeypatch.setattr(fn, "backward", staticmethod(
            lambda ctx, g, f=fn.backward, name=fn.__name__: calls.append(name) or f(ctx, g)))
    out0, g0 = _grads(model, inputs)
    # the fused path ran
    assert sorted(calls) == sorted(["_NormScale", "_PixelMLPResidual"] * len(model.pixel_blocks) + ["_NormLinear"])
    for blk in [*model.pixel_blocks, model.final]:
        blk.fused = False
    out, g = _grads(model, inputs)
    assert len(calls) == 2 * len(model.pixel_blocks) + 1
    assert g0.abs().sum() > 0
    assert torch.allclose(out, out0, rtol=0, atol=1e-6)
    assert torch.allclose(g, g0, rtol=0, atol=1e-5)
    return len(model.pixel_blocks)


@pytest.mark.parametrize("backend", ["python", "native"])
@pytest.mark.parametrize("width", [48, 96])
def test_fused_pixel_path_under_bf16_autocast(width, backend, monkeypatch):
    """Under bf16 autocast the fused sub-blocks round where the op-by-op path does: the output is the same
    and the gradients are as close to the float32 gradients as the op-by-op path's (within 1.25× its
    relative error + 1e-3)."""
    import t2i_train.models.fused as fused

    ran = _backend(monkeypatch, backend)
    monkeypatch.setattr(fused, "CHUNK_ROWS", 1000)
    model = _tiny("t2i")
    torch.manual_seed(1)
    inputs = _inputs(model, 2, 32, width, torch.float32, None)
    _, g32 = _grads(model, inputs)

    def bf16_grads(fused):
        for blk in [*model.pixel_blocks, model.final]:
            blk.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(model, inputs)

    out_plain, g_plain = bf16_grads(False)
    out_fused, g_fused = bf16_grads(True)
    assert torch.allclose(out_fused.float(), out_plain.float(), rtol=0, atol=1e-2)
    err_plain = ((g_plain - g32).norm() / g32.norm()).item()
    err_fused = ((g_fused - g32).norm() / g32.norm()).item()
    assert err_fused <= 1.25 * err_plain + 1e-3, (err_fused, err_plain)
    assert ran and all(r == (backend == "native") for r in ran)
