"""Distributed backends behind one small interface, so the trainer loop never knows which one runs.

    backend.forward(**inputs) -> dict          (autocast bf16 where configured)
    backend.backward(loss, boundary, poison)   (poison: make this accumulation cycle's update be skipped)
    backend.step(lr, clip) -> (grad_norm, applied)   (global-norm clip; non-finite norm or poison = no update)
    backend.save(dir) / backend.load(dir)      (native format: torch.save | DCP | DeepSpeed)
    backend.ema_params() -> (named parameters, EMA shard mode)

`TrainModule` holds the denoiser and the objective (whose REPA projector trains with it) so that every backend
wraps one module and sees every trainable parameter.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from . import dist as d
from .optim import build_optimizer
from .safe_load import SafeFileSystemReader, WeightsOnlyLoadPlanner, weights_only_engine

WEIGHTS_ONLY = dict(weights_only=True)


class TrainModule(nn.Module):
    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images, cond, mask=None, generator=None):
        return self.objective.loss(self.model, images, cond, mask, generator=generator)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def _as_float(x) -> float:
    if x is None:
        return float("nan")
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


class Backend:
    name = "base"

    def __init__(self, cfg, module: TrainModule, device: torch.device):
        self.cfg = cfg
        self.raw = module
        self.device = device
        self.precision = cfg.backend.precision
        self.accum = cfg.backend.grad_accum
        self._poisoned = False

    # the module that is called (DDP / DeepSpeed wrap it; single and FSDP2 use it in place)
    wrapped: nn.Module

    def forward(self, **inputs):
        with _autocast(self.device, self.precision):
            return self.wrapped(**inputs)

    def backward(self, loss: torch.Tensor, boundary: bool, poison: bool = False) -> None:
        # a poisoned micro-batch still runs backward so that the collectives stay in step on every rank;
        # its cycle's update is discarded in step()
        self._poisoned |= poison
        (loss / self.accum).backward()

    def trainable(self):
        return [p for p in self.raw.parameters() if p.requires_grad]

    def step(self, lr: float, clip: float) -> tuple[float, bool]:
        params = self.trainable()
        norm = _as_float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"),
                                                         foreach=False))
        applied = not self._poisoned and math.isfinite(norm)
        if applied:
            _set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._poisoned = False
        return norm, applied

    def ema_params(self):
        return list(self.raw.model.named_parameters()), "full"

    def save(self, ckpt_dir: Path) -> None:
        if d.is_main():
            torch.save({"module": self.raw.state_dict(), "optim": self.optimizer.state_dict()},
                       ckpt_dir / "state.pt")

    def load(self, ckpt_dir: Path) -> None:
        state = torch.load(ckpt_dir / "state.pt", map_location=self.device, **WEIGHTS_ONLY)
        self.raw.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optim"])

    def close(self) -> None:
        """Release what the backend holds beyond Python references (nothing, except under DeepSpeed)."""


class SingleBackend(Backend):
    name = "single"

    def __init__(self, cfg, module, device):
        super().__init__(cfg, module, device)
        self.raw.to(device)
        self.wrapped = self.raw
        self.optimizer = build_optimizer(self.trainable(), cfg.optim)


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, cfg, module, device):
        super().__init__(cfg, module, device)
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.raw.to(device)
        # the MM-DiT's last text-stream outputs feed nothing: some parameters get no gradient
        self.wrapped = DDP(self.raw, device_ids=[device.index] if device.type == "cuda" else None,
                           find_unused_parameters=True)
        self.optimizer = build_optimizer(self.trainable(), cfg.optim)

    def backward(self, loss, boundary, poison=False):
        with contextlib.nullcontext() if boundary else self.wrapped.no_sync():
            super().backward(loss, boundary, poison)

    def ema_params(self):
        return list(self.raw.model.named_parameters()), "flat_slice"


class FSDPBackend(Backend):
    """PyTorch FSDP2: `fully_shard` per transformer block, then the root; bf16 compute with fp32 reduction."""

    name = "fsdp"

    def __init__(self, cfg, module, device):
        super().__init__(cfg, module, device)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.raw.to(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        for unit in self.raw.model.shard_units():
            fully_shard(unit, mp_policy=mp)
        fully_shard(self.raw, mp_policy=mp)
        self.wrapped = self.raw
        self.optimizer = build_optimizer(self.trainable(), cfg.optim)

    def backward(self, loss, boundary, poison=False):
        self.raw.set_requires_gradient_sync(boundary)
        super().backward(loss, boundary, poison)

    def ema_params(self):
        return list(self.raw.model.named_parameters()), "dtensor"

    def save(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.raw, self.optimizer)
        dcp.save({"module": msd, "optim": osd}, checkpoint_id=str(ckpt_dir / "dcp"))

    def load(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        msd, osd = get_state_dict(self.raw, self.optimizer)
        _drop_state_not_saved(osd, ckpt_dir / "dcp")
        state = {"module": msd, "optim": osd}
        dcp.load(state, storage_reader=SafeFileSystemReader(ckpt_dir / "dcp"), planner=WeightsOnlyLoadPlanner())
        set_model_state_dict(self.raw, state["module"])
        set_optimizer_state_dict(self.raw, self.optimizer, state["optim"], options=StateDictOptions(strict=False))


def _drop_state_not_saved(osd: dict, dcp_dir: Path) -> None:
    """Forget the optimizer state of parameters the checkpoint has none for.

    `get_state_dict` gives every parameter a (zero) optimizer state, but parameters that never received a
    gradient — the last T2I block's text-stream outputs feed nothing, yet they stay in the model because the
    released checkpoints carry them — have none in a saved run. The optimizer keeps no state for them either
    after loading, exactly as in an uninterrupted run. Model weights stay strict.
    """
    saved = SafeFileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    prefixes = {k.rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    for fqn in list(osd.get("state", {})):
        if f"optim.state.{fqn}" not in prefixes:
            del osd["state"][fqn]


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON, generated from our YAML or read from `backend.deepspeed_config` and checked."""
    b = cfg.backend
    ours = {
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.grad_accum,
        "train_batch_size": b.micro_batch * b.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": b.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": b.precision == "bf16"},
        "zero_allow_untested_optimizer": cfg.optim.name != "adamw",  # CAME is our own torch.optim.Optimizer
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if b.deepspeed_config is None:
        return ours
    path = Path(b.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"backend.deepspeed_config: {path} does not exist")
    theirs = json.loads(path.read_text())
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if k in theirs and theirs[k] != ours[k]:
            raise ValueError(f"{path}: {k} = {theirs[k]} contradicts the run config ({ours[k]})")
        theirs[k] = ours[k]
    theirs.setdefault("zero_allow_untested_optimizer", ours["zero_allow_untested_optimizer"])
    for k in ("optimizer", "scheduler"):
        if k in theirs:
            raise ValueError(f"{path}: remove '{k}'; the optimizer and schedule come from the run config")
    return theirs


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg, module, device):
        super().__init__(cfg, module, device)
        import deepspeed

        self.ds_config = deepspeed_config(cfg, d.world_size())
        self.stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        optimizer = build_optimizer(self.trainable(), cfg.optim)
        if self.stage == 3:
            # ZeRO-3 gathers a block's parameters as a whole when the block runs, like FSDP2's per-block units,
            # not submodule by submodule: the blocks' selective checkpointing takes weights from submodules it
            # does not call (models.recompute), and per-submodule hooks on fine-grained layers cost time anyway
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(self.raw, list(dict.fromkeys(type(u) for u in self.raw.model.shard_units())))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.raw, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.wrapped = self.engine
        if cfg.optim.name == "came":
            link_came_to_zero(optimizer, self.optimizer, self.stage)

    def backward(self, loss, boundary, poison=False):
        # DeepSpeed skips (and clears) an update whose gradient norm is not finite: a poisoned micro-batch
        # back-propagates NaN so that the whole accumulation cycle is discarded, on every rank alike.
        if poison:
            loss = loss * float("nan")
        self.engine.backward(loss)
        if not boundary:
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, lr, clip):
        _set_lr(self.optimizer, lr)
        if hasattr(self.optimizer, "clip_grad"):
            self.optimizer.clip_grad = clip
        self.engine._config.gradient_clipping = clip
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        return _as_float(self.engine.get_global_grad_norm()), applied

    def ema_params(self):
        named = list(self.raw.model.named_parameters())
        if self.stage == 3:
            return named, "ds_partition"
        # ZeRO-1/2 link each parameter to its fragment of the fp32 master copy: average that, not the bf16 copy
        if named and all(hasattr(p, "_hp_mapping") for _, p in named):
            return named, "hp_fragment"
        return named, "flat_slice"

    def save(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag="deepspeed", save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        weights_only_engine(self.engine)
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt_dir}")

    def close(self) -> None:
        # the engine's hooks, optimizer buffers and Python-GC hold, released while the process group still
        # exists: left to interpreter exit, their teardown can race the communication threads
        self.engine.destroy()


def link_came_to_zero(came, zero_optimizer, stage: int) -> None:
    """Tell CAME where each parameter's piece lies in every flat fp32 partition: ZeRO-1/2 from DeepSpeed's
    `_hp_mapping` fragment addresses, ZeRO-3 from each parameter's own partition (rank · partition size)."""
    from .optim import FlatSegment

    layout = []
    if stage == 3:
        group = zero_optimizer.sub_group_process_groups[0] if zero_optimizer.sub_group_process_groups else None
        rank = d.rank() if group is None else torch.distributed.get_rank(group)
        for flat, params in zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups):
            segments, offset = [], 0
            for p in params:
                part = p.partition_numel()
                start = rank * part
                segments.append(FlatSegment(tuple(p.ds_shape), offset, start, max(0, min(part, p.ds_numel - start))))
                offset += part
            layout.append((flat, segments))
    else:
        lp_groups = getattr(zero_optimizer, "bit16_groups", None) or getattr(zero_optimizer, "bf16_groups", None)
        if lp_groups is None:
            raise ValueError(f"CAME: {type(zero_optimizer).__name__} exposes no ZeRO parameter groups")
        group = getattr(zero_optimizer, "dp_process_group", None)
        for pg, lps in zip(came.param_groups, lp_groups):
            segments = []
            for lp in lps:
                m = getattr(lp, "_hp_mapping", None)
                segments.append(FlatSegment(tuple(lp.shape)) if m is None else FlatSegment(
                    tuple(lp.shape), m.hp_fragment_address.start, m.lp_fragment_address.start,
                    m.hp_fragment_address.numel))
            layout.append((pg["params"][0], segments))
    came.use_flat_partitions(layout, group)


BACKENDS = {"single": SingleBackend, "ddp": DDPBackend, "fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}


def build_backend(cfg, module: TrainModule, device: torch.device) -> Backend:
    if cfg.backend.name not in BACKENDS:
        raise ValueError(f"backend.name: {cfg.backend.name!r} is not one of {sorted(BACKENDS)}")
    if cfg.backend.name == "single" and d.world_size() > 1:
        raise ValueError(f"backend.name: 'single' runs one process, but the launcher started {d.world_size()}; "
                         "use ddp, fsdp or deepspeed")
    return BACKENDS[cfg.backend.name](cfg, module, device)
