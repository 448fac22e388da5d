"""Checks of a run config against this machine and the code, before any process group, model or data is built.

`check_run(cfg)` raises `ConfigError` naming the key for what the schema alone cannot see: an unknown model
preset or architecture key, a missing or malformed text encoder, data-loader keys and value types, the global
batch against the launcher's world size, a CUDA device that is not there. The trainer turns a `ConfigError` into
one `config error: ...` line and exit status 2.
"""
from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path

import torch

from t2i_train.config import ConfigError, TrainConfig, _coerce, check_global_batch
from t2i_train.engine.paths import explain

# build_loader's own keys and spellings besides ShardLoader's arguments
_LOADER_ALIASES = {"datasets", "path", "multi_scale", "image_size"}
_LOADER_MANAGED = {"rank", "world_size", "seed", "batch_size"}  # set by the trainer
_NON_NEGATIVE = ("num_workers", "shuffle_buffer", "prefetch_factor", "text_dropout", "clip_thr")


def check_device(cfg: TrainConfig) -> None:
    if cfg.backend.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend.device: 'cuda', but CUDA is not available on this machine "
                          "(use backend.device=auto or cpu)")


def check_model(cfg: TrainConfig) -> dict:
    from t2i_train.models.presets import model_config

    overrides = dict(cfg.model.overrides)
    if cfg.objective.repa_weight > 0:
        overrides.setdefault("repa_block", cfg.objective.repa_block)
    try:
        config = model_config(cfg.model.spec, **overrides)
        with torch.device("meta"):
            from t2i_train.models import build_model

            build_model(config)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ConfigError(f"model.spec: {e}") from e
    return config


def check_text_encoder(cfg: TrainConfig, model_config: dict) -> None:
    name = cfg.text.encoder
    t2i = "txt_dim" in model_config
    if not t2i:
        return
    if name is None:
        loader = cfg.data.loader
        if cfg.data.source == "loader" and not loader.get("use_text_emb", False):
            raise ConfigError("text.encoder: missing; the T2I model needs a text encoder for the captions "
                              "(e.g. a Gemma-2 directory) or cached features (data.loader.use_text_emb=true)")
        return
    if name.startswith("hash"):
        dim = name.split(":", 1)[1] if ":" in name else str(model_config["txt_dim"])
        if not dim.isdigit() or int(dim) != model_config["txt_dim"]:
            raise ConfigError(f"text.encoder: {name!r} must be hash:<dim> with dim = the model's text width "
                              f"{model_config['txt_dim']}")
        return
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(f"text.encoder: {name} is not a directory (give a local model directory, a hub id "
                          "like google/gemma-2-2b-it, or hash:<dim>)")


def check_loader(cfg: TrainConfig) -> None:
    if cfg.data.source != "loader":
        return
    from data_pipeline.loader import ShardLoader

    hints = typing.get_type_hints(ShardLoader.__init__)
    params = set(inspect.signature(ShardLoader.__init__).parameters) - {"self"}
    allowed = (params | _LOADER_ALIASES) - _LOADER_MANAGED
    loader = cfg.data.loader
    unknown = sorted(set(loader) - allowed)
    if unknown:
        raise ConfigError(f"unknown data.loader key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join('data.loader.' + k for k in unknown)}; allowed keys: {sorted(allowed)}")
    if not (loader.get("datasets") or loader.get("path")):
        raise ConfigError("data.loader.datasets: missing (a list of shard directories or {path, weight})")
    for key, value in loader.items():
        tp = hints.get(key)
        if tp in (int, float, str, bool) or typing.get_origin(tp) is typing.Union and \
                all(a in (int, float, str, bool, type(None)) for a in typing.get_args(tp)):
            _coerce(value, tp, f"data.loader.{key}")
    for key in _NON_NEGATIVE:
        if isinstance(loader.get(key), (int, float)) and loader[key] < 0:
            raise ConfigError(f"data.loader.{key}: must be >= 0, got {loader[key]}")
    for key in ("resolution", "image_size"):
        if isinstance(loader.get(key), int) and loader[key] <= 0:
            raise ConfigError(f"data.loader.{key}: must be > 0, got {loader[key]}")
    check_buckets(loader)
    datasets = loader.get("datasets") or loader.get("path")
    for i, entry in enumerate(datasets if isinstance(datasets, list) else [datasets]):
        where = entry.get("path") if isinstance(entry, dict) else entry
        local = isinstance(where, str) and not where.startswith("pipe:") and "://" not in where \
            and "{" not in where
        if local and not Path(where).expanduser().exists():
            raise ConfigError(f"data.loader.datasets[{i}]: {explain(where)} does not exist")


def check_buckets(loader: dict) -> None:
    from data_pipeline.buckets import BucketSpec

    mode = loader.get("bucket_mode", "multi" if loader.get("multi_scale") else "fixed")
    try:
        BucketSpec(mode, loader.get("resolution", loader.get("image_size", 512)), loader.get("crop", "center"),
                   table=loader.get("bucket_table"))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.loader (bucket_mode, resolution, crop): {e}") from e


def check_run(cfg: TrainConfig) -> None:
    check_device(cfg)
    check_global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    model_config = check_model(cfg)
    check_text_encoder(cfg, model_config)
    check_loader(cfg)
