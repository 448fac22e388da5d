"""Shard builder (console ``t2i-build-shards``): any source -> WebDataset shards + index + build stats.

Each sample of ``<name>-%06d.tar``: ``<key>.jpg|png|webp`` (the image), ``<key>.txt`` (main caption),
``<key>.json`` (``width``, ``height``, ``captions`` by source, ``scores`` by source, ``label`` for
class-conditional data, and any extra ground truth). Shards are written aside (``.tar.tmp``) and renamed
when complete, then the index is rewritten atomically, so a killed build leaves no half tar behind and
``--resume`` keeps every complete shard and rebuilds from the first incomplete one.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from multiprocessing import get_context
from typing import Dict, Iterable, Optional, Tuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipeline import sources
from data_pipeline.shard_index import INDEX_NAME, STATS_NAME, read_index, write_json_atomic

log = logging.getLogger(__name__)

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class BuildOptions:
    def __init__(self, min_side: int = 0, max_side: Optional[int] = None, reencode: bool = False,
                 require_caption: bool = True, jpeg_quality: int = 95, min_score: Optional[float] = None):
        self.min_side, self.max_side, self.reencode, self.min_score = min_side, max_side, reencode, min_score
        self.require_caption, self.jpeg_quality = require_caption, jpeg_quality


def prepare_sample(record: Dict, opts: BuildOptions) -> Tuple[str, object]:
    """Validate (and optionally re-encode) one record. ``("ok", members)`` or ``("skip", (reason, detail))``."""
    if record.get("error"):
        return "skip", (record["error"], record.get("detail", ""))
    caps = {k: v.strip() for k, v in (record.get("captions") or {}).items() if isinstance(v, str) and v.strip()}
    if opts.require_caption and not caps:
        return "skip", ("no_caption", "")
    scores = [float(v) for v in (record.get("scores") or {}).values() if v is not None]
    if opts.min_score is not None and scores and max(scores) < opts.min_score:
        return "skip", ("low_score", f"best score {max(scores)}")
    src = record.get("image")
    try:
        if isinstance(src, (bytes, bytearray)):
            data = bytes(src)
        elif src:
            with open(src, "rb") as f:
                data = f.read()
        else:
            return "skip", ("missing_image", "")
    except OSError as e:
        return "skip", ("unreadable", repr(e))
    if not data:
        return "skip", ("missing_image", "")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except UnidentifiedImageError as e:
        return "skip", ("corrupt", repr(e))
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        return "skip", (reason, repr(e))
    w, h = img.size
    if min(w, h) < opts.min_side:
        return "skip", ("too_small", f"{w}x{h}")
    too_big = opts.max_side is not None and max(w, h) > opts.max_side
    if opts.reencode or too_big or fmt not in _FORMAT_EXT or img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
        if too_big:
            s = opts.max_side / max(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
        data, ext = buf.getvalue(), "jpg"
        w, h = img.size
    else:
        ext = _FORMAT_EXT[fmt]
    main = caps.get("prompt") or (caps[sorted(caps)[0]] if caps else "")
    meta = dict(record.get("extra") or {})
    meta.update({"width": w, "height": h, "captions": caps,
                 "scores": {k: float(v) for k, v in (record.get("scores") or {}).items()}})
    if record.get("label") is not None:
        meta["label"] = int(record["label"])
    members = {ext: data, "txt": main.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    for name, blob in (record.get("members") or {}).items():
        members[name] = blob
    return "ok", members


def _prepare_star(args):
    return args[0], prepare_sample(args[0], args[1])


class _ShardWriter:
    """Writes ``<name>-%06d.tar`` aside and renames on completion."""

    def __init__(self, out_dir: str, name: str, start: int):
        self.out_dir, self.name, self.next_index = out_dir, name, start
        self.tar, self.tmp, self.count = None, None, 0

    def _open(self):
        self.final = os.path.join(self.out_dir, f"{self.name}-{self.next_index:06d}.tar")
        self.tmp = self.final + ".tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: Dict[str, bytes]):
        if self.tar is None:
            self._open()
        for ext in sorted(members, key=lambda e: (e != "json", e)):
            blob = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(blob), 0, 0o444
            info.uname = info.gname = "data"
            self.tar.addfile(info, io.BytesIO(blob))
        self.count += 1

    def close(self) -> Optional[Dict]:
        if self.tar is None:
            return None
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
        entry = {"name": os.path.basename(self.final), "count": self.count}
        self.tar, self.next_index = None, self.next_index + 1
        return entry


def build_shards(records: Iterable[Dict], out_dir: str, name: str = "data", samples_per_shard: int = 1000,
                 opts: Optional[BuildOptions] = None, workers: int = 0, resume: bool = False,
                 classes=None, progress: bool = True, dataset_name: Optional[str] = None) -> Dict:
    """Write ``records`` (see :mod:`data_pipeline.sources`) as shards. Returns the build stats."""
    opts = opts or BuildOptions()
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX_NAME)
    shards, skipped, inputs_done, seen = [], Counter(), 0, set()
    if resume and os.path.exists(index_path):
        prev = read_index(index_path)
        for s in prev["shards"]:
            if not os.path.exists(os.path.join(out_dir, s["name"])):
                break
            shards.append(s)
        if shards:
            inputs_done = shards[-1]["inputs_end"]
            skipped.update(shards[-1].get("skipped_so_far", {}))
    elif os.path.exists(index_path):
        raise FileExistsError(f"{out_dir} already holds a dataset index; pass resume=True (--resume) or use "
                              f"an empty directory")
    # Anything not recorded as complete (partial tars, later shards of an interrupted build) is rebuilt.
    keep = {s["name"] for s in shards}
    for f in os.listdir(out_dir):
        if (f.startswith(f"{name}-") and f.endswith((".tar", ".tar.tmp")) and f not in keep):
            os.remove(os.path.join(out_dir, f))
    if shards and resume:
        # Keys of kept shards are needed to keep skipping duplicates.
        for s in shards:
            with tarfile.open(os.path.join(out_dir, s["name"])) as tf:
                seen.update(m.name.split(".", 1)[0] for m in tf.getmembers())

    def write_index(final: bool):
        total = sum(s["count"] for s in shards)
        index = {"format": 1, "name": dataset_name or name, "shards": shards, "total": total,
                 "complete": final}
        if classes is not None:
            index["classes"] = list(classes)
        write_json_atomic(index_path, index)

    writer = _ShardWriter(out_dir, name, start=len(shards))
    t0 = time.time()
    written = sum(s["count"] for s in shards)
    new_written = 0
    warned = set()
    it = itertools.islice(iter(records), inputs_done, None)
    pool = get_context("spawn").Pool(workers) if workers and workers > 1 else None
    try:
        jobs = ((r, opts) for r in it)
        results = pool.imap(_prepare_star, jobs, chunksize=8) if pool else map(_prepare_star, jobs)
        bar = tqdm(results, unit="img", disable=not progress, desc=f"shards -> {out_dir}", dynamic_ncols=True)
        for record, (status, payload) in bar:
            inputs_done += 1
            if status == "skip":
                reason, detail = payload
                skipped[reason] += 1
                if reason not in warned:
                    warned.add(reason)
                    log.warning("skipping %s (%s): %s %s", record.get("key"), reason, record.get("origin"), detail)
            elif record["key"] in seen:
                skipped["duplicate_key"] += 1
            else:
                seen.add(record["key"])
                writer.add(record["key"], payload)
                written += 1
                new_written += 1
                if writer.count >= samples_per_shard:
                    entry = writer.close()
                    entry.update(inputs_end=inputs_done, skipped_so_far=dict(skipped))
                    shards.append(entry)
                    write_index(final=False)
            if progress and inputs_done % 50 == 0:
                bar.set_postfix(written=written, skipped=sum(skipped.values()))
        entry = writer.close()
        if entry:
            entry.update(inputs_end=inputs_done, skipped_so_far=dict(skipped))
            shards.append(entry)
    finally:
        if pool:
            pool.terminate()
        if writer.tar is not None:  # interrupted: never leave a half-written tar
            writer.tar.close()
            os.remove(writer.tmp)
    write_index(final=True)
    dt = time.time() - t0
    stats = {"inputs": inputs_done, "written": written, "skipped": dict(skipped), "shards": len(shards),
             "seconds": round(dt, 3), "images_per_s": round(new_written / dt, 2) if dt > 0 else None}
    write_json_atomic(os.path.join(out_dir, STATS_NAME), stats)
    return stats


def records_for(source: str, kind: str = "auto"):
    """(records iterator, classes or None, require_caption) for a CLI source."""
    kind = sources.detect_kind(source) if kind == "auto" else kind
    if kind == "folder":
        return sources.folder_records(source), None, True
    if kind == "manifest":
        return sources.manifest_records(source), None, True
    if kind == "wds":
        return sources.wds_records(source), None, True
    if kind == "imagenet":
        classes = sources.imagenet_classes(source)
        return sources.imagenet_records(source, classes), classes, False
    raise ValueError(f"unknown source kind {kind!r}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="t2i-build-shards", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="image folder, manifest (.jsonl/.csv/.parquet), shard spec/dir, or ImageNet tree")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--kind", default="auto", choices=["auto", "folder", "manifest", "wds", "imagenet"],
                   help="source kind (auto: from the source's form)")
    p.add_argument("--name", default="data", help="shard name prefix (<name>-%%06d.tar)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard")
    p.add_argument("--min-side", type=int, default=0, help="skip images whose short side is smaller")
    p.add_argument("--max-side", type=int, default=None, help="downscale (re-encode) images above this long side")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    p.add_argument("--min-score", type=float, default=None,
                   help="skip samples whose best caption score is below this (samples without scores are kept)")
    p.add_argument("--no-caption-ok", action="store_true", help="keep caption-less samples (class-conditional)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="image worker processes")
    p.add_argument("--resume", action="store_true", help="keep complete shards, rebuild from the first partial one")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    records, classes, require_caption = records_for(a.source, a.kind)
    opts = BuildOptions(min_side=a.min_side, max_side=a.max_side, reencode=a.reencode, min_score=a.min_score,
                        require_caption=require_caption and not a.no_caption_ok)
    stats = build_shards(records, a.out, name=a.name, samples_per_shard=a.samples_per_shard, opts=opts,
                         workers=a.workers, resume=a.resume, classes=classes, progress=not a.quiet)
    print(json.dumps(stats, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
