"""DPG-Bench generation: 4 images per prompt, tiled 2×2 into `<out>/<item_id>.png` (the layout the scorer reads).

The 4 images are made by the shared runner into `<out>/singles/<item_id>_<k>.png` (resumable, split across
ranks, settings in `<out>/generation.json`), then rank 0 tiles every item whose tile is missing. Item i (in
sorted item-id order), copy k uses seed `seed + 4·i + k`.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from eval.runner import Generator, Job, run_jobs
from t2i_train.diffusion.samplers import SamplerConfig
from t2i_train.engine import dist

IMAGES_PER_PROMPT = 4
SINGLES = "singles"


def dpg_jobs(prompts: dict[str, str], out_dir: Path, seed: int) -> list[Job]:
    return [Job(cond=text, seed=seed + IMAGES_PER_PROMPT * i + k, path=out_dir / SINGLES / f"{item}_{k}.png")
            for i, (item, text) in enumerate(sorted(prompts.items())) for k in range(IMAGES_PER_PROMPT)]


def tile_2x2(paths: list[Path], out: Path) -> None:
    ims = [Image.open(p).convert("RGB") for p in paths]
    w, h = ims[0].size
    tile = Image.new("RGB", (2 * w, 2 * h))
    for k, im in enumerate(ims):
        tile.paste(im, ((k % 2) * w, (k // 2) * h))
    tmp = out.with_suffix(".tmp.png")
    tile.save(tmp)
    os.replace(tmp, out)


def generate(gen: Generator, prompts: dict[str, str], out_dir: str | Path, cfg: SamplerConfig, height: int,
             width: int, *, seed: int = 0, batch_size: int = 8, overwrite: bool = False,
             progress: bool = True) -> list[Path]:
    """Make the tiles of every prompt not done yet; returns the tile paths (on every rank)."""
    out_dir = Path(out_dir)
    jobs = dpg_jobs(prompts, out_dir, seed)
    run_jobs(gen, jobs, cfg, height, width, out_dir=out_dir, batch_size=batch_size, overwrite=overwrite,
             extra_settings={"benchmark": "dpg_bench", "images_per_prompt": IMAGES_PER_PROMPT, "layout": "2x2 tile"},
             progress=progress)
    tiles = [out_dir / f"{item}.png" for item in sorted(prompts)]
    if dist.rank() == 0:
        for t, tile in enumerate(tiles):
            if overwrite or not tile.exists():
                tile_2x2([j.path for j in jobs[IMAGES_PER_PROMPT * t:IMAGES_PER_PROMPT * (t + 1)]], tile)
    dist.barrier()
    return tiles
