"""CAME: the single-process optimiser follows the per-tensor algorithm of the T2I reference (t2i/diffusion/utils/
optimizer.py `CAMEWrapper`, commit 4225ca5), and its sharded forms — FSDP2 dim-0 DTensor shards and DeepSpeed
ZeRO-1/2 style fragments of a flat partition that cut rows in half — give the same parameters on 2 gloo ranks.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t2i_train.engine.optim import CAME, FlatSegment

SHAPES = [(37, 23), (8, 6, 1, 1), (4, 3, 3, 3), (23,), (1, 5)]  # linear, 1x1 conv, 3x3 conv, bias, one row
STEPS = 6
LR, BETAS, EPS = 1e-2, (0.9, 0.999, 0.9999), (1e-30, 1e-16)
SHARDED_ATOL = 2e-6  # measured max |Δp| 3.6e-7, one float32 ulp at |p| ≈ 2 (order of the row/column sums)


def initial_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grads_at(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * (1 + step) for s in SHAPES]


def per_tensor_came(params: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """The algorithm written out for whole tensors: the specification the optimiser is checked against."""
    b1, b2, b3 = BETAS
    params = [p.clone() for p in params]
    state = [dict(m=torch.zeros_like(p)) for p in params]
    for step in range(steps):
        for p, g, st in zip(params, grads_at(step), state):
            factored = p.dim() == 2 or p.dim() == 4 and p.shape[2:] == (1, 1)
            sq = g * g + EPS[0]
            if factored:
                m2 = sq.reshape(p.shape[0], p.shape[1])
                st["r"] = st.get("r", torch.zeros(p.shape[0])) * b2 + (1 - b2) * m2.mean(1)
                st["c"] = st.get("c", torch.zeros(p.shape[1])) * b2 + (1 - b2) * m2.mean(0)
                v = torch.outer(st["r"] / st["r"].mean(), st["c"]).reshape(p.shape)
            else:
                st["v"] = st.get("v", torch.zeros_like(p)) * b2 + (1 - b2) * sq
                v = st["v"]
            u = g / v.sqrt()
            u = u / max(1.0, float(u.pow(2).mean().sqrt()))
            st["m"] = b1 * st["m"] + (1 - b1) * u
            if factored:
                res = ((u - st["m"]) ** 2 + EPS[1]).reshape(p.shape[0], p.shape[1])
                st["rr"] = st.get("rr", torch.zeros(p.shape[0])) * b3 + (1 - b3) * res.mean(1)
                st["rc"] = st.get("rc", torch.zeros(p.shape[1])) * b3 + (1 - b3) * res.mean(0)
                conf = torch.outer(st["rr"] / st["rr"].mean(), st["rc"]).reshape(p.shape)
                p -= LR * st["m"] / conf.sqrt()
            else:
                p -= LR * st["m"]
    return params


def run_single(steps: int = STEPS) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in initial_params()]
    opt = CAME(params, lr=LR, betas=BETAS, eps=EPS)
    for step in range(steps):
        for p, g in zip(params, grads_at(step)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def test_single_process_came_is_per_tensor_came():
    got, want = run_single(), per_tensor_came(initial_params(), STEPS)
    for g, w, s in zip(got, want, SHAPES):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), (s, float((g - w).abs().max()))
    assert max(float((g - p).abs().max()) for g, p in zip(got, initial_params())) > 3 * LR  # it moved


# ---------------------------------------------------------------------------- 2 ranks


def _fsdp_style(rank: int) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in initial_params()]
    opt = CAME(params, lr=LR, betas=BETAS, eps=EPS)
    for step in range(STEPS):
        for p, g in zip(params, grads_at(step)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    return [p.full_tensor().detach() for p in params]


def _zero_style(rank: int) -> list[torch.Tensor]:
    """A flat fp32 partition per rank over all parameters concatenated, as DeepSpeed ZeRO-1/2 lays them out."""
    sizes = [int(torch.Size(s).numel()) for s in SHAPES]
    total = sum(sizes)
    part = (total + 1) // 2  # the rank boundary cuts a row of the first matrix (test_zero_fragments_cut_a_row)
    lo, hi = rank * part, min((rank + 1) * part, total)
    flat_full = torch.cat([p.reshape(-1) for p in initial_params()])
    flat = torch.nn.Parameter(torch.zeros(part))
    flat.data[: hi - lo] = flat_full[lo:hi]
    segments, offset = [], 0
    for shape, n in zip(SHAPES, sizes):
        a, b = max(offset, lo), min(offset + n, hi)
        segments.append(FlatSegment(shape, a - lo, a - offset, b - a) if a < b else FlatSegment(shape))
        offset += n
    opt = CAME([flat], lr=LR, betas=BETAS, eps=EPS)
    opt.use_flat_partitions([(flat, segments)], None)
    for step in range(STEPS):
        g_full = torch.cat([g.reshape(-1) for g in grads_at(step)])
        flat.grad = torch.zeros(part)
        flat.grad[: hi - lo] = g_full[lo:hi]
        opt.step()
    pieces = [torch.zeros(part) for _ in range(2)]
    dist.all_gather(pieces, flat.detach())
    out = torch.cat(pieces)[:total]
    return [t.reshape(s) for t, s in zip(out.split(sizes), SHAPES)]


def _worker(rank: int, port: int, result_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fsdp, zero = _fsdp_style(rank), _zero_style(rank)
        if rank == 0:
            torch.save({"fsdp": fsdp, "zero": zero}, os.path.join(result_dir, "out.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("came_sharded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    return torch.load(out / "out.pt", weights_only=True)


@pytest.mark.parametrize("layout", ["fsdp", "zero"])
def test_sharded_came_equals_single_process(sharded, layout):
    ref = run_single()
    for got, want, shape in zip(sharded[layout], ref, SHAPES):
        diff = float((got - want).abs().max())
        assert diff < SHARDED_ATOL, f"{layout} {shape}: max |Δ| {diff:.3g}"


def test_zero_fragments_cut_a_row():
    # the test above is only meaningful if a rank boundary falls in the middle of a matrix row
    sizes = [int(torch.Size(s).numel()) for s in SHAPES]
    part = (sum(sizes) + 1) // 2
    assert part < sizes[0] and part % SHAPES[0][1] != 0
