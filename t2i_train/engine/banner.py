"""What `t2i-train` says before its first step: the banner, and the config check of a resumed run.

A resumed run compares its config with the `config.yaml` its run directory was started with. Keys that only
say how long to run, how often to save and what to log may change; any other difference is listed and the run
refuses to start unless `run.allow_config_change=true` (a changed recipe under an old optimizer state is a
different experiment, and overwriting `config.yaml` would hide it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from t2i_train.config import ConfigError, TrainConfig, to_dict

# changing these on resume does not change what the run computes
RESUME_SAFE = ("run.max_steps", "run.allow_config_change", "run.debug_kill_at_step", "run.output_dir", "checkpoint.",
               "logging.")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key whose value differs."""
    a, b = flatten(saved), flatten(now)
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def check_resumed_config(saved_file: Path, cfg: TrainConfig) -> list[str]:
    """Lines describing what changed since the run's saved config; ConfigError when that is not allowed."""
    if not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    changes = config_changes(saved, now)
    show = lambda v: "(absent)" if not isinstance(v, (str, int, float, bool, list, dict, type(None))) else json.dumps(v)
    lines = [f"{k}: {show(old)} -> {show(new)}" for k, old, new in changes]
    unsafe = [k for k, _, _ in changes if not k.startswith(RESUME_SAFE)]
    if unsafe and not cfg.run.allow_config_change:
        raise ConfigError(f"resuming {saved_file.parent} with a config that differs from its {saved_file.name} in "
                          f"{', '.join(lines[i] for i, (k, _, _) in enumerate(changes) if k in unsafe)}; "
                          "restore those values, or pass run.allow_config_change=true to resume anyway")
    return lines


def dataset_size(cfg: TrainConfig) -> int | None:
    """Samples per epoch from the datasets' index.json files (None when a dataset has none, e.g. URLs)."""
    if cfg.data.source == "fixed":
        return cfg.data.fixed_num_samples
    datasets = cfg.data.loader.get("datasets") or cfg.data.loader.get("path") or []
    total = 0
    for ds in datasets if isinstance(datasets, list) else [datasets]:
        path = ds.get("path") if isinstance(ds, dict) else ds
        index = Path(str(path)) / "index.json" if path else None
        if index is None or not index.is_file():
            return None
        try:
            total += int(json.loads(index.read_text())["total"])
        except (ValueError, KeyError, TypeError):
            return None
    return total or None


def banner(cfg: TrainConfig, *, run_dir: Path, resumed_from: Path | None, step: int, backend: str, world_size: int,
           device, params: int, extra_params: int, global_batch: int) -> str:
    b, o = cfg.backend, cfg.optim
    if resumed_from is not None:
        start = f"resumed from {resumed_from} at step {step}"
    elif cfg.model.init_from:
        start = f"fresh start from the weights of {cfg.model.init_from}"
    else:
        start = "fresh start"
    spec = cfg.model.spec if isinstance(cfg.model.spec, str) else cfg.model.spec.get("arch", "custom")
    size = dataset_size(cfg)
    if size:
        data = (f"{size:,} samples, {size / global_batch:,.1f} steps per epoch; {cfg.run.max_steps:,} steps = "
                f"{cfg.run.max_steps * global_batch / size:,.2f} epochs")
    else:
        data = f"dataset size unknown (no index.json); {cfg.run.max_steps:,} steps"
    step_downs = "".join(f", step {s.step}: lr {s.lr if s.lr is not None else o.lr:g}" for s in o.step_downs)
    lines = [
        f"run dir    {run_dir} ({start})",
        f"backend    {backend}, world size {world_size}, device {device}, precision {b.precision}",
        f"model      {spec}: {params / 1e6:,.2f}M parameters"
        + (f" (+{extra_params / 1e6:,.2f}M REPA projector)" if extra_params else ""),
        f"data       {data}",
        f"batch      global {global_batch} = micro-batch {b.micro_batch} x accumulation {b.grad_accum} x "
        f"world size {world_size}",
        f"optimizer  {o.name}, lr {o.lr:g} (warm-up {o.warmup_steps} steps{step_downs}), clip {o.grad_clip:g}",
    ]
    return "\n".join(f"[t2i-train] {line}" for line in lines)
