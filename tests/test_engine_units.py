"""Unit tests of the engine pieces: CAME, schedule, spike guard, EMA, checkpoint manager, DeepSpeed JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch

from t2i_train.config import load_config
from t2i_train.engine.backends import SingleBackend, TrainModule, deepspeed_config
from t2i_train.engine.checkpoint import CheckpointManager
from t2i_train.engine.ema import ShardedEMA
from t2i_train.engine.optim import CAME, build_optimizer
from t2i_train.engine.schedule import clip_at, lr_at
from t2i_train.engine.spike import SpikeGuard


def test_came_state_is_factored_and_it_minimises():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(torch.randn(6))
    target = torch.randn(8, 6)
    opt = CAME([w, b], lr=1e-2)
    first = None
    for _ in range(300):
        loss = (w - target).pow(2).mean() + b.pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    st = opt.state[w]
    assert st["exp_avg_sq_row"].shape == (8,) and st["exp_avg_sq_col"].shape == (6,)
    assert st["exp_avg_res_row"].shape == (8,) and "exp_avg_sq" not in st
    assert opt.state[b]["exp_avg_sq"].shape == (6,) and opt.state[b]["step"] == 300


def test_came_first_step_matches_hand_computation():
    # step 1, unfactored (1-D): v = (1-b2)(g²+eps1); u = g/sqrt(v), clipped to RMS 1; m = (1-b1)u; p -= lr·m
    g = torch.tensor([0.5, -2.0, 1.0])
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = g.clone()
    opt = CAME([p], lr=0.1, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    opt.step()
    u = g / torch.sqrt(0.001 * (g * g + 1e-30))
    u = u / max(1.0, float(u.norm() / math.sqrt(3)))
    assert torch.allclose(p.detach(), -0.1 * 0.1 * u, rtol=1e-5)


def test_optimizer_factory_reads_the_config():
    cfg = load_config(None, ["optim.name=came", "optim.betas=[0.9,0.999,0.9999]", "optim.eps=[1.0e-30,1.0e-16]"])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], cfg.optim)
    assert isinstance(opt, CAME) and opt.defaults["eps"] == (1e-30, 1e-16)
    cfg = load_config(None, [])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optim)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["weight_decay"] == 0.0


def test_schedule_warmup_and_step_down():
    cfg = load_config(None, ["optim.lr=1e-4", "optim.grad_clip=1.0", "optim.warmup_steps=10",
                             "optim.step_downs=[{step: 100, lr: 1.0e-5, clip: 0.5}]"]).optim
    assert lr_at(0, cfg) == pytest.approx(1e-5) and lr_at(9, cfg) == pytest.approx(1e-4)
    assert lr_at(99, cfg) == 1e-4 and clip_at(99, cfg) == 1.0
    assert lr_at(100, cfg) == 1e-5 and clip_at(100, cfg) == 0.5 and lr_at(10 ** 6, cfg) == 1e-5


def test_spike_guard():
    cfg = load_config(None, ["spike_guard.min_history=5", "spike_guard.max_consecutive=2"]).spike_guard
    g = SpikeGuard(cfg)
    for x in [1.0, 1.1, 0.9, 1.05, 0.95]:
        assert g.check_loss(x) is None
        g.accept(x)
    assert g.check_loss(float("nan")) == "nonfinite_loss"
    assert g.check_loss(1.3) is None
    assert g.check_loss(50.0) == "loss_spike"
    assert g.check_grad(float("inf")) == "nonfinite_grad"
    g.skip()
    assert not g.should_roll_back()
    g.skip()
    assert g.should_roll_back()
    g2 = SpikeGuard(cfg)
    g2.load_state_dict(g.state_dict())
    assert g2.consecutive == 2 and list(g2.history) == list(g.history)


def test_ema_single_process_math_and_gather():
    lin = torch.nn.Linear(3, 2)
    ema = ShardedEMA(list(lin.named_parameters()), "flat_slice")
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    ema.update(0.9)
    full = ema.full_state_dict()
    for n, p in lin.named_parameters():
        assert full[n].shape == p.shape and full[n].dtype == torch.float32
        assert torch.allclose(full[n], before[n] + 0.1, atol=1e-6)


def test_checkpoint_manager_is_atomic_rotates_and_resumes(tmp_path):
    cfg = load_config(None, ["backend.precision=fp32"])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    backend = SingleBackend(cfg, TrainModule(Tiny(), torch.nn.Module()), torch.device("cpu"))
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        with torch.no_grad():
            backend.raw.model.w.weight.fill_(float(step))
        mgr.save(step, backend, {"step": step, "data": {"pos": step}}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    assert mgr.latest().name == "step_00000003"
    # an interrupted save leaves only a .tmp directory, never a half-written `latest`
    (tmp_path / "checkpoints" / ".tmp-step_00000004").mkdir()
    assert mgr.latest().name == "step_00000003"
    with torch.no_grad():
        backend.raw.model.w.weight.zero_()
    extras = mgr.load(mgr.latest(), backend)
    assert extras["data"] == {"pos": 3} and float(backend.raw.model.w.weight[0, 0].detach()) == 3.0


def test_deepspeed_json_generated_and_checked(tmp_path):
    cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=3", "backend.micro_batch=4",
                             "backend.grad_accum=2", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["zero_allow_untested_optimizer"] is False
    came = load_config(None, ["backend.name=deepspeed", "optim.name=came", "optim.betas=[0.9,0.999,0.9999]",
                              "optim.eps=[1.0e-30,1.0e-16]"])
    assert deepspeed_config(came, world_size=1)["zero_allow_untested_optimizer"] is True  # DeepSpeed refuses CAME else
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                "train_micro_batch_size_per_gpu": 4}))
    cfg.backend.deepspeed_config = str(user)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["gradient_accumulation_steps"] == 2
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(cfg, world_size=2)
