import math

import pytest
import torch

from t2i_train.diffusion import ConditionDropout, FlowObjective, FlowObjectiveConfig, sample_timesteps, shift_time
from t2i_train.models import build_model


def test_shift_matches_sd3_and_sana_forms():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    sigma = 1 - t
    sana = s * sigma / (1 + (s - 1) * sigma)  # SANA's shift of σ (σ = 1 is noise)
    assert torch.allclose(shift_time(t, s), 1 - sana)
    assert torch.equal(shift_time(t, 1.0), t)
    assert shift_time(torch.tensor(0.5), 4.0).item() == pytest.approx(0.2)


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, kind="uniform", generator=g)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_timesteps(20000, kind="logit_normal", mean=0.5, std=1.0, generator=g)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    sh = sample_timesteps(20000, kind="logit_normal", shift=3.0, generator=torch.Generator().manual_seed(1))
    assert abs(sh.median().item() - 0.25) < 0.01  # median 0.5 maps to 0.5 / (0.5 + 1.5)
    with pytest.raises(ValueError, match="uniform"):
        sample_timesteps(2, kind="cosine")


class Oracle(torch.nn.Module):
    """Returns a fixed function of its inputs so the loss can be recomputed by hand."""
    patch_size = 8

    def forward(self, x_t, t, cond, mask=None):
        self.seen = (x_t.clone(), t.clone())
        return 0.5 * x_t


def test_loss_values_by_hand():
    obj = FlowObjective({"timestep_sampling": "uniform"})
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.0, 0.5, 1.0])
    model = Oracle()
    out = obj.loss(model, x, torch.zeros(3, dtype=torch.long), t=t, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x_t = t.view(3, 1, 1, 1) * x + (1 - t.view(3, 1, 1, 1)) * eps
    assert torch.allclose(model.seen[0], x_t) and torch.equal(model.seen[1], t)
    per = ((0.5 * x_t - (x - eps)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(out["per_sample"], per) and out["per_sample"].shape == (3,)
    assert torch.allclose(out["loss"], per.mean()) and out["repa_loss"] is None
    assert torch.equal(out["t"], t)
    assert torch.allclose(model.seen[0][0], eps[0]) and torch.allclose(model.seen[0][2], x[2])  # t=0 noise, t=1 data


def test_loss_trains_tiny_model_and_is_seeded():
    torch.manual_seed(0)
    model = build_model("pixeldit_tiny_c2i")
    obj = FlowObjective({"shift": 1.0})
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([1, 2, 3, 10])
    a = obj.loss(model, x, y, generator=torch.Generator().manual_seed(3))
    b = obj.loss(model, x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    a["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert math.isfinite(a["loss"].item()) and a["loss"].item() > 0


def test_class_dropout():
    drop = ConditionDropout(0.5, num_classes=10)
    y = torch.arange(10).repeat(100)
    out, mask = drop(y, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    assert mask is None and 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(ConditionDropout(0.0, num_classes=10)(y)[0], y)
    assert (ConditionDropout(1.0, num_classes=10)(y)[0] == 10).all()


def test_text_dropout_uses_null_embedding_and_mask():
    null_emb, null_mask = torch.full((1, 5, 4), 7.0), torch.tensor([[1, 0, 0, 0, 0]])
    drop = ConditionDropout(0.5, null_emb=null_emb, null_mask=null_mask)
    emb, mask = torch.randn(64, 5, 4), torch.ones(64, 5, dtype=torch.long)
    out, out_mask = drop(emb, mask, generator=torch.Generator().manual_seed(1))
    dropped = (out == 7.0).all(dim=(1, 2))
    assert 10 < dropped.sum() < 54
    assert torch.equal(out[~dropped], emb[~dropped])
    assert torch.equal(out_mask[dropped], null_mask.expand(int(dropped.sum()), 5))
    assert torch.equal(out_mask[~dropped], mask[~dropped])
    with pytest.raises(ValueError, match="does not match"):
        drop(torch.randn(2, 6, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exactly one"):
        ConditionDropout(0.1)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="repa_wieght"):
        FlowObjectiveConfig.from_dict({"repa_wieght": 0.5})
