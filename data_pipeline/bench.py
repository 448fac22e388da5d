"""Loader throughput against the decode floor, measured in the same run.

Makes ``--num`` real-size JPEGs (around 1024 px, several aspect ratios, textured so the decoder works),
writes them as shards with the shard builder, then times, per worker (one process each):
  * floor: a bare loop that opens, decodes and resizes each file with PIL to its 1024-bucket cover size;
  * loader: the full streaming loader (tar reading, shuffle buffer, caption choice, 1024 buckets,
    resize + crop, float tensors in [-1, 1], batching) with one dataloader worker, in steady state
    (after ``--warmup`` batches; it streams on into the next epochs of the same shards).
Prints both rates and loader/floor (acceptance: >= 0.9), per wall second and per CPU second of the process
doing the work (the CPU figure is the one that holds on a shared machine), and the loader in-process
(``num_workers=0``: everything, float conversion included, in one process).

``python -m data_pipeline.bench [--num 160] [--batch-size 4] [--repeats 3] [--warmup 40] [--workdir DIR]``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image

from data_pipeline.buckets import BucketSpec
from data_pipeline.build_shards import BuildOptions, build_shards
from data_pipeline.loader import ShardLoader
from data_pipeline.sources import folder_records

SIZES = [(1024, 1024), (1344, 768), (768, 1344), (1200, 896), (896, 1200), (1536, 1024), (1080, 1920)]


def make_jpegs(folder: str, num: int, seed: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num):
        w, h = SIZES[i % len(SIZES)]
        # Smooth colour field plus noise: JPEG size and decode cost like a photo, not like a flat image.
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.002, 0.02, size=3)
        base = np.stack([127 + 100 * np.sin(xx * f[c] + yy * f[(c + 1) % 3] + i) for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 18, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"img{i:05d}.jpg"), quality=90)
        with open(os.path.join(folder, f"img{i:05d}.txt"), "w") as fh:
            fh.write(f"a synthetic photo number {i}")


def floor_loop(paths, spec: BucketSpec) -> Dict[str, float]:
    """The bare PIL loop: open, decode, resize to the bucket cover size. Rates per wall and per CPU second."""
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        img = Image.open(p)
        bh, bw = spec.assign(img.height, img.width)
        if img.mode != "RGB":
            img = img.convert("RGB")
        s = max(bh / img.height, bw / img.width)
        size = (max(bw, math.ceil(img.width * s - 1e-6)), max(bh, math.ceil(img.height * s - 1e-6)))
        img = img.resize(size, Image.BICUBIC) if size != img.size else img
        img.load()
    n = len(paths)
    return {"wall": n / (time.perf_counter() - t0), "cpu": n / (time.process_time() - c0)}


def loader_loop(shard_dir: str, batch_size: int, num_workers: int, images: int, warmup: int) -> Dict[str, float]:
    """The full loader in steady state: ``warmup`` batches first (worker start, buffers, shared-memory ring),
    then ``images`` timed. ``cpu`` counts the CPU seconds of the process doing the per-sample work: the worker
    (its own clock, sent with each batch) for ``num_workers=1``, this process for ``num_workers=0``."""
    loader = ShardLoader([shard_dir], batch_size, num_workers=num_workers, bucket_mode="multi", resolution=1024,
                         shuffle_buffer=64, epochs=None, streams_per_rank=max(1, num_workers))
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0, c0, w0 = time.perf_counter(), time.process_time(), dict(loader.worker_cpu_s)
    n = 0
    while n < images:
        b = next(it)
        assert b["image"].dtype == torch.float32
        n += b["image"].shape[0]
    wall, main_cpu = time.perf_counter() - t0, time.process_time() - c0
    worker_cpu = sum(loader.worker_cpu_s[w] - w0.get(w, 0.0) for w in loader.worker_cpu_s)
    del it
    cpu = worker_cpu if num_workers else main_cpu
    return {"wall": n / wall, "cpu": n / cpu, "main_cpu_ms_per_image": 1000 * main_cpu / n}


def run(num: int = 160, batch_size: int = 4, repeats: int = 3, workdir: Optional[str] = None,
        warmup: int = 40) -> Dict:
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="t2i-bench-")
    folder, shards = os.path.join(workdir, "jpegs"), os.path.join(workdir, "shards")
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_jpegs(folder, num)
        build_shards(folder_records(folder), shards, name="bench", samples_per_shard=max(8, num // 4),
                     opts=BuildOptions(), progress=False)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
    spec = BucketSpec("multi", 1024)
    floor_loop(paths[:8], spec)  # warm the page cache and the decoder
    runs = {"floor": [], "loader_1worker": [], "loader_inprocess": []}
    for _ in range(repeats):  # interleaved, best of each: the machine may be shared
        runs["floor"].append(floor_loop(paths, spec))
        runs["loader_1worker"].append(loader_loop(shards, batch_size, 1, len(paths), warmup))
        runs["loader_inprocess"].append(loader_loop(shards, batch_size, 0, len(paths), warmup))
    best = {k: {m: max(r[m] for r in v) for m in ("wall", "cpu")} for k, v in runs.items()}
    result = {"images": len(paths), "batch_size": batch_size, "repeats": repeats, "warmup_batches": warmup,
              "images_per_s": {k: {m: round(x, 2) for m, x in v.items()} for k, v in best.items()},
              "ratio_1worker": {m: round(best["loader_1worker"][m] / best["floor"][m], 3) for m in ("wall", "cpu")},
              "ratio_inprocess": {m: round(best["loader_inprocess"][m] / best["floor"][m], 3)
                                  for m in ("wall", "cpu")},
              "median_paired_ratio_1worker": {m: round(statistics.median(
                  lo[m] / fl[m] for lo, fl in zip(runs["loader_1worker"], runs["floor"])), 3) for m in ("wall", "cpu")},
              "main_cpu_ms_per_image_1worker": round(min(r["main_cpu_ms_per_image"]
                                                         for r in runs["loader_1worker"]), 2),
              "load_average": os.getloadavg()[0]}
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=40, help="loader batches before timing (steady state)")
    p.add_argument("--workdir", default=None, help="keep the JPEGs and shards here (reused when present)")
    a = p.parse_args(argv)
    r = run(a.num, a.batch_size, a.repeats, a.workdir, a.warmup)
    print(json.dumps(r, indent=1))
    ips = r["images_per_s"]
    for m, what in (("cpu", "per CPU-second of the worker"), ("wall", "per wall second")):
        print(f"[{what}] floor (PIL open+decode+resize): {ips['floor'][m]:.1f} img/s | loader, 1 worker: "
              f"{ips['loader_1worker'][m]:.1f} img/s (ratio {r['ratio_1worker'][m]:.3f}) | loader in-process: "
              f"{ips['loader_inprocess'][m]:.1f} img/s (ratio {r['ratio_inprocess'][m]:.3f}) | median of paired "
              f"1-worker ratios {r['median_paired_ratio_1worker'][m]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
