"""Process-group set-up and the few collectives the trainer needs (works under deepspeed, torchrun, or alone)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def pick_device(kind: str = "auto") -> torch.device:
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    dev = torch.device("cuda", local_rank())
    torch.cuda.set_device(dev)
    return dev


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, backend: str = "auto", use_deepspeed: bool = False,
                     needs_group: bool = False) -> None:
    """Join the process group the launcher described in the environment (RANK/WORLD_SIZE/MASTER_ADDR).

    Started without a launcher, backends that need a process group (FSDP2, DDP, DeepSpeed) get a 1-rank one.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        if not (needs_group or use_deepspeed):
            return
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        _announce_cpu_op_build()
        silence_deprecated_all_gather()
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=30))
    else:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def _announce_cpu_op_build() -> None:
    """DeepSpeed's CPU accelerator compiles its shared-memory communication op on first use: say so first."""
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        if get_accelerator().device_name() != "cpu":
            return
        name = get_accelerator().create_op_builder("ShareMemCommBuilder").name
        built = os.path.exists(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))
    except Exception:  # only a message: never stop a run for it
        return
    if not built and local_rank() == 0:
        print("[t2i-train] building DeepSpeed's CPU communication op (first run on this machine, about a minute)",
              flush=True)


def silence_deprecated_all_gather() -> None:
    """DeepSpeed's comm layer calls torch.distributed.all_gather_into_tensor, which this torch marks deprecated
    with a FutureWarning on every ZeRO step; the call is DeepSpeed's to change, the warning is noise here."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small tensor (returned on the same device)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (small picklable objects only)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Destroy the process group after collecting garbage: engines and tensors that the communication backend's
    threads still reference are freed while the group and the interpreter are fully alive (left to
    interpreter exit, gloo's worker threads can abort the process: "terminate called without an active
    exception")."""
    import gc

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
