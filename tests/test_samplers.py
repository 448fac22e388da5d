"""Samplers on Gaussian data, where the exact velocity field and the exact ODE flow map are known in closed form.

Data x ~ N(μ, s²) per coordinate, ε ~ N(0, 1): x_t = t·x + (1 − t)·ε has variance V(t) = t²s² + (1 − t)², the
optimal velocity is v(x_t, t) = μ + (t·s² − (1 − t)) / V(t) · (x_t − t·μ), and the ODE started at x_a at time a
ends at μ + s·(x_a − a·μ) / √V(a).
"""

import numpy as np
import pytest
import torch

from t2i_train.diffusion.samplers import SAMPLERS, SamplerConfig, make_noise, sample, time_grid


class GaussianVelocity(torch.nn.Module):
    """Exact velocity of Gaussian data; the class index picks the mean/std row (row `n` = the 'null' field)."""

    def __init__(self, mu, std):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float64))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, cond, mask=None):
        self.calls.append((float(t[0]), x.shape[0]))
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mu = self.mu[cond].view(-1, *self.mu.shape[1:]) if self.mu.dim() > 1 else self.mu
        s2 = (self.std[cond].view(-1, *self.std.shape[1:]) if self.std.dim() > 1 else self.std) ** 2
        tt = t.double().view(shape)
        var = tt**2 * s2 + (1 - tt) ** 2
        return (mu + (tt * s2 - (1 - tt)) / var * (x.double() - tt * mu)).to(x.dtype)


MU = torch.tensor([0.5, -1.0, 2.0, 0.0])
STD = torch.tensor([0.3, 1.5, 0.7, 0.25])


def exact_endpoint(x_start, t_start):
    var = t_start**2 * STD.double() ** 2 + (1 - t_start) ** 2
    return MU.double() + STD.double() * (x_start.double() - t_start * MU.double()) / var.sqrt()


def endpoint_error(name, steps, shift, noise, spacing="uniform", **kw):
    model = GaussianVelocity(MU, STD)
    cfg = SamplerConfig(name=name, steps=steps, shift=shift, spacing=spacing, **kw)
    out = sample(model, noise, torch.zeros(noise.shape[0], dtype=torch.long), cfg=cfg)
    t0 = float(time_grid(name, steps, shift, spacing)[0])
    return (out.double() - exact_endpoint(noise, t0)).abs().mean().item()


def order_slope(name, shift, spacing="uniform", steps=(32, 64, 128, 256), **kw):
    noise = make_noise(range(64), (4,))
    errs = [endpoint_error(name, n, shift, noise, spacing, **kw) for n in steps]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name", SAMPLERS)
def test_reproduces_target_mean_and_variance(name):
    noise = make_noise(range(4000), (4,))
    model = GaussianVelocity(MU, STD)
    out = sample(model, noise, torch.zeros(4000, dtype=torch.long), cfg=SamplerConfig(name=name, steps=200, shift=3.0))
    # sampling error of the mean: std/sqrt(n) ~ 0.024 for the widest coordinate
    assert torch.allclose(out.mean(0), MU, atol=0.08), out.mean(0)
    assert torch.allclose(out.std(0), STD, rtol=0.04, atol=0.0), out.std(0)


EXPECTED_ORDER = {"euler": 1.0, "heun": 2.0, "flow_dpm_solver": 2.0}


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name", sorted(EXPECTED_ORDER))
def test_endpoint_error_falls_at_solver_order(name, shift):
    slope, errs = order_slope(name, shift)
    assert abs(slope - EXPECTED_ORDER[name]) < 0.15, (slope, errs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_exact_heun_is_second_order(shift):
    slope, errs = order_slope("heun", shift, heun_exact=True)
    assert abs(slope - 2.0) < 0.15, (slope, errs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_solver_2m_is_second_order_on_logsnr_grid(shift):
    slope, errs = order_slope("dpm_solver_2m", shift, spacing="logsnr", steps=(16, 32, 64, 128))
    assert abs(slope - 2.0) < 0.2, (slope, errs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_solver_2m_converges_on_reference_grid(shift):
    # the t-uniform flow grid keeps O(1) log-SNR steps at both ends, so the observed order is between 1 and 2
    slope, errs = order_slope("dpm_solver_2m", shift)
    assert 1.1 < slope < 2.2 and errs[-1] < 2e-3, (slope, errs)


def test_time_grids_match_reference_schedules():
    # ImageNet samplers: t_k = k/N (then shifted); T2I flow DPM-Solver: σ grid of 'time_uniform_flow'
    assert torch.allclose(time_grid("euler", 4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    g = time_grid("flow_dpm-solver", 4, shift=3.0)
    sigmas = 1 - torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    sigmas = (3.0 * sigmas / (1 + 2.0 * sigmas)).flip(0)  # the reference's σ grid, from noise to data
    assert torch.allclose(g, 1 - sigmas)
    assert g[-1] == 1.0 and g[0] > 0


def test_cfg_interval_and_single_batched_forward():
    mu = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])  # row 0: class 0; row 1: the null class
    std = torch.tensor([[0.5, 0.5], [0.8, 0.8]])
    model = GaussianVelocity(mu, std)
    noise = make_noise([1, 2, 3], (2,))
    cond, uncond = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    cfg = SamplerConfig(name="euler", steps=10, cfg_scale=3.0, cfg_interval=(0.25, 0.75))
    out, calls = sample(model, noise, cond, uncond=uncond, cfg=cfg, return_calls=True)
    assert calls == 10 and len(model.calls) == 10
    for t, b in model.calls:  # guided (2B batch) strictly inside the interval only; boundaries 0.0 / 1.0 excluded
        assert b == (6 if 0.25 < t < 0.75 else 3), (t, b)
    assert [b for _, b in model.calls].count(6) == 5  # t = 0.3 .. 0.7
    # the result equals a hand-written Euler loop with the guided field
    ref_model = GaussianVelocity(mu, std)
    x = noise.clone()
    for k in range(10):
        t = torch.full((3,), k / 10)
        v_c = ref_model(x, t, cond)
        if 0.25 < k / 10 < 0.75:
            v_c = ref_model(x, t, uncond) + 3.0 * (v_c - ref_model(x, t, uncond))
        x = x + 0.1 * v_c
    assert torch.allclose(out, x, atol=1e-6)


def test_cfg_interval_boundary_is_strict():
    model = GaussianVelocity(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [1.0]]))
    cfg = SamplerConfig(name="euler", steps=4, cfg_scale=2.0, cfg_interval=(0.25, 0.75))
    sample(model, make_noise([0], (1,)), torch.zeros(1, dtype=torch.long), uncond=torch.ones(1, dtype=torch.long), cfg=cfg)
    assert model.calls == [(0.0, 1), (0.25, 1), (0.5, 2), (0.75, 1)]


def test_scale_one_never_evaluates_uncond():
    model = GaussianVelocity(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [1.0]]))
    sample(model, make_noise([0], (1,)), torch.zeros(1, dtype=torch.long), uncond=torch.ones(1, dtype=torch.long),
           cfg=SamplerConfig(name="dpm_solver_2m", steps=5, cfg_scale=1.0))
    assert [b for _, b in model.calls] == [1] * 5


@pytest.mark.parametrize("name,heun_exact,expected", [("euler", False, 7), ("heun", False, 7), ("heun", True, 13),
                                                       ("flow_dpm_solver", False, 7), ("dpm_solver_2m", False, 7)])
def test_model_calls_per_run(name, heun_exact, expected):
    model = GaussianVelocity(MU, STD)
    _, calls = sample(model, make_noise([0], (4,)), torch.zeros(1, dtype=torch.long),
                      cfg=SamplerConfig(name=name, steps=7, heun_exact=heun_exact), return_calls=True)
    assert calls == expected


def test_per_image_seeds_independent_of_batch():
    model = GaussianVelocity(MU, STD)
    cfg = SamplerConfig(name="dpm_solver_2m", steps=6, shift=3.0)
    big = sample(model, make_noise([7, 8, 9], (4,)), torch.zeros(3, dtype=torch.long), cfg=cfg)
    one = sample(model, make_noise([8], (4,)), torch.zeros(1, dtype=torch.long), cfg=cfg)
    assert torch.equal(make_noise([8], (4,))[0], make_noise([1, 8], (4,))[1])
    assert torch.allclose(big[1], one[0], atol=1e-6)
    assert not torch.allclose(big[0], big[1])


def test_bfloat16_runs_under_autocast():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.seen = []

        def forward(self, x, t, cond, mask=None):
            y = self.lin(x)
            self.seen.append(y.dtype)
            return y

    m = Lin()
    out = sample(m, make_noise([0, 1], (4,)), torch.zeros(2, dtype=torch.long),
                 cfg=SamplerConfig(name="euler", steps=3, dtype="bfloat16"))
    assert out.dtype == torch.float32 and set(m.seen) == {torch.bfloat16}


def test_bad_sampler_name():
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerConfig(name="ddim")
