"""Optimisers: AdamW (torch) and CAME (confidence-guided adaptive memory-efficient optimisation, Luo et al. 2023).

CAME keeps Adafactor-style factored second moments (row and column statistics) for 2-D weights and 1x1 convs,
and a factored "instability" statistic of (update − momentum)² that scales the momentum. Hyper-parameters follow
the T2I reference (t2i/diffusion/utils/optimizer.py `CAMEWrapper`, commit 4225ca5): betas (0.9, 0.999, 0.9999),
eps (1e-30, 1e-16), update RMS clip 1.0, decoupled weight decay.

CAME is the same optimiser on every backend. Each parameter is seen through this rank's piece of it — the whole
tensor (single process, DDP), the dim-0 shard of an FSDP2 DTensor, or its segment of a DeepSpeed ZeRO-1/2/3 flat
fp32 partition (`use_flat_partitions`) — and the statistics that span a whole tensor (row and column means of
g² and of the instability, the update RMS) are summed over the data-parallel group, three all-reduces per step in
all. The factored statistics are full-size row/column vectors, identical on every rank holding a piece of the
parameter, so the update equals single-process per-tensor CAME to float tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _factored_shape(shape) -> Optional[tuple[int, int]]:
    """(rows, cols) of a linear weight or 1x1 conv, else None (the reference's `_get_options`)."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 1:
        return int(shape[0]), int(shape[1])
    return None


@dataclass
class FlatSegment:
    """Where this rank's piece of one parameter lies in a flat fp32 partition (numel 0: it holds none)."""

    shape: tuple  # the whole parameter's
    flat_start: int = 0  # offset in the flat partition
    param_start: int = 0  # offset in the flattened parameter
    numel: int = 0


@dataclass
class _Piece:
    """One parameter as this rank sees it: a flat local view at `start` of the flattened full tensor."""

    numel: int  # of the whole parameter
    factored: Optional[tuple[int, int]]
    group: dict  # its param group (lr, betas, eps, ...)
    sharded: bool  # statistics need an all-reduce over the process group
    start: int = 0
    param: Optional[torch.Tensor] = None  # flat local views; None where this rank holds none of the parameter
    grad: Optional[torch.Tensor] = None
    exp_avg: Optional[torch.Tensor] = None
    exp_avg_sq: Optional[torch.Tensor] = None  # unfactored only
    sq_row: Optional[torch.Tensor] = None  # factored only: full-size row / column statistics
    sq_col: Optional[torch.Tensor] = None
    res_row: Optional[torch.Tensor] = None
    res_col: Optional[torch.Tensor] = None

    @property
    def held(self) -> bool:
        return self.param is not None and self.param.numel() > 0

    def row_span(self) -> tuple[int, int, int]:
        """First row, end row and the piece's offset inside those rows."""
        cols = self.factored[1]
        r0 = self.start // cols
        r1 = (self.start + self.param.numel() - 1) // cols + 1
        return r0, r1, self.start - r0 * cols

    def as_rows(self, values: torch.Tensor) -> torch.Tensor:
        """The local flat `values` laid into the whole rows it touches (zeros outside), [r1 - r0, cols]."""
        r0, r1, off = self.row_span()
        cols = self.factored[1]
        if off == 0 and values.numel() == (r1 - r0) * cols:
            return values.view(r1 - r0, cols)
        buf = values.new_zeros((r1 - r0) * cols)
        buf[off: off + values.numel()] = values
        return buf.view(r1 - r0, cols)

    def expand(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """The outer product row ⊗ col restricted to this piece, flat."""
        r0, r1, off = self.row_span()
        full = (row[r0:r1, None] * col[None, :]).reshape(-1)
        return full[off: off + self.param.numel()]


class CAME(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                 clip_threshold: float = 1.0, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"CAME lr must be > 0, got {lr}")
        if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"CAME needs three betas in [0, 1], got {betas}")
        if len(eps) != 2:
            raise ValueError(f"CAME needs two eps values, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold,
                                      weight_decay=weight_decay))
        self._zero_layout: dict = {}  # id(flat fp32 partition) -> the FlatSegments of the parameters it covers
        self._zero_group = None
        self._process_group = None

    # ------------------------------------------------------------------ layouts
    def use_flat_partitions(self, layout: list, process_group) -> None:
        """DeepSpeed ZeRO: the optimizer's params are flat fp32 partitions. `layout`: (flat partition, the
        FlatSegment of every parameter of its group) pairs, the segments in the same order on every rank."""
        for flat, segments in layout:
            self._zero_layout[id(flat)] = list(segments)
        self._zero_group = process_group

    def _pieces_zero(self, group: dict, flat: torch.Tensor, segments: list) -> list[_Piece]:
        state = self.state[flat]
        shapes = [_factored_shape(sg.shape) for sg in segments]
        if not state:  # compact buffers: full-size row/column statistics only for the parameters held here
            n_rc = sum(sum(fs) for fs, sg in zip(shapes, segments) if fs is not None and sg.numel)
            n_sq = sum(sg.numel for fs, sg in zip(shapes, segments) if fs is None)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(flat)
            state["exp_avg_sq"] = flat.new_zeros(n_sq)
            state["exp_avg_sq_rc"] = flat.new_zeros(n_rc)
            state["exp_avg_res_rc"] = flat.new_zeros(n_rc)
        state["step"] += 1
        pieces, rc, sq = [], 0, 0
        for sg, fs in zip(segments, shapes):
            piece = _Piece(numel=math.prod(sg.shape), factored=fs, group=group, sharded=True)
            if sg.numel:
                a, n = sg.flat_start, sg.numel
                piece.start = sg.param_start
                piece.param, piece.grad = flat.narrow(0, a, n), flat.grad.narrow(0, a, n)
                piece.exp_avg = state["exp_avg"].narrow(0, a, n)
                if fs is None:
                    piece.exp_avg_sq = state["exp_avg_sq"].narrow(0, sq, n)
                    sq += n
                else:
                    r, c = fs
                    piece.sq_row, piece.sq_col = state["exp_avg_sq_rc"].narrow(0, rc, r), \
                        state["exp_avg_sq_rc"].narrow(0, rc + r, c)
                    piece.res_row, piece.res_col = state["exp_avg_res_rc"].narrow(0, rc, r), \
                        state["exp_avg_res_rc"].narrow(0, rc + r, c)
                    rc += r + c
            pieces.append(piece)
        return pieces

    def _init_state(self, p: torch.Tensor) -> dict:
        fs = _factored_shape(p.shape)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            if fs is None:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            else:  # replicated full-size vectors (plain tensors: identical on every rank)
                dev = _local(p).device
                for k, n in (("row", fs[0]), ("col", fs[1])):
                    state[f"exp_avg_sq_{k}"] = torch.zeros(n, device=dev)
                    state[f"exp_avg_res_{k}"] = torch.zeros(n, device=dev)
        return state

    def _piece(self, group: dict, p: torch.Tensor) -> _Piece:
        """A whole tensor, or this rank's dim-0 shard of an FSDP2 DTensor."""
        fs = _factored_shape(p.shape)
        state = self._init_state(p)
        state["step"] += 1
        local = _local(p)
        piece = _Piece(numel=p.numel(), factored=fs, group=group, sharded=hasattr(p, "device_mesh"),
                       param=local.view(-1), grad=_local(p.grad).reshape(-1),
                       exp_avg=_local(state["exp_avg"]).view(-1))
        if piece.sharded:
            piece.start = self._dtensor_offset(p)
        if fs is None:
            piece.exp_avg_sq = _local(state["exp_avg_sq"]).view(-1)
        else:
            piece.sq_row, piece.sq_col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            piece.res_row, piece.res_col = state["exp_avg_res_row"], state["exp_avg_res_col"]
        return piece

    def _dtensor_offset(self, p) -> int:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(not isinstance(pl, (Shard, Replicate)) or isinstance(pl, Shard) and pl.dim != 0
               for pl in p.placements) or p.device_mesh.ndim != 1:
            raise ValueError(f"CAME: parameter of shape {tuple(p.shape)} has placements {p.placements}; only "
                             "FSDP2's dim-0 sharding over a 1-D mesh is supported")
        if isinstance(p.placements[0], Replicate):
            raise ValueError("CAME: replicated DTensor parameters are not supported (use FSDP2's fully_shard)")
        group = p.device_mesh.get_group()
        if self._process_group is None:
            self._process_group = group
        elif self._process_group is not group:
            raise ValueError("CAME: all sharded parameters must share one process group")
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]) * (p.numel() // max(int(p.shape[0]), 1))

    def _pieces(self) -> list[_Piece]:
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                segments = self._zero_layout.get(id(p))
                if segments is not None:
                    if p.grad is not None:
                        pieces += self._pieces_zero(group, p, segments)
                elif p.grad is not None:
                    pieces.append(self._piece(group, p))
                else:  # no gradient this step: no update, but a state, so that every checkpoint has all keys
                    self._init_state(p)
        return pieces

    # ------------------------------------------------------------------ the collective sums
    def _all_reduce(self, buf: torch.Tensor) -> torch.Tensor:
        group = self._zero_group or self._process_group
        if buf.numel() and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(buf, group=group)
        return buf

    def _row_col_means(self, pieces: list[_Piece], values: list) -> list:
        """Per factored piece: (row mean, column mean) of `values` (flat, local) over the whole tensor."""
        device = next((p.param.device for p in pieces if p.param is not None), torch.device("cpu"))
        sums = []
        for piece, v in zip(pieces, values):
            r, c = piece.factored
            s = torch.zeros(r + c, device=device)
            if piece.held:
                r0, r1, _ = piece.row_span()
                m = piece.as_rows(v)
                s[r0:r1] = m.sum(dim=1)
                s[r:] = m.sum(dim=0)
            sums.append(s)
        sharded = [i for i, p in enumerate(pieces) if p.sharded]
        if sharded:
            flat = self._all_reduce(torch.cat([sums[i] for i in sharded]))
            for i, chunk in zip(sharded, flat.split([sums[i].numel() for i in sharded])):
                sums[i] = chunk
        out = []
        for piece, s in zip(pieces, sums):
            r, c = piece.factored
            out.append((s[:r] / c, s[r:] / r))
        return out

    @staticmethod
    def _approx(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (row / row.mean()).rsqrt(), col.rsqrt()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pieces = self._pieces()
        factored = [p for p in pieces if p.factored is not None]
        updates: dict[int, torch.Tensor] = {}

        # second moment of g² (factored: row/column means over the whole tensor)
        sq_vals = [p.grad.float().square() + p.group["eps"][0] if p.held else None for p in factored]
        for p, (row, col) in zip(factored, self._row_col_means(factored, sq_vals)):
            if p.held:
                b2 = p.group["betas"][1]
                p.sq_row.lerp_(row, 1 - b2)
                p.sq_col.lerp_(col, 1 - b2)
                updates[id(p)] = p.expand(*self._approx(p.sq_row, p.sq_col)) * p.grad.float()
        for p in pieces:
            if p.factored is None and p.held:
                g = p.grad.float()
                p.exp_avg_sq.lerp_(g.square() + p.group["eps"][0], 1 - p.group["betas"][1])
                updates[id(p)] = p.exp_avg_sq.rsqrt() * g

        # clip each tensor's update to RMS ≤ clip_threshold (sum of squares over the whole tensor)
        device = next((p.param.device for p in pieces if p.param is not None), torch.device("cpu"))
        zero = torch.zeros((), device=device)
        sumsq = torch.stack([updates[id(p)].square().sum() if p.held else zero for p in pieces]) if pieces else zero
        sharded = [i for i, p in enumerate(pieces) if p.sharded]
        if sharded:
            sumsq[sharded] = self._all_reduce(sumsq[sharded].clone())
        for i, p in enumerate(pieces):
            if p.held:
                rms = (sumsq[i] / p.numel).sqrt()
                updates[id(p)].div_((rms / p.group["clip_threshold"]).clamp(min=1.0))
                p.exp_avg.lerp_(updates[id(p)], 1 - p.group["betas"][0])

        # confidence: factored instability (update − momentum)² scales the momentum
        res_vals = [(updates[id(p)] - p.exp_avg).square() + p.group["eps"][1] if p.held else None for p in factored]
        for p, (row, col) in zip(factored, self._row_col_means(factored, res_vals)):
            if p.held:
                b3 = p.group["betas"][2]
                p.res_row.lerp_(row, 1 - b3)
                p.res_col.lerp_(col, 1 - b3)
                updates[id(p)] = p.expand(*self._approx(p.res_row, p.res_col)) * p.exp_avg
        for p in pieces:
            if p.held:
                u = updates[id(p)] if p.factored is not None else p.exp_avg
                lr, wd = p.group["lr"], p.group["weight_decay"]
                if wd != 0:
                    p.param.mul_(1 - wd * lr)
                p.param.add_(u.to(p.param.dtype), alpha=-lr)
        return loss


def build_optimizer(params, optim_cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW or CAME over `params` (an iterable of tensors or param groups); lr is set per step by the trainer."""
    lr = optim_cfg.lr if lr is None else lr
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps[0],
                                 weight_decay=optim_cfg.weight_decay, foreach=False)
    if optim_cfg.name == "came":
        return CAME(params, lr=lr, betas=tuple(optim_cfg.betas), eps=tuple(optim_cfg.eps),
                    weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"optim.name: {optim_cfg.name!r} is not one of 'adamw', 'came'")
