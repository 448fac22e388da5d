"""Shared helpers for the data-pipeline tests (tiny synthetic shards, hand-made broken shards)."""
from __future__ import annotations

import io
import json
import os
import tarfile

from PIL import Image

from data_pipeline.synthetic import write_synthetic

# A tiny bucket table so multi-aspect tests run on 32-64 px images.
TINY_TABLE = {"0.5": [32, 64], "1.0": [48, 48], "2.0": [64, 32]}


def make_synthetic(out_dir, num=48, per_shard=8, size=40, mode="t2i", aspect="varied", seed=0):
    stats = write_synthetic(str(out_dir), num, seed=seed, size=size, mode=mode, aspect=aspect,
                            samples_per_shard=per_shard)
    assert stats["written"] == num, stats
    return str(out_dir)


def png_bytes(w=24, h=24, color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(w=24, h=24, color=(10, 200, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path, samples):
    """``samples``: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, blob in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))


def good_sample(key, caption="a photo of a red square", w=24, h=24):
    meta = json.dumps({"width": w, "height": h, "captions": {"prompt": caption}}).encode()
    return key, {"png": png_bytes(w, h), "txt": caption.encode(), "json": meta}


def write_index(dir_, shards):
    """``shards``: list of (name, count)."""
    with open(os.path.join(dir_, "index.json"), "w") as f:
        json.dump({"format": 1, "name": "hand", "shards": [{"name": n, "count": c} for n, c in shards],
                   "total": sum(c for _, c in shards)}, f)
