"""The resolved training recipe of a run config beside the paper's and the reference code's values.

    python -m t2i_train.train --config configs/t2i_512.yaml --print-recipe

The reference is GitHub Bili-Sakura/PixelDiT-diffusers at commit 4225ca5 (t2i/configs/PixelDiT_*_stage{1,2,3}.yaml,
t2i/diffusion/utils/config.py, t2i/train.py, c2i/configs/pix{256,512}_xl.yaml); the paper's values are its
section 4.1 and Tables 7/8, the ImageNet sampling values the model card's (/work/shared/seeds/). Every row whose
value differs between the three says which one the config follows and how to switch.
"""
from __future__ import annotations

from typing import Callable

from .config import TrainConfig, resolve_effective_lr

STAGE_SOURCES = {
    "t2i_512": "reference t2i/configs/PixelDiT_512px_pixel_diffusion_stage1.yaml; paper Table 8 (512²)",
    "t2i_512_ms": "reference t2i/configs/PixelDiT_512px_pixel_diffusion_stage2.yaml; not in the paper",
    "t2i_1024": "reference t2i/configs/PixelDiT_1024px_pixel_diffusion_stage3.yaml; paper Table 8 (1024²)",
    "imagenet256_xl": "reference c2i/configs/pix256_xl.yaml; paper section 4.1, Table 7; model card",
    "imagenet512_xl": "reference c2i/configs/pix512_xl.yaml; paper section 4.1; model card",
}

_SQRT = "the reference's auto_lr multiplies the yaml lr by √(global batch / 256); the paper states the trained lr, kept here (optim.lr_scaling=sqrt for the reference's)"
_CAME = "the released weights were trained with CAME (reference); optim.name=adamw optim.betas=[0.9,0.999] optim.eps=[1.0e-8] for the paper's"
_MASK = "the reference never passes the padding mask to the denoiser (released weights); text.use_mask=true to use it"
_INIT = "the reference's load_from loads raw weights (load_ema false) with a fresh optimiser; model.init_weights=ema / model.init_optimizer=true to change"
_T2I_SAMPLER = "DPM-Solver++(2M), the reference's flow_dpm-solver"

# per stage: row -> (paper, reference, why ours is what it is); "" = no difference to explain
PUBLISHED: dict[str, dict[str, tuple[str, str, str]]] = {
    "t2i_512": {
        "effective lr": ("1e-4", "2e-4 (1e-4 · √(1024/256))", _SQRT),
        "global batch": ("1024", "8 per GPU (1024 in all)", ""),
        "optimiser": ("AdamW (0.9, 0.999)", "CAME (0.9, 0.999, 0.9999), eps (1e-30, 1e-16)", _CAME),
        "grad clip": ("0.5", "0.2", "reference (its stage-1 yaml); optim.grad_clip=0.5 for the paper's"),
        "warm-up steps": ("not stated", "2000", "reference"),
        "EMA decay": ("0.9999 (section 4.1)", "0.9999 (ema_rate)", ""),
        "train shift": ("3.0", "3.0", ""),
        "REPA": ("λ 0.5, block 6, DINOv2", "λ 0.5, block 6, DINOv2 on 224² (16² tokens)",
                 "reference's teacher input (objective.repa_teacher_resolution)"),
        "text mask": ("not stated", "off", _MASK),
        "caption rule": ("not stated", "clip_thr 25, temperature 0.1", "reference"),
        "init": ("from scratch", "from scratch", ""),
        "val sampler": ("FlowDPMSolver, 25 steps, cfg 4.5", "flow_dpm-solver (DPM-Solver++ 2M)", _T2I_SAMPLER),
    },
    "t2i_512_ms": {
        "effective lr": ("(no such stage)", "2e-4 (1e-4 · √(1024/256))", _SQRT),
        "optimiser": ("(no such stage)", "CAME (0.9, 0.999, 0.9999), eps (1e-30, 1e-16)", _CAME),
        "grad clip": ("(no such stage)", "0.2", "reference"),
        "warm-up steps": ("(no such stage)", "2000", "reference"),
        "train shift": ("(no such stage)", "3.0", ""),
        "REPA": ("(no such stage)", "off (repa_loss_weight 0)", ""),
        "text mask": ("(no such stage)", "off", _MASK),
        "caption rule": ("(no such stage)", "clip_thr 25, temperature 0.1", "reference"),
        "init": ("(no such stage)", "stage 1, raw weights, fresh optimiser", _INIT),
        "val sampler": ("(no such stage)", "flow_dpm-solver (DPM-Solver++ 2M)", _T2I_SAMPLER),
    },
    "t2i_1024": {
        "effective lr": ("2e-5", "3.46e-5 (2e-5 · √(768/256))", _SQRT),
        "global batch": ("768", "3 per GPU (768 in all)", ""),
        "optimiser": ("AdamW (0.9, 0.999)", "CAME (0.9, 0.999, 0.9999), eps (1e-30, 1e-16)", _CAME),
        "grad clip": ("0.1", "0.1", ""),
        "warm-up steps": ("not stated", "2000", "reference"),
        "EMA decay": ("0.9999 (section 4.1)", "0.9999 (ema_rate)", ""),
        "train shift": ("4.0", "4.0", ""),
        "REPA": ("off", "off", ""),
        "text mask": ("not stated", "off", _MASK),
        "caption rule": ("not stated", "clip_thr 25, temperature 0.1", "reference"),
        "init": ("the 512² model", "stage 2, raw weights, fresh optimiser", _INIT),
        "val sampler": ("FlowDPMSolver, 25 steps, cfg 4.5", "flow_dpm-solver (DPM-Solver++ 2M)", _T2I_SAMPLER),
    },
    "imagenet256_xl": {
        "effective lr": ("1e-4 → 1e-5 after 160 epochs", "1e-4 (no step-down in pix256_xl.yaml)",
                         "paper (the released epoch-320 model went through the step-down)"),
        "global batch": ("256", "32 per GPU × 8 GPUs", ""),
        "optimiser": ("AdamW (0.9, 0.999)", "AdamW, wd 0", ""),
        "grad clip": ("1.0 → 0.5", "1.0", "paper"),
        "warm-up steps": ("not stated", "none", ""),
        "EMA decay": ("0.9999", "0.9999", ""),
        "train shift": ("1.0", "1.0", ""),
        "REPA": ("λ 0.5, block 8, DINOv2", "align_layer 8, DINOv2", ""),
        "init": ("from scratch", "from scratch", ""),
        "val sampler": ("cfg 3.25 on [0.1, 1.0] (epoch 80/160; 2.75 on [0.1, 0.9] at 320)",
                        "FlowDPMSolver 100 steps, cfg 3.25 on [0.1, 1.0], shift 1.0",
                        "model card; t2i-sample --preset imagenet256_epoch320 for the final model"),
    },
    "imagenet512_xl": {
        "effective lr": ("1e-5", "1e-4 (pix512_xl.yaml)", "paper (its fine-tune recipe)"),
        "global batch": ("256", "8 per GPU", ""),
        "optimiser": ("AdamW (0.9, 0.999)", "AdamW, wd 0", ""),
        "grad clip": ("0.5", "0.5", ""),
        "EMA decay": ("0.9999", "0.9999", ""),
        "train shift": ("not stated", "3.0", "reference"),
        "REPA": ("λ 0.5, block 8, DINOv2", "align_layer 8, DINOv2", ""),
        "init": ("the 320-epoch 256² checkpoint", "(not in the yaml)", ""),
        "val sampler": ("model card: cfg 3.5, shift 2.0, [0.1, 1.0]", "cfg 3.75, shift 3.0, [0.1, 1.0]",
                        "model card (its gFID setting)"),
    },
}


def _global_batch(cfg: TrainConfig, world_size: int) -> int:
    b = cfg.backend
    return b.global_batch if b.global_batch is not None else b.micro_batch * b.grad_accum * world_size


def _g(x: float) -> str:
    """0.9999, 0.2, 3 and 1e-4, 3.46e-5 (not 1, 0.0001, 3.46e-05)."""
    if x != 0 and abs(x) < 1e-3:
        mantissa, exp = f"{x:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exp)}"
    return f"{x:.6g}"


def _lr(cfg: TrainConfig, gb: int) -> str:
    lr = resolve_effective_lr(cfg, gb)
    scale = lr / cfg.optim.lr
    out = _g(lr) + (f" ({_g(cfg.optim.lr)} · √({gb}/{cfg.optim.lr_base_batch}))" if cfg.optim.lr_scaling == "sqrt" else "")
    for sd in cfg.optim.step_downs:
        if sd.lr is not None:
            out += f" → {_g(sd.lr * scale)} at step {sd.step}"
    return out


def _optimiser(cfg: TrainConfig, gb: int) -> str:
    o = cfg.optim
    name = "CAME" if o.name == "came" else "AdamW"
    return f"{name} ({', '.join(_g(b) for b in o.betas)}), eps ({', '.join(_g(e) for e in o.eps)}), wd {_g(o.weight_decay)}"


def _clip(cfg: TrainConfig, gb: int) -> str:
    out = _g(cfg.optim.grad_clip)
    for sd in cfg.optim.step_downs:
        if sd.clip is not None:
            out += f" → {_g(sd.clip)} at step {sd.step}"
    return out


def _repa(cfg: TrainConfig, gb: int) -> str:
    o = cfg.objective
    if o.repa_weight <= 0:
        return "off"
    teacher = f"{o.repa_teacher_resolution}²" if o.repa_teacher_resolution else "student grid"
    return f"λ {_g(o.repa_weight)}, block {o.repa_block}, DINOv2 on {teacher}"


def _caption(cfg: TrainConfig, gb: int) -> str:
    if cfg.run.task != "t2i":
        return "class labels"
    loader = cfg.data.loader
    return f"clip_thr {_g(float(loader.get('clip_thr', 0.0)))}, temperature {_g(float(loader.get('clip_thr_temperature', 1.0)))}"


def _init(cfg: TrainConfig, gb: int) -> str:
    m = cfg.model
    if not m.init_from:
        return "from scratch"
    return f"{m.init_from} ({m.init_weights} weights, {'carried' if m.init_optimizer else 'fresh'} optimiser)"


def _sampler(cfg: TrainConfig, gb: int) -> str:
    lg = cfg.logging
    shift = lg.val_shift if lg.val_shift is not None else cfg.objective.shift
    lo, hi = lg.val_cfg_interval
    return f"{lg.val_sampler}, {lg.val_steps} steps, cfg {_g(lg.val_cfg_scale)} on [{_g(lo)}, {_g(hi)}], shift {_g(shift)}"


ROWS: list[tuple[str, Callable[[TrainConfig, int], str]]] = [
    ("effective lr", _lr),
    ("global batch", lambda c, gb: str(gb)),
    ("optimiser", _optimiser),
    ("grad clip", _clip),
    ("warm-up steps", lambda c, gb: str(c.optim.warmup_steps)),
    ("EMA decay", lambda c, gb: _g(c.ema.decay) if c.ema.enabled else "off"),
    ("train shift", lambda c, gb: _g(c.objective.shift)),
    ("REPA", _repa),
    ("text mask", lambda c, gb: ("on" if c.text.use_mask else "off") if c.run.task == "t2i" else "–"),
    ("caption rule", _caption),
    ("init", _init),
    ("val sampler", _sampler),
]


def resolved_recipe(cfg: TrainConfig, world_size: int = 1) -> dict[str, str]:
    gb = _global_batch(cfg, world_size)
    return {name: get(cfg, gb) for name, get in ROWS}


def recipe_table(cfg: TrainConfig, world_size: int = 1) -> str:
    """A markdown table: this config's resolved values, the paper's, the reference's, and why ours is ours."""
    ours = resolved_recipe(cfg, world_size)
    published = PUBLISHED.get(cfg.run.name, {})
    source = STAGE_SOURCES.get(cfg.run.name, "no published recipe for this run name")
    lines = [f"**{cfg.run.name}** ({source})", "",
             "| | this config | paper | reference (4225ca5) | difference |", "|---|---|---|---|---|"]
    for name, value in ours.items():
        paper, ref, why = published.get(name, ("–", "–", ""))
        lines.append(f"| {name} | {value} | {paper} | {ref} | {why} |")
    return "\n".join(lines)
