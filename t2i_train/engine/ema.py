"""Exponential moving average of the weights, kept in fp32 by each rank for its own shard only.

A "view" gives, for each parameter, the tensor this rank owns: the whole parameter (single process), a flat
slice of it (DDP, where parameters are replicated), the fragment of DeepSpeed's fp32 master copy this rank
holds (ZeRO-1/2), DeepSpeed's ZeRO-3 fp32 partition, or the local shard of an FSDP2 DTensor. `full_state_dict()` gathers the shards (a collective: call it on every
rank) and returns full tensors on rank 0 (None elsewhere); it is the only place the EMA is ever whole.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import dist as d


class ShardedEMA:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], mode: str):
        if mode not in ("full", "flat_slice", "ds_partition", "hp_fragment", "dtensor"):
            raise ValueError(f"unknown EMA shard mode {mode!r}")
        self.mode = mode
        self.params = dict(named_params)
        self.world, self.rank = d.world_size(), d.rank()
        self.shadow: dict[str, torch.Tensor] = {n: self._local(p).detach().float().clone()
                                                for n, p in self.params.items()}

    # ---- this rank's piece of a parameter
    def _chunk(self, numel: int) -> int:
        return math.ceil(numel / self.world)

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            return p.data
        if self.mode == "dtensor":
            return p.data.to_local() if hasattr(p.data, "to_local") else p.data
        if self.mode == "ds_partition":
            return self._ds_partition(p)
        if self.mode == "hp_fragment":
            # ZeRO-1/2: this rank's piece of DeepSpeed's fp32 master copy (empty if it owns none of p)
            mapping = getattr(p, "_hp_mapping", None)
            return mapping.get_hp_fragment() if mapping is not None else p.data.new_zeros(0, dtype=torch.float32)
        flat = p.data.reshape(-1)
        c = self._chunk(flat.numel())
        return flat[self.rank * c: (self.rank + 1) * c]

    @staticmethod
    def _ds_partition(p: torch.Tensor) -> torch.Tensor:
        # Prefer ZeRO-3's fp32 master partition (under bf16 the module's ds_tensor is only its rounded copy);
        # fall back to ds_tensor where the optimizer holds no master copy of this parameter.
        lp = p.ds_tensor.data
        owner = getattr(p, "_z3_optimizer", None)
        if owner is not None and p.requires_grad:
            hp = owner.get_local_fp32_param(p)
            if hp is not None and hp.numel() == lp.numel():
                return hp.reshape(lp.shape)
        return lp

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(self._local(p).float(), 1.0 - decay)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].copy_(self._local(p).float())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for n, t in self.shadow.items():
            src = state[n]
            if src.shape != t.shape:
                raise ValueError(f"EMA shard of {n} has shape {tuple(src.shape)}, expected {tuple(t.shape)} "
                                 "(resume with the same backend and world size)")
            t.copy_(src)

    # ---- gathering (collective)
    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        out = {}
        for n, p in self.params.items():
            shard = self.shadow[n]
            if self.mode == "hp_fragment":
                # fragments are disjoint and cover p: place ours, sum over ranks
                full = torch.zeros(p.numel(), dtype=shard.dtype, device=shard.device)
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:
                    a = mapping.lp_fragment_address
                    full[a.start: a.start + a.numel] = shard
                if self.world > 1:
                    dist.all_reduce(full)
                full = full.reshape(p.shape)
            elif self.mode == "full" or self.world == 1 and self.mode != "ds_partition":
                full = shard.reshape(p.shape) if self.mode == "flat_slice" else shard
            elif self.mode == "dtensor":
                from torch.distributed.tensor import DTensor

                full = DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride()).full_tensor()
            else:
                numel = p.ds_numel if self.mode == "ds_partition" else p.numel()
                shape = p.ds_shape if self.mode == "ds_partition" else p.shape
                c = shard.numel() if self.mode == "ds_partition" else self._chunk(numel)
                padded = shard.new_zeros(c)
                padded[: shard.numel()] = shard
                parts = [torch.empty_like(padded) for _ in range(self.world)] if self.world > 1 else [padded]
                if self.world > 1:
                    dist.all_gather(parts, padded)
                full = torch.cat(parts)[:numel].reshape(shape)
            if d.is_main():
                out[n] = full.detach().cpu().clone()
        return out if d.is_main() else None
