"""Run configuration: one YAML file plus `key.sub=value` overrides, checked against a typed schema.

Every section is a dataclass; unknown keys and bad values raise `ConfigError` naming the key (dotted path)
and the allowed keys or values. `load_config(path, overrides)` returns a `TrainConfig`;
`to_dict(cfg)` gives the resolved plain dict that the trainer writes into the run directory.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # run directory = output_dir/name
    seed: int = 0
    max_steps: int = 1000
    task: Literal["t2i", "c2i"] = "t2i"
    debug_kill_at_step: Optional[int] = None  # testing aid: every rank SIGKILLs itself after this step
    allow_config_change: bool = False  # resume although the config differs from the run's saved config.yaml


@dataclass
class ModelConfig:
    spec: Any = "pixeldit_tiny_t2i"  # preset name or config dict (see t2i_train.models.build_model)
    overrides: dict = field(default_factory=dict)
    activation_checkpointing: Any = False  # per block: none | selective | full (true = full, false = none)
    compile: Optional[bool] = None  # regional torch.compile of the blocks; None: on for CUDA, off on CPU
    init_from: Optional[str] = None  # weights only: a save_pretrained directory or .safetensors (ignored on resume)
    # ... or an earlier stage's run directory, whose export/<init_weights> is loaded; with init_optimizer (raw
    # weights, same backend and world size) its latest checkpoint's optimiser state is carried over as well
    init_weights: Literal["ema", "raw"] = "ema"  # which export of an init_from run directory is loaded
    init_optimizer: bool = False  # also carry the optimiser state of init_from's last checkpoint (raw weights)


@dataclass
class ObjectiveConfig:
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    repa_weight: float = 0.0
    repa_block: int = 8
    repa_projector_dim: Optional[int] = None
    repa_encoder: Optional[str] = None
    repa_teacher_resolution: Optional[int] = None  # DINOv2 input side (T2I ref 224); None: the student's token grid
    cond_drop_prob: float = 0.1  # text drop (T2I) or class drop (ImageNet) for classifier-free guidance


@dataclass
class TextConfig:
    encoder: Optional[str] = None  # text encoder name/path for captions without cached embeddings
    max_length: int = 300
    use_mask: bool = True
    chi: str = "default"  # complex human instruction before each caption: default | none | <text file>


@dataclass
class DataConfig:
    source: Literal["loader", "fixed"] = "loader"  # "fixed": one in-memory batch, repeated (tests only)
    loader: dict = field(default_factory=dict)  # keyword arguments of data_pipeline.build_loader
    fixed_image_size: int = 32  # the fixed source's image side
    fixed_num_samples: int = 8  # the fixed source's distinct samples (global)


@dataclass
class StepDown:
    step: int = 0
    lr: Optional[float] = None
    clip: Optional[float] = None


@dataclass
class OptimConfig:
    name: Literal["adamw", "came"] = "adamw"
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: list = field(default_factory=lambda: [1e-8])
    weight_decay: float = 0.0
    lr_scaling: Literal["none", "sqrt"] = "none"  # sqrt: lr × √(global batch / lr_base_batch), the T2I ref's auto_lr
    lr_base_batch: int = 256  # the batch at which optim.lr applies unscaled (lr_scaling: sqrt)
    effective_lr: Optional[float] = None  # derived by the trainer (lr after scaling); if given, it must match
    warmup_steps: int = 0
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    step_downs: list[StepDown] = field(default_factory=list)
    # lr and clip are functions of the step and this config, so a changed lr takes effect on resume as well


@dataclass
class BackendConfig:
    name: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    zero_stage: Literal[1, 2, 3] = 2
    deepspeed_config: Optional[str] = None  # JSON path; when set, used instead of the generated one
    precision: Literal["bf16", "fp32"] = "bf16"
    micro_batch: int = 8  # per rank
    grad_accum: int = 1
    global_batch: Optional[int] = None  # checked: micro_batch × grad_accum × world size
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0  # before this step the EMA copies the weights


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto: the newest intact run_dir/checkpoints/step_*; never; or a step_* directory
    verify: Literal["sha256", "size"] = "sha256"  # resume checks every file's sha256 (or only sizes) first
    export_every: int = 0  # 0: export EMA weights only at the end


@dataclass
class LoggingConfig:
    report_to: Literal["wandb", "tensorboard", "none"] = "none"
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "pixeldit"
    every: int = 20
    tqdm: bool = True
    timestep_buckets: int = 4
    val_every: int = 0  # 0 disables validation sampling
    val_prompts: list = field(default_factory=list)  # T2I prompts or ImageNet class ids
    val_steps: int = 25
    val_cfg_scale: float = 4.5
    val_image_size: Optional[int] = None
    val_sampler: Literal["euler", "heun", "flow_dpm_solver", "dpm_solver_2m"] = "flow_dpm_solver"
    val_cfg_interval: list = field(default_factory=lambda: [0.0, 1.0])  # guidance where t_min < t < t_max
    val_shift: Optional[float] = None  # sampler time shift; None: the training shift (objective.shift)


@dataclass
class SpikeGuardConfig:
    enabled: bool = True
    window: int = 100  # running statistics over the last `window` accepted losses
    min_history: int = 20  # no spike test before this many accepted steps
    sigma: float = 6.0  # loss > mean + sigma·std ...
    ratio: float = 3.0  # ... and loss > ratio·mean is a spike
    max_consecutive: int = 5  # then roll back to the last known-good checkpoint with a new data order
    max_rollbacks: int = 3  # roll-backs in a row that do not get past the failing step before the run stops
    inject_nan_at: list[int] = field(default_factory=list)  # testing aid: rank 0's loss is NaN at these steps (before any roll-back)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)
    extends: Optional[str] = None  # base YAML, relative to this file (merged first)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ----------------------------------------------------------------------------------------------- building

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping with keys {[f.name for f in dataclasses.fields(tp)]}, "
                              f"got {value!r}")
        return _build(tp, value, key)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported schema type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join((prefix + '.' if prefix else '') + k for k in unknown)} "
                          f"(in {where}); allowed keys: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("spec",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: {_yaml_problem(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = data.pop("extends", None)
    if base:
        data = _deep_merge(_read_yaml((path.parent / base).resolve()), data)
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {getattr(e, 'problem', None) or e}"


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to a nested dict in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key component")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: {_yaml_problem(e)}") from e


def validate(cfg: TrainConfig) -> TrainConfig:
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(cfg.model.activation_checkpointing in (True, False, "none", "selective", "full"),
         "model.activation_checkpointing: must be none, selective, full (or a boolean), "
         f"got {cfg.model.activation_checkpointing!r}")
    need(cfg.run.max_steps >= 0, f"run.max_steps: must be >= 0 (0 exports the initial weights), got {cfg.run.max_steps}")
    need(cfg.optim.lr > 0, f"optim.lr: must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.grad_clip >= 0, f"optim.grad_clip: must be >= 0, got {cfg.optim.grad_clip}")
    need(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {cfg.optim.weight_decay}")
    nb = 3 if cfg.optim.name == "came" else 2
    need(len(cfg.optim.betas) == nb, f"optim.betas: {cfg.optim.name} needs {nb} betas, got {cfg.optim.betas}")
    ne = 2 if cfg.optim.name == "came" else 1
    need(len(cfg.optim.eps) == ne, f"optim.eps: {cfg.optim.name} needs {ne} eps value(s), got {cfg.optim.eps}")
    steps = [s.step for s in cfg.optim.step_downs]
    need(steps == sorted(steps), f"optim.step_downs: steps must increase, got {steps}")
    need(cfg.backend.micro_batch > 0, f"backend.micro_batch: must be > 0, got {cfg.backend.micro_batch}")
    need(cfg.backend.grad_accum > 0, f"backend.grad_accum: must be > 0, got {cfg.backend.grad_accum}")
    need(0.0 < cfg.ema.decay < 1.0, f"ema.decay: must be in (0, 1), got {cfg.ema.decay}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {cfg.checkpoint.keep_last}")
    need(cfg.checkpoint.every > 0, f"checkpoint.every: must be > 0, got {cfg.checkpoint.every}")
    need(0.0 <= cfg.objective.cond_drop_prob < 1.0,
         f"objective.cond_drop_prob: must be in [0, 1), got {cfg.objective.cond_drop_prob}")
    need(cfg.objective.shift > 0, f"objective.shift: must be > 0, got {cfg.objective.shift}")
    need(cfg.spike_guard.max_consecutive >= 1,
         f"spike_guard.max_consecutive: must be >= 1, got {cfg.spike_guard.max_consecutive}")
    need(cfg.logging.every > 0, f"logging.every: must be > 0, got {cfg.logging.every}")
    need(cfg.spike_guard.max_rollbacks >= 0,
         f"spike_guard.max_rollbacks: must be >= 0, got {cfg.spike_guard.max_rollbacks}")
    need(cfg.checkpoint.resume in ("auto", "never") or Path(cfg.checkpoint.resume).is_dir(),
         f"checkpoint.resume: {cfg.checkpoint.resume!r} is not auto, never or an existing checkpoint directory")
    need(cfg.optim.lr_base_batch > 0, f"optim.lr_base_batch: must be > 0, got {cfg.optim.lr_base_batch}")
    iv = cfg.logging.val_cfg_interval
    need(len(iv) == 2 and 0.0 <= iv[0] <= iv[1] <= 1.0,
         f"logging.val_cfg_interval: must be [t_min, t_max] with 0 <= t_min <= t_max <= 1, got {iv}")
    need(not cfg.model.init_optimizer or cfg.model.init_weights == "raw",
         "model.init_optimizer: the carried optimiser state belongs to the raw weights; set model.init_weights=raw")
    return cfg


def check_global_batch(cfg: TrainConfig, world_size: int) -> int:
    """global batch = micro-batch × accumulation × world size; must match `backend.global_batch` if set."""
    b = cfg.backend
    actual = b.micro_batch * b.grad_accum * world_size
    if b.global_batch is not None and b.global_batch != actual:
        raise ConfigError(
            f"backend.global_batch: {b.global_batch} != micro_batch {b.micro_batch} × grad_accum {b.grad_accum} × "
            f"world size {world_size} = {actual}; change backend.grad_accum (e.g. to "
            f"{b.global_batch / (b.micro_batch * world_size):g}) or backend.micro_batch")
    return actual


def resolve_effective_lr(cfg: TrainConfig, global_batch: int) -> float:
    """optim.lr after `optim.lr_scaling` at this global batch; stored in `optim.effective_lr` (checked if given)."""
    o = cfg.optim
    lr = o.lr * (math.sqrt(global_batch / o.lr_base_batch) if o.lr_scaling == "sqrt" else 1.0)
    if o.effective_lr is not None and not math.isclose(o.effective_lr, lr, rel_tol=1e-6):
        raise ConfigError(f"optim.effective_lr: {o.effective_lr:g} given, but optim.lr {o.lr:g} with lr_scaling "
                          f"{o.lr_scaling} at global batch {global_batch} gives {lr:g}; remove optim.effective_lr")
    o.effective_lr = lr
    return lr


def from_dict(data: dict) -> TrainConfig:
    return validate(_build(TrainConfig, data))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    data = _read_yaml(Path(path)) if path else {}
    for item in overrides:
        apply_override(data, item)
    return from_dict(data)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tmp.replace(path)
