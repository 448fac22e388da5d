"""PixelDiT building blocks and models: shapes, masks, aspect ratios, sizes, FLOPs, features, errors."""
import json
import math

import pytest
import torch

from t2i_train.models import PRESETS, PixelDiT, build_model
from t2i_train.models.blocks import PiTBlock, PixelTokenEmbedder
from t2i_train.models.layers import RMSNorm, apply_rope, rope_1d, rope_2d, sincos_2d
from t2i_train.tools.flops import count_forward_flops


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1
                    else 1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _t2i(**kw):
    return _randomise(build_model("pixeldit_tiny_t2i", **kw)).eval()


def _c2i(**kw):
    return _randomise(build_model("pixeldit_tiny_c2i", **kw)).eval()


# ---------------------------------------------------------------------------------------------- blocks

def test_rmsnorm_unit_rms_and_dtype():
    n = RMSNorm(32)
    x = torch.randn(4, 7, 32) * 5
    y = n(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4, 7), atol=1e-4)
    # statistics in float32 even for bf16 activations (the gain then promotes like the release)
    yb = n(x.bfloat16())
    assert torch.allclose(yb.float(), y, atol=2e-2)


def test_rope_2d_is_resolution_independent_and_rotates():
    f8, f16 = rope_2d(16, 8, 8, "cpu"), rope_2d(16, 16, 16, "cpu")
    assert f8.shape == (64, 8) and f16.shape == (256, 8)
    # corners sit at the same positions (0 and the extent) whatever the grid size
    assert torch.allclose(f8[-1], f16[-1]) and torch.allclose(f8[0], f16[0])
    x = torch.randn(2, 64, 4, 16)
    y = apply_rope(x, f8)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotation keeps norms
    assert not torch.allclose(y[:, 1:], x[:, 1:])
    # relative property: <R(a)q, R(b)k> depends on a-b only (1D)
    f = rope_1d(16, 10, "cpu")
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    d = lambda a, b: (apply_rope(q, f[a:a + 1]) * apply_rope(k, f[b:b + 1])).sum()
    assert torch.allclose(d(3, 1), d(7, 5), atol=1e-5)


def test_sincos_pixel_embedding_layout():
    e = sincos_2d(8, 3, 5, "cpu", torch.float32)
    assert e.shape == (3, 5, 8)
    assert torch.allclose(e[0, 0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))
    # first half varies with the column only, second half with the row only
    assert torch.allclose(e[0, :, :4], e[2, :, :4]) and torch.allclose(e[:, 0, 4:], e[:, 3, 4:])


def test_pixel_token_embedder_groups_patches_row_major():
    emb = PixelTokenEmbedder(3, 4, use_abs_pos=False)
    with torch.no_grad():
        emb.proj.weight.copy_(torch.tensor([[1.0, 0, 0]] * 4))
        emb.proj.bias.zero_()
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tok = emb(x, 2)  # 2x3 patches of 2x2 pixels
    assert tok.shape == (2 * 6, 4, 4)
    # patch (row 1, col 2) of image 1, pixel (1, 0) = x[1, 0, 3, 4]
    assert tok[6 + 1 * 3 + 2, 2, 0] == x[1, 0, 3, 4]


def test_pit_block_pixelwise_adaln_and_compaction_shapes():
    blk = PiTBlock(pixel_dim=8, cond_dim=32, patch=4, attn_dim=24, attn_heads=2)
    assert blk.modulation.out_features == 16 * 6 * 8  # Φ: D → p²·6·D_pix
    assert blk.compact.in_features == 16 * 8 and blk.compact.out_features == 24
    x, s = torch.randn(2 * 6, 16, 8), torch.randn(2 * 6, 32)
    with torch.no_grad():
        blk.modulation.weight.normal_()
    out = blk(x, s, 2, rope_2d(12, 2, 3, "cpu"))
    assert out.shape == x.shape
    # distinct parameters per pixel: perturbing one pixel's modulation rows changes that pixel only
    base = out.detach()
    with torch.no_grad():
        blk.modulation.bias[5 * 48 + 2 * 8: 5 * 48 + 3 * 8] += 1.0  # gate1 of pixel 5 (layout per pixel: 6·D_pix)
        out2 = blk(x, s, 2, rope_2d(12, 2, 3, "cpu"))
    changed = (out2 - base).abs().sum(-1) > 1e-6
    assert changed[:, 5].all() and not changed[:, :5].any() and not changed[:, 6:].any()


# ---------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("hw", [(32, 32), (32, 48), (56, 24)])
def test_shapes_any_multiple_of_patch(hw):
    x = torch.randn(2, 3, *hw)
    t = torch.rand(2)
    assert _c2i()(x, t, torch.tensor([1, 10])).shape == x.shape
    assert _t2i()(x, t, torch.randn(2, 5, 32), torch.ones(2, 5)).shape == x.shape


def test_text_padding_changes_nothing():
    m = _t2i()
    x, t = torch.randn(2, 3, 24, 32), torch.rand(2)
    txt = torch.randn(2, 9, 32)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    out = m(x, t, txt, mask)
    garbage = txt.clone()
    garbage[1, 4:] = 100 * torch.randn(5, 32)
    assert torch.allclose(m(x, t, garbage, mask), out, atol=1e-5)
    # and sample 1 equals the same prompt without padding
    alone = m(x[1:], t[1:], txt[1:, :4], torch.ones(1, 4))
    assert torch.allclose(alone, out[1:], atol=1e-5)
    # without a mask the padding does change the output (the test can fail)
    assert not torch.allclose(m(x, t, garbage, None)[1], m(x, t, txt, None)[1], atol=1e-3)


def test_conditions_change_output():
    m = _c2i()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.3])
    a, b = m(x, t, torch.tensor([0, 0])), m(x, t, torch.tensor([0, 10]))
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert not torch.allclose(m(x, t, torch.tensor([0, 0])), m(x, t + 0.2, torch.tensor([0, 0])))


def test_parameter_counts_equal_release():
    expect = {"pixeldit_b": 184.7, "pixeldit_l": 569.6, "pixeldit_xl": 797.4, "pixeldit_t2i": 1302.5}
    for name, millions in expect.items():
        with torch.device("meta"):
            m = build_model(name)
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == millions, name
    assert PRESETS["pixeldit_xl"]["depth"] == 26 and PRESETS["pixeldit_t2i"]["pixel_attn_dim"] == 1152


@pytest.mark.parametrize("size,gflops", [(256, 311.19), (512, 1352.24), (1024, 7147.17)])
def test_flops_table16_xl(size, gflops):
    with torch.device("meta"):
        m = build_model("pixeldit_xl")
    got = count_forward_flops(m, size, size) / 1e9
    assert abs(got - gflops) / gflops < 1e-3, got


def test_flops_t2i_1024():
    with torch.device("meta"):
        m = build_model("pixeldit_t2i")
    got = count_forward_flops(m, 1024, 1024, text_tokens=300) / 1e9
    assert abs(got - 6183.1) / 6183.1 < 1e-3, got


def test_flops_cli(capsys):
    from t2i_train.tools.flops import main

    main(["--preset", "pixeldit_xl", "--height", "256", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["gflops"] == pytest.approx(311.19, rel=1e-3) and out["params_M"] == pytest.approx(797.38, abs=0.01)


def test_flops_cli_config_resolves_extends(capsys):
    """configs/t2i_1024.yaml names no model itself: it extends the 512 stage, so the T2I model is counted."""
    from pathlib import Path

    from t2i_train.tools.flops import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "t2i_1024.yaml"
    main(["--config", str(cfg), "--height", "1024", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["params_M"] == pytest.approx(1302.47, abs=0.01) and out["gflops"] == pytest.approx(6183.1, rel=1e-3)


def test_repa_hidden_state_is_block_k():
    m = _c2i(repa_block=1)
    x, t, y = torch.randn(2, 3, 16, 24), torch.rand(2), torch.tensor([1, 2])
    captured = {}
    m.patch_blocks[0].register_forward_hook(lambda mod, i, o: captured.setdefault("h", o))
    v, h = m(x, t, y, return_repa=True)
    assert h.shape == (2, 2 * 3, 64) and torch.equal(h, captured["h"])
    assert torch.allclose(v, m(x, t, y))
    with pytest.raises(ValueError, match="repa_block"):
        _c2i()(x, t, y, return_repa=True)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    x, t, txt = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 6, 32)
    grads = []
    for ckpt in (False, True):
        m = _t2i().train()
        m.set_activation_checkpointing(ckpt)
        m(x, t, txt, torch.ones(2, 6)).pow(2).mean().backward()
        # the last MM-DiT block's text stream feeds nothing (as in the release): no gradient there
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in m.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    assert len(m.shard_units()) == 2 + 1


def test_bf16_autocast_is_finite_and_close():
    m = _t2i()
    x, t, txt = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 6, 32)
    ref = m(x, t, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, txt)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_sana_flow_adapter():
    m = _t2i()
    m2 = _t2i(timestep_convention="sana_flow")
    x, t, txt = torch.randn(1, 3, 16, 16), torch.tensor([0.25]), torch.randn(1, 4, 32)
    assert torch.allclose(m2(x, t, txt), -m(x, 1000 * (1 - t), txt), atol=1e-6)


def test_x_prediction_returns_velocity_of_the_predicted_image():
    """prediction "x": the same network read as x̂, returned as v̂ = (x̂ − x_t) / max(1 − t, x_min_sigma)."""
    mv, mx = _t2i(), _t2i(prediction="x", x_min_sigma=0.05)
    mx.load_state_dict(mv.state_dict())
    x, txt = torch.randn(3, 3, 16, 16), torch.randn(3, 4, 32)
    t = torch.tensor([0.1, 0.6, 0.99])  # the last one is clamped: 1 − t = 0.01 < 0.05
    with torch.no_grad():
        x_hat, v_hat = mv(x, t, txt), mx(x, t, txt)
    sigma = torch.tensor([0.9, 0.4, 0.05]).view(3, 1, 1, 1)
    assert torch.allclose(v_hat, (x_hat - x) / sigma, atol=1e-5)
    # the data prediction the samplers form, x_t + (1 − t)·v̂, is x̂ wherever σ is not clamped
    assert torch.allclose((x + (1 - t).view(3, 1, 1, 1) * v_hat)[:2], x_hat[:2], atol=1e-5)
    assert mx.export_config()["prediction"] == "x"
    with pytest.raises(ValueError, match="prediction must be 'v' or 'x'"):
        build_model("pixeldit_tiny_t2i", prediction="eps")
    with pytest.raises(ValueError, match="needs timestep_convention 'native'"):
        build_model("pixeldit_tiny_t2i", prediction="x", timestep_convention="sana_flow")


def test_bad_inputs_raise_clear_errors():
    m = _c2i()
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        m(torch.randn(1, 3, 20, 16), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1))
    with pytest.raises(ValueError, match=r"x must be \[B, 3"):
        m(torch.randn(1, 1, 16, 16), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="text condition"):
        _t2i()(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 4, 31))
    with pytest.raises(ValueError, match="unknown model config keys"):
        build_model("pixeldit_tiny_c2i", hidden=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("pixeldit_xxl")
