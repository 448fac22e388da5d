"""Loader throughput against the decode floor, measured in the same run, for two cases:

* ``1024``: ~1 MP JPEGs of several aspect ratios at the 1024 aspect-ratio buckets (the later stages);
* ``512``: 2-3 MP JPEGs at the fixed 512 bucket (stage 1), where the loader decodes at reduced size in the
  DCT domain (libjpeg 1/2, 1/4, 1/8 scaling); the PSNR of that fast path against full decoding (same bucket,
  same crop) is reported.

Images are textured so the decoder works like on a photo. Per case it times, interleaved ``--repeats`` times:
  * floor: a bare loop that opens, decodes and resizes each file with PIL to its bucket's cover size;
  * loader: the full streaming loader (tar reading, shuffle buffer, caption choice, buckets, resize + crop,
    float tensors in [-1, 1], batching) with one dataloader worker, in steady state (after ``--warmup``
    batches; it streams on into the next epochs of the same shards), and in-process (``num_workers=0``).
Prints rates and loader/floor ratios per wall second and per CPU second of the process doing the work (the
CPU figure is the one that holds on a shared machine) and the median of the paired per-repeat ratios
(acceptance: 1024 >= 0.9; 512 >= 2.0 with PSNR >= 35 dB).

``python -m data_pipeline.bench [--case both] [--num 160] [--batch-size 4] [--repeats 3] [--warmup 40]``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
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
from data_pipeline.decode import decode_to_bucket
from data_pipeline.loader import ShardLoader
from data_pipeline.sources import folder_records

SIZES = [(1024, 1024), (1344, 768), (768, 1344), (1200, 896), (896, 1200), (1536, 1024), (1080, 1920)]
SIZES_2_3MP = [(1920, 1280), (1280, 1920), (1600, 1600), (2048, 1152), (1152, 2048), (1800, 1350), (1350, 1800)]
CASES = {"1024": {"sizes": SIZES, "bucket_mode": "multi", "resolution": 1024},
         "512": {"sizes": SIZES_2_3MP, "bucket_mode": "fixed", "resolution": 512}}


def make_jpegs(folder: str, num: int, seed: int = 0, sizes=SIZES) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num):
        w, h = sizes[i % len(sizes)]
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


def loader_loop(shard_dir: str, batch_size: int, num_workers: int, images: int, warmup: int,
                bucket_mode: str = "multi", resolution: int = 1024) -> Dict[str, float]:
    """The full loader in steady state: ``warmup`` batches first (worker start, buffers, shared-memory ring),
    then ``images`` timed. ``cpu`` counts the CPU seconds of the process doing the per-sample work: the worker
    (its own clock, sent with each batch) for ``num_workers=1``, this process for ``num_workers=0``."""
    loader = ShardLoader([shard_dir], batch_size, num_workers=num_workers, bucket_mode=bucket_mode,
                         resolution=resolution, shuffle_buffer=64, epochs=None, streams_per_rank=max(1, num_workers))
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


def fast_path_psnr(paths, spec: BucketSpec) -> Dict[str, float]:
    """PSNR (dB) of the loader's decode (reduced-size where it applies) against full decoding, same crop."""
    values = []
    for p in paths:
        data = open(p, "rb").read()
        fast = np.asarray(decode_to_bucket(data, spec, random.Random(0))[0], np.float64)
        full = np.asarray(decode_to_bucket(data, spec, random.Random(0), reduced=False)[0], np.float64)
        mse = float(np.mean((fast - full) ** 2))
        values.append(10 * math.log10(255.0 ** 2 / mse) if mse > 0 else float("inf"))
    return {"mean": round(statistics.mean(values), 2), "min": round(min(values), 2)}


def run_case(case: str, num: int = 160, batch_size: int = 4, repeats: int = 3, workdir: Optional[str] = None,
             warmup: int = 40) -> Dict:
    c = CASES[case]
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="t2i-bench-")
    folder, shards = os.path.join(workdir, f"jpegs_{case}"), os.path.join(workdir, f"shards_{case}")
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_jpegs(folder, num, sizes=c["sizes"])
        build_shards(folder_records(folder), shards, name="bench", samples_per_shard=max(8, num // 4),
                     opts=BuildOptions(), progress=False)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
    spec = BucketSpec(c["bucket_mode"], c["resolution"])
    floor_loop(paths[:8], spec)  # warm the page cache and the decoder
    runs = {"floor": [], "loader_1worker": [], "loader_inprocess": []}
    kw = dict(batch_size=batch_size, images=len(paths), warmup=warmup, bucket_mode=c["bucket_mode"],
              resolution=c["resolution"])
    for _ in range(repeats):  # interleaved: the machine may be shared
        runs["floor"].append(floor_loop(paths, spec))
        runs["loader_1worker"].append(loader_loop(shards, num_workers=1, **kw))
        runs["loader_inprocess"].append(loader_loop(shards, num_workers=0, **kw))
    best = {k: {m: max(r[m] for r in v) for m in ("wall", "cpu")} for k, v in runs.items()}

    def paired(name):
        return {m: round(statistics.median(lo[m] / fl[m] for lo, fl in zip(runs[name], runs["floor"])), 3)
                for m in ("wall", "cpu")}

    result = {"case": case, "bucket_mode": c["bucket_mode"], "resolution": c["resolution"], "images": len(paths),
              "batch_size": batch_size, "repeats": repeats, "warmup_batches": warmup,
              "images_per_s": {k: {m: round(x, 2) for m, x in v.items()} for k, v in best.items()},
              "ratio_1worker": {m: round(best["loader_1worker"][m] / best["floor"][m], 3) for m in ("wall", "cpu")},
              "ratio_inprocess": {m: round(best["loader_inprocess"][m] / best["floor"][m], 3)
                                  for m in ("wall", "cpu")},
              "median_paired_ratio_1worker": paired("loader_1worker"),
              "median_paired_ratio_inprocess": paired("loader_inprocess"),
              "main_cpu_ms_per_image_1worker": round(min(r["main_cpu_ms_per_image"]
                                                         for r in runs["loader_1worker"]), 2),
              "psnr_fast_vs_full_db": fast_path_psnr(paths[:16], spec),
              "load_average": os.getloadavg()[0]}
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def run(num: int = 160, batch_size: int = 4, repeats: int = 3, workdir: Optional[str] = None,
        warmup: int = 40, cases=("1024", "512")) -> Dict:
    return {case: run_case(case, num, batch_size, repeats, workdir, warmup) for case in cases}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--case", default="both", choices=["both", *CASES], help="which bench case(s)")
    p.add_argument("--num", type=int, default=160, help="JPEGs per case")
    p.add_argument("--batch-size", type=int, default=4, help="loader batch size")
    p.add_argument("--repeats", type=int, default=3, help="interleaved floor/loader repeats (paired ratios)")
    p.add_argument("--warmup", type=int, default=40, help="loader batches before timing (steady state)")
    p.add_argument("--workdir", default=None, help="keep the JPEGs and shards here (reused when present)")
    a = p.parse_args(argv)
    cases = tuple(CASES) if a.case == "both" else (a.case,)
    results = run(a.num, a.batch_size, a.repeats, a.workdir, a.warmup, cases)
    print(json.dumps(results, indent=1))
    for case, r in results.items():
        ips = r["images_per_s"]
        print(f"== case {case} ({r['bucket_mode']} {r['resolution']}), PSNR fast vs full decode: "
              f"{r['psnr_fast_vs_full_db']['mean']:.1f} dB (min {r['psnr_fast_vs_full_db']['min']:.1f})")
        for m, what in (("cpu", "per CPU-second of the worker"), ("wall", "per wall second")):
            print(f"[{what}] floor (PIL open+decode+resize): {ips['floor'][m]:.1f} img/s | loader, 1 worker: "
                  f"{ips['loader_1worker'][m]:.1f} img/s | loader in-process: {ips['loader_inprocess'][m]:.1f} "
                  f"img/s | median of paired ratios: 1 worker {r['median_paired_ratio_1worker'][m]:.3f}, "
                  f"in-process {r['median_paired_ratio_inprocess'][m]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
