"""Relative paths in a run config, and the check that the local ones exist before anything starts.

The rule: a relative path is resolved against the directory the command runs in, whether it comes from the
YAML file or from a `key=value` override — as any path typed on a command line (and as torchtitan and
DeepSpeed treat theirs). Only `extends:` is relative to the YAML file that names it (it is part of the file).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from t2i_train.config import ConfigError, TrainConfig

_REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)|[{}]")  # pipe: commands, URLs, brace ranges


def explain(value: str) -> str:
    """`value` and, when it is relative, what it was resolved against."""
    if os.path.isabs(value):
        return value
    return f"{value} (relative paths are resolved against the current directory {Path.cwd()})"


def dataset_paths(loader: dict) -> list[tuple[str, str]]:
    """(config key, local path) of every dataset directory named in `data.loader`."""
    datasets = loader.get("datasets", loader.get("path"))
    if datasets is None:
        return []
    key = "data.loader.datasets" if "datasets" in loader else "data.loader.path"
    out = []
    for i, ds in enumerate(datasets if isinstance(datasets, list) else [datasets]):
        item = f"{key}[{i}]" if isinstance(datasets, list) else key
        if isinstance(ds, dict):
            if ds.get("path") is not None:
                out.append((f"{item}.path", str(ds["path"])))
            if ds.get("index") is not None and not _REMOTE.search(str(ds["index"])):
                out.append((f"{item}.index", str(ds["index"])))
        elif not _REMOTE.search(str(ds)):
            out.append((item, str(ds)))
    return out


def check_local_paths(cfg: TrainConfig, resuming: bool) -> None:
    """ConfigError naming the first local path the run needs that does not exist."""
    need = [] if cfg.data.source != "loader" else dataset_paths(cfg.data.loader)
    if cfg.model.init_from and not resuming:
        need.append(("model.init_from", cfg.model.init_from))
    if cfg.backend.name == "deepspeed" and cfg.backend.deepspeed_config:
        need.append(("backend.deepspeed_config", cfg.backend.deepspeed_config))
    for key, value in need:
        if not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: {explain(value)} does not exist")
