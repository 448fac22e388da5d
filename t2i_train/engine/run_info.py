"""What an EMA export needs to be sampled without guesswork: `export/<name>/run_info.json`.

    {"text": {"encoder": "<path|hub id|hash:N>", "max_length": N, "chi_prompt": "<instruction>" | null,
              "use_mask": bool} | null,
     "resolution": [H, W], "resolutions": [[H, W], ...],
     "sampler": {"name", "steps", "shift", "cfg_scale", "cfg_interval": [lo, hi]}}

The sampler block is the run's validation sampler (the settings its `val/` grids were drawn with) at the
run's training shift. `t2i_train.models.io.load_run_info(path)` reads it; `t2i-sample` uses it by default.
"""
from __future__ import annotations

DEFAULT_LOADER_RESOLUTION = 512  # data_pipeline.loader.ShardLoader's default


def training_resolutions(cfg) -> tuple[list[int], list[list[int]]]:
    """([H, W] of the base resolution, every [H, W] the run trains on) for a TrainConfig."""
    if cfg.data.source == "fixed":
        side = int(cfg.data.fixed_image_size)
        return [side, side], [[side, side]]
    from data_pipeline.buckets import BucketSpec

    loader = cfg.data.loader
    side = int(loader.get("resolution", loader.get("image_size", DEFAULT_LOADER_RESOLUTION)))
    mode = loader.get("bucket_mode") or ("multi" if loader.get("multi_scale") else "fixed")
    spec = BucketSpec(mode, side, table=loader.get("bucket_table"))
    return [side, side], sorted([h, w] for h, w in dict.fromkeys(spec.buckets))


def text_encoder_name(cfg) -> str | None:
    """The encoder that produced the run's text conditions: `text.encoder`, or the one recorded with the
    dataset's cached embeddings (`t2i-encode-text` writes it into null_text_emb.safetensors)."""
    if cfg.text.encoder:
        return cfg.text.encoder
    datasets = cfg.data.loader.get("datasets") or cfg.data.loader.get("path") or []
    first = datasets[0] if isinstance(datasets, list) and datasets else datasets
    first = first.get("path") if isinstance(first, dict) else first
    if not first:
        return None
    from pathlib import Path

    from t2i_train.text.cache import NULL_NAME

    null_file = Path(first) / NULL_NAME
    if not null_file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(null_file), "pt") as f:
        return (f.metadata() or {}).get("text_encoder")


def run_info_chi(text_info: dict) -> str | None:
    """The instruction the run prepended to its captions; exports written before it was recorded used the default."""
    from t2i_train.text import CHI_PROMPT

    return text_info["chi_prompt"] if "chi_prompt" in text_info else CHI_PROMPT


def build_run_info(cfg, model_config: dict) -> dict:
    resolution, resolutions = training_resolutions(cfg)
    text = None
    if model_config.get("arch") == "t2i":
        from t2i_train.engine.text_adapter import chi_prompt

        text = {"encoder": text_encoder_name(cfg),
                "max_length": int(min(cfg.text.max_length, model_config.get("txt_len", cfg.text.max_length))),
                "chi_prompt": chi_prompt(cfg.text.chi), "use_mask": bool(cfg.text.use_mask)}
    log = cfg.logging
    sampler = {"name": log.val_sampler, "steps": int(log.val_steps), "shift": float(cfg.objective.shift),
               "cfg_scale": float(log.val_cfg_scale), "cfg_interval": [0.0, 1.0]}
    return {"text": text, "resolution": resolution, "resolutions": resolutions, "sampler": sampler}
