"""Generate docs/CONFIG.md, the reference of every run-config key, from the dataclasses in t2i_train.config.

    python -m t2i_train.config_docs docs/CONFIG.md     # rewrite the reference (run after adding a key)
    python -m t2i_train.config_docs --check docs/CONFIG.md

Types and defaults come from the dataclass fields; the meaning of a key is its inline `# comment` in
t2i_train/config.py, or else the entry in MEANINGS below.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path

from . import config as C

MEANINGS = {
    "run.name": "run directory name under run.output_dir",
    "run.output_dir": "parent of the run directory",
    "run.seed": "seed of the initial weights, the data order and the objective's noise",
    "run.max_steps": "optimizer steps to train (a resumed run continues up to this step)",
    "run.task": "t2i (text-to-image) or c2i (class-conditional ImageNet)",
    "model.overrides": "model config keys that replace the preset's (e.g. {depth: 4})",
    "model.activation_checkpointing": "recompute each block's activations in backward (less memory, ~30% slower)",
    "objective.timestep_sampling": "training time distribution",
    "objective.logit_mean": "logit-normal time sampling: mean",
    "objective.logit_std": "logit-normal time sampling: standard deviation",
    "objective.shift": "time shift s: t → t / (t + (1 − t)·s) (SD3's shift; larger = noisier)",
    "objective.repa_weight": "REPA loss weight λ (0 disables REPA)",
    "objective.repa_block": "patch block (1-based) whose tokens REPA aligns with DINOv2",
    "objective.repa_projector_dim": "REPA projector width (null: the model's hidden size)",
    "objective.repa_encoder": "DINOv2 teacher: local file or hub id",
    "text.max_length": "text tokens per caption (Gemma-2: 300)",
    "text.use_mask": "pass the text padding mask to the denoiser (released weights were trained without)",
    "optim.name": "optimizer: adamw or came (the released T2I recipe)",
    "optim.lr": "peak learning rate",
    "optim.betas": "2 betas (adamw) or 3 (came)",
    "optim.eps": "1 eps (adamw) or 2 (came)",
    "optim.weight_decay": "decoupled weight decay",
    "optim.warmup_steps": "linear warm-up steps",
    "optim.step_downs": "list of {step, lr, clip}: from `step` on, use this lr and/or clip",
    "optim.step_downs[].step": "first step of the new lr / clip",
    "optim.step_downs[].lr": "new learning rate (null: unchanged)",
    "optim.step_downs[].clip": "new gradient clip (null: unchanged)",
    "backend.name": "distributed backend",
    "backend.zero_stage": "DeepSpeed ZeRO stage",
    "backend.precision": "bf16 autocast (fp32 master weights) or fp32",
    "backend.grad_accum": "micro-batches accumulated per optimizer step",
    "backend.device": "auto: CUDA when available, else CPU",
    "backend.dist_backend": "process-group backend (auto: nccl on CUDA, gloo on CPU)",
    "ema.enabled": "keep an fp32 EMA of the weights (exported to export/ema)",
    "ema.decay": "EMA decay per step",
    "checkpoint.every": "steps between full training-state checkpoints",
    "checkpoint.keep_last": "checkpoints kept (older ones are deleted)",
    "logging.report_to": "metrics sink besides metrics.jsonl",
    "logging.wandb_mode": "wandb offline (default) or online",
    "logging.wandb_project": "wandb project name",
    "logging.every": "steps between metric records",
    "logging.tqdm": "progress bar on the console",
    "logging.timestep_buckets": "loss is also logged per time bucket (this many equal buckets of t)",
    "logging.val_steps": "sampler steps of the validation grid",
    "logging.val_cfg_scale": "CFG scale of the validation grid",
    "logging.val_image_size": "validation image side (null: the training resolution)",
    "logging.val_sampler": "sampler of the validation grid",
    "spike_guard.enabled": "skip non-finite or outlying updates; roll back after max_consecutive",
    "extends": "base YAML, relative to this file (merged first)",
}


def field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` → {name: comment}, read from the class source."""
    out = {}
    src = inspect.getsource(cls)
    tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.line.strip()
        m = re.match(r"(\w+)\s*:", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return ""
    else:
        return "required"
    return json.dumps(value, ensure_ascii=False)


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            continue
        meaning = comments.get(f.name) or MEANINGS.get(key, "")
        out.append((key, type_name(tp), default_of(f), meaning))
        if item is not None and dataclasses.is_dataclass(item):
            out += rows(item, f"{key}[].")
    return out


def render() -> str:
    lines = ["# Run configuration keys", "",
             "Generated from the dataclasses in `t2i_train/config.py` by "
             "`python -m t2i_train.config_docs docs/CONFIG.md`; do not edit by hand.", "",
             "A run is one YAML file (`t2i-train --config FILE`) plus `key.sub=value` overrides (values parsed as "
             "YAML). Unknown keys and bad values are errors naming the key. `extends: base.yaml` merges a base "
             "file first.", "",
             "Relative paths (`run.output_dir`, `model.init_from`, `data.loader.datasets`, "
             "`backend.deepspeed_config`, local `text.encoder` / `objective.repa_encoder` directories) are "
             "resolved against the directory the command is run from, whether they come from the YAML or from "
             "an override — as any path typed on a command line; only `extends:` is relative to the YAML file "
             "that names it. The run directory's `config.yaml` records the absolute paths.", ""]
    top = typing.get_type_hints(C.TrainConfig)
    plain = []
    for f in dataclasses.fields(C.TrainConfig):
        tp = top[f.name]
        if not dataclasses.is_dataclass(tp):
            plain.append(f)
            continue
        doc = (inspect.getdoc(tp) or "").split("\n")[0]
        lines += [f"## `{f.name}`", ""] + ([doc, ""] if doc and not doc.startswith(tp.__name__ + "(") else [])
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | `{d}` | {m} |" if d else f"| `{k}` | {t} | | {m} |"
                  for k, t, d, m in rows(tp, f"{f.name}.")]
        lines.append("")
    if plain:
        lines += ["## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t} | `{d}` | {m} |" for k, t, d, m in rows_top(plain, top)]
        lines.append("")
    return "\n".join(lines)


def rows_top(fields, hints) -> list[tuple[str, str, str, str]]:
    comments = field_comments(C.TrainConfig)
    return [(f.name, type_name(hints[f.name]), default_of(f), comments.get(f.name) or MEANINGS.get(f.name, ""))
            for f in fields]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t2i_train.config_docs", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out", nargs="?", default="docs/CONFIG.md", help="the file to write (or check)")
    ap.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = ap.parse_args(argv)
    text, path = render(), Path(args.out)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date: run python -m t2i_train.config_docs {path}", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
