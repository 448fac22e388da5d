"""Source readers for the shard builder. Each yields plain, picklable *records*:

``{"key": str, "image": path-or-bytes, "captions": {source: text}, "scores": {source: float},
"label": int|None, "extra": dict, "origin": str}``; a record whose ``image`` is ``None`` and that carries
``"error"`` is a source-level failure the builder counts (e.g. an unreadable input shard).
Order is deterministic (sorted), which the builder's resume relies on.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from typing import Dict, Iterator, List, Optional

import braceexpand

from data_pipeline.tario import iter_shard

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "url")


def sanitize_key(key: str) -> str:
    """WebDataset splits member names at the first dot: keys must not contain dots or slashes."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    return key or "_"


def _captions_and_scores(meta: Dict) -> (Dict[str, str], Dict[str, float]):
    caps = {str(k): str(v) for k, v in (meta.get("captions") or {}).items() if v is not None}
    scores = {str(k): float(v) for k, v in (meta.get("scores") or meta.get("clip_scores") or {}).items()
              if v is not None}
    for col in _CAPTION_COLUMNS:
        v = meta.get(col)
        if isinstance(v, str) and v.strip() and "prompt" not in caps:
            caps["prompt"] = v
    for k, v in meta.items():
        if k.startswith("caption_") and isinstance(v, str) and v.strip():
            caps[k[len("caption_"):]] = v
        elif k.startswith("score_") and v not in (None, ""):
            try:
                scores[k[len("score_"):]] = float(v)
            except (TypeError, ValueError):
                pass
    return caps, scores


def folder_records(root: str) -> Iterator[Dict]:
    """Images anywhere under ``root`` with a sidecar ``<stem>.txt`` and/or ``<stem>.json``."""
    paths = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(IMAGE_EXTS):
                paths.append(os.path.join(dirpath, f))
    for path in sorted(paths):
        stem = os.path.splitext(path)[0]
        caps, scores, extra = {}, {}, {}
        if os.path.exists(stem + ".json"):
            try:
                with open(stem + ".json") as f:
                    meta = json.load(f)
                caps, scores = _captions_and_scores(meta)
                extra = {k: v for k, v in meta.items() if k not in ("captions", "scores", "caption")}
            except (OSError, ValueError):
                pass
        if os.path.exists(stem + ".txt"):
            try:
                with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
                    txt = f.read().strip()
                if txt:
                    caps["prompt"] = txt
            except OSError:
                pass
        label = extra.pop("label", None)
        yield {"key": sanitize_key(os.path.relpath(stem, root)), "image": path, "captions": caps,
               "scores": scores, "label": label, "extra": extra, "origin": path}


def _manifest_rows(path: str) -> Iterator[Dict]:
    low = path.lower()
    if low.endswith((".jsonl", ".json")):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)
    elif low.endswith((".csv", ".tsv")):
        with open(path, newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if low.endswith(".tsv") else ",")
    elif low.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        for batch in table.to_batches():
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unknown manifest type (want .jsonl, .csv, .tsv or .parquet)")


def manifest_records(path: str) -> Iterator[Dict]:
    """JSONL / CSV / Parquet rows: an image column (relative to the manifest), caption(s), scores, label."""
    base = os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(_manifest_rows(path)):
        img_col = next((c for c in _IMAGE_COLUMNS if row.get(c)), None)
        if isinstance(row.get("captions"), str):
            row["captions"] = json.loads(row["captions"])
        if isinstance(row.get("scores"), str):
            row["scores"] = json.loads(row["scores"])
        caps, scores = _captions_and_scores(row)
        img = row.get(img_col) if img_col else None
        if isinstance(img, str) and not os.path.isabs(img):
            img = os.path.join(base, img)
        key = row.get("key") or (os.path.splitext(os.path.basename(img))[0] if isinstance(img, str) else f"{i:09d}")
        label = row.get("label")
        label = int(label) if label not in (None, "") else None
        yield {"key": sanitize_key(str(key)), "image": img if img else "", "captions": caps, "scores": scores,
               "label": label, "extra": {}, "origin": f"{path}:{i + 1}"}


def expand_shard_spec(spec: str) -> List[str]:
    """A directory (all ``*.tar`` in it), a glob, or a brace spec ``dir/name-{000000..000009}.tar``."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    out = []
    for part in braceexpand.braceexpand(spec):
        out.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    return out


def wds_records(spec: str) -> Iterator[Dict]:
    """Samples of existing WebDataset / img2dataset shards (re-shard, filter). A shard that cannot be opened
    or is cut short becomes one error record (the builder counts it); its complete samples are kept."""
    for url in expand_shard_spec(spec):
        got = 0
        try:
            for _, members in iter_shard(url):
                got += 1
                key = members.pop("__key__")
                yield _wds_sample_to_record(key, members, url)
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            yield {"key": os.path.basename(url), "image": None, "origin": url, "detail": repr(e),
                   "error": "truncated_shard" if got else "unreadable_shard"}


def _wds_sample_to_record(key: str, members: Dict[str, bytes], url: str) -> Dict:
    img = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), b"")
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = {}
    caps, scores = _captions_and_scores(meta)
    if "txt" in members:
        t = members["txt"].decode("utf-8", errors="replace").strip()
        if t:
            caps["prompt"] = t
    label = meta.get("label")
    if label is None and "cls" in members:
        label = int(members["cls"].decode().strip())
    extra = {k: v for k, v in meta.items()
             if k not in ("captions", "scores", "clip_scores", "caption", "width", "height", "label",
                          "original_width", "original_height")}
    return {"key": sanitize_key(key), "image": img, "captions": caps, "scores": scores, "label": label,
            "extra": extra, "origin": f"{url}:{key}"}


def imagenet_records(root: str, classes: Optional[List[str]] = None) -> Iterator[Dict]:
    """ImageNet-style tree ``root/<synset>/<image>``; class index = position in the sorted synset list."""
    classes = classes or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    for label, synset in enumerate(classes):
        d = os.path.join(root, synset)
        for f in sorted(os.listdir(d)):
            if f.lower().endswith(IMAGE_EXTS):
                stem = os.path.splitext(f)[0]
                key = stem if stem.startswith(synset) else f"{synset}_{stem}"
                yield {"key": sanitize_key(key), "image": os.path.join(d, f),
                       "captions": {"prompt": synset}, "scores": {}, "label": label,
                       "extra": {"class_name": synset}, "origin": os.path.join(d, f)}


def imagenet_classes(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def detect_kind(source: str) -> str:
    if source.lower().endswith((".jsonl", ".csv", ".tsv", ".parquet")):
        return "manifest"
    if source.endswith(".tar") or "{" in source:
        return "wds"
    if os.path.isdir(source):
        entries = os.listdir(source)
        if entries and all(e.endswith(".tar") or not os.path.isfile(os.path.join(source, e)) or e.endswith(
                (".json", ".parquet")) for e in entries) and any(e.endswith(".tar") for e in entries):
            return "wds"
        subdirs = [e for e in entries if os.path.isdir(os.path.join(source, e))]
        loose = [e for e in entries if e.lower().endswith(IMAGE_EXTS)]
        if subdirs and not loose and all(re.fullmatch(r"n\d{8}", d) for d in subdirs):
            return "imagenet"
        return "folder"
    raise ValueError(f"cannot tell what kind of source {source!r} is; pass --kind")
