"""Exported weights: `model.safetensors` + `config.json`, written atomically, read without pickle."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .pixeldit import PixelDiT

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
RUN_INFO_NAME = "run_info.json"  # how the weights were trained: text encoder, resolution(s), sampler


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state(state: dict[str, torch.Tensor], config: dict, out_dir: str | os.PathLike,
               metadata: dict | None = None) -> Path:
    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return out


def save_pretrained(model: PixelDiT, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    return save_state(model.state_dict(), model.export_config(), out_dir, metadata)


def save_run_info(out_dir: str | os.PathLike, info: dict) -> Path:
    path = Path(out_dir) / RUN_INFO_NAME
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(info, indent=2)))
    return path


def load_run_info(path: str | os.PathLike) -> dict:
    """`run_info.json` of an export directory (or of the directory of a .safetensors file); {} when absent."""
    p = Path(path)
    file = (p if p.is_dir() else p.parent) / RUN_INFO_NAME
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        weights, config = p / WEIGHTS_NAME, p / CONFIG_NAME
    elif p.suffix == ".safetensors":
        weights, config = p, p.parent / CONFIG_NAME
    else:
        raise ValueError(f"{p}: expected a directory with {WEIGHTS_NAME} and {CONFIG_NAME}, or a .safetensors "
                         "file with config.json beside it (convert official checkpoints with t2i-convert)")
    for f in (weights, config):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found")
    return weights, config


def load_pretrained(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
                    **config_overrides) -> PixelDiT:
    weights, config_file = _locate(path)
    config = json.loads(config_file.read_text())
    config.update(config_overrides)
    with torch.device("meta"):
        model = PixelDiT(**config)
    state = load_file(str(weights), device=str(device))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit the model of {config_file}: "
                         f"missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}")
    for name, ref in model.state_dict().items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ValueError(f"{weights}: key {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(ref.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()
