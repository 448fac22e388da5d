"""Metrics: a JSON-lines file in the run directory (always), wandb or tensorboard (config), tqdm progress.

Only rank 0 writes. wandb runs offline unless `logging.wandb_mode: online`. JSON lines are strict JSON: a
non-finite number (a NaN loss, an infinite gradient norm) is written as null.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from . import dist as d

# dense bf16 peak FLOP/s per device, for the MFU estimate (None: unknown, MFU not reported)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def finite_or_none(value):
    """`value` with every NaN / ±inf float (also inside lists and dicts) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_line(record: dict) -> str:
    return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def progress_line(step: int, max_steps: int, metrics: dict, elapsed: float, steps_done: int) -> str:
    """One console line per logging step when there is no progress bar (`logging.tqdm: false`)."""
    parts = [f"[t2i-train] step {step}/{max_steps}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("repa_loss", "repa", ".3f"), ("grad_norm", "grad_norm", ".3g"),
                            ("lr", "lr", ".2e"), ("samples_per_s", "samples/s", ".1f")):
        if key in metrics:
            value = metrics[key]
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            parts.append(f"{label} {format(value, fmt) if finite else value}")
    if metrics.get("skipped"):
        parts.append(f"skipped {metrics['skipped']}")
    if steps_done > 0 and max_steps > step:
        eta = elapsed / steps_done * (max_steps - step)
        parts.append(f"eta {int(eta // 60)}:{int(eta % 60):02d}")
    return "  ".join(parts)


class Monitor:
    def __init__(self, cfg, run_dir: Path, start_step: int, resolved: dict):
        self.enabled = d.is_main()
        self.kind = cfg.logging.report_to
        self.max_steps, self.start_step, self.t_start = cfg.run.max_steps, start_step, time.time()
        self.file = None
        self.bar = None
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")
        if self.kind == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, dir=str(run_dir),
                                    config=resolved, resume="allow", id=cfg.run.name.replace("/", "_"))
        elif self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.logging.tqdm:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.run.max_steps, initial=start_step, dynamic_ncols=True, desc=cfg.run.name)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json_line({"step": step, **metrics}))
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}")
        elif self.bar is None and "loss" in metrics:
            print(progress_line(step, self.max_steps, metrics, time.time() - self.t_start, step - self.start_step),
                  flush=True)

    def log_image(self, step: int, path: Path) -> None:
        if not self.enabled:
            return
        if self.wandb is not None:
            import wandb

            self.wandb.log({"val/samples": wandb.Image(str(path))}, step=step)
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            self.tb.add_image("val/samples", np.asarray(Image.open(path)), step, dataformats="HWC")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
