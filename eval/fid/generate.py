"""Class-balanced ImageNet samples for FID, as an ADM-style batch.

Image k has class `k mod num_classes` (so 50,000 images = 50 per class) and seed `seed + k`. The shared
runner writes `<out>/samples/<k:06d>.png` (resumable, split across ranks, settings in `<out>/generation.json`);
rank 0 then packs them into `<out>/samples_<N>x<H>x<W>x3.npz` (`arr_0` uint8 images, `arr_1` labels), the
file ADM's evaluator and `t2i-eval fid score` read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from eval.runner import Generator, Job, run_jobs
from t2i_train.diffusion.samplers import SamplerConfig
from t2i_train.engine import dist

from .batches import image_batch_shape, write_image_batch

SAMPLES = "samples"


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
    return np.arange(num) % num_classes


def batch_path(out_dir: Path, num: int, height: int, width: int) -> Path:
    return out_dir / f"samples_{num}x{height}x{width}x3.npz"


def pack(paths: list[Path], labels: np.ndarray, out: Path, height: int, width: int, progress: bool = True) -> Path:
    def images():
        for p in tqdm(paths, desc=f"packing {out.name}", unit="img", disable=not progress):
            with Image.open(p) as im:
                yield np.asarray(im.convert("RGB"))

    return write_image_batch(out, images(), (len(paths), height, width, 3), labels)


def generate(gen: Generator, out_dir: str | Path, cfg: SamplerConfig, height: int, width: int, *, num: int,
             seed: int = 0, batch_size: int = 8, overwrite: bool = False, preset: str | None = None,
             progress: bool = True) -> Path:
    """Make the missing samples and the packed batch; returns the batch path (on every rank)."""
    if gen.is_t2i:
        raise ValueError(f"{gen.ckpt} is a text-to-image model; ImageNet FID needs a class-conditional one")
    out_dir = Path(out_dir)
    labels = balanced_labels(num, int(gen.model.config["num_classes"]))
    jobs = [Job(cond=int(c), seed=seed + k, path=out_dir / SAMPLES / f"{k:06d}.png") for k, c in enumerate(labels)]
    run_jobs(gen, jobs, cfg, height, width, out_dir=out_dir, batch_size=batch_size, overwrite=overwrite,
             extra_settings={"benchmark": "imagenet_fid", "num": num, "preset": preset, "labels": "k mod classes"},
             progress=progress)
    out = batch_path(out_dir, num, height, width)
    if dist.rank() == 0:
        fresh = out.exists() and not overwrite and image_batch_shape(out) == (num, height, width, 3) and \
            out.stat().st_mtime >= max(j.path.stat().st_mtime for j in jobs)
        if not fresh:
            pack([j.path for j in jobs], labels, out, height, width, progress)
    dist.barrier()
    return out
