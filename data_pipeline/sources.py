"""Source readers for the shard builder. Each yields plain, picklable *records*:

``{"key": str, "image": path-or-bytes, "captions": {source: text}, "scores": {source: float},
"label": int|None, "extra": dict, "origin": str}``; a record whose ``image`` is ``None`` and that carries
``"error"`` (a skip reason) is a failure the builder counts (an unreadable input shard, a bad json sidecar).
Order is deterministic (sorted), which the builder's resume relies on. Readers return :class:`Records`, which
also knows how many records will come when that is cheap to tell (the builder's progress bar total).

Scores are CLIP scores on one scale: 100 x cosine similarity (the reference's ``clip_thr`` and
``--min-score 25`` use it). img2dataset's ``similarity`` column (a cosine similarity, 0-1) is read as the
score of the main caption and multiplied by 100.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
import urllib.parse
from typing import Dict, Iterable, Iterator, List, Optional

import braceexpand

from data_pipeline.sample_meta import BadSample, decode_caption, is_number, parse_json_meta, parse_label
from data_pipeline.tario import is_local, iter_shard

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "url")
SIMILARITY_SCALE = 100.0  # img2dataset's `similarity` (0-1) -> our CLIP-score scale
# img2dataset bookkeeping that is not ground truth worth carrying into the shards.
_IMG2DATASET_DROP = ("status", "error_message", "exif", "similarity")


class SourceError(ValueError):
    """A source the builder cannot use as given (the message says what to change)."""


class Records:
    """Records of one source; ``total`` is how many will come, or None when only reading them all can tell."""

    def __init__(self, iterable: Iterable[Dict], total: Optional[int] = None):
        self.iterable, self.total = iterable, total

    def __iter__(self) -> Iterator[Dict]:
        return iter(self.iterable)


def sanitize_key(key: str) -> str:
    """WebDataset splits member names at the first dot: keys must not contain dots or slashes."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    return key or "_"


def _captions_and_scores(meta: Dict) -> (Dict[str, str], Dict[str, float]):
    caps = {str(k): str(v) for k, v in (meta.get("captions") or {}).items() if v is not None}
    raw_scores = dict(meta.get("scores") or meta.get("clip_scores") or {})
    for col in _CAPTION_COLUMNS:
        v = meta.get(col)
        if isinstance(v, str) and v.strip() and "prompt" not in caps:
            caps["prompt"] = v
    if meta.get("similarity") not in (None, "") and "prompt" not in raw_scores:
        raw_scores["prompt"] = _number(meta["similarity"], "similarity") * SIMILARITY_SCALE
    for k, v in meta.items():
        if k.startswith("caption_") and isinstance(v, str) and v.strip():
            caps[k[len("caption_"):]] = v
        elif k.startswith("score_") and v not in (None, ""):
            raw_scores[k[len("score_"):]] = v
    scores = {str(k): _number(v, f"scores.{k}") for k, v in raw_scores.items() if v not in (None, "")}
    return caps, scores


def _number(v, field: str) -> float:
    try:
        x = float(v) if not isinstance(v, bool) else None
    except (TypeError, ValueError):
        x = None
    if x is None or not is_number(x):
        raise BadSample("bad_json", f"{field!r} = {v!r} is not a finite number")
    return x


def _error(key: str, origin: str, e: BadSample) -> Dict:
    return {"key": sanitize_key(key), "image": None, "origin": origin, "error": e.reason, "detail": e.detail}


def folder_records(root: str) -> Records:
    """Images anywhere under ``root`` with a sidecar ``<stem>.txt`` and/or ``<stem>.json``."""
    if not os.path.isdir(root):
        raise SourceError(f"source folder {root!r} not found (resolved to {os.path.abspath(root)})")
    paths = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(IMAGE_EXTS):
                paths.append(os.path.join(dirpath, f))
    return Records((_folder_record(root, p) for p in sorted(paths)), total=len(paths))


def _folder_record(root: str, path: str) -> Dict:
    stem = os.path.splitext(path)[0]
    key = os.path.relpath(stem, root)
    caps, scores, extra = {}, {}, {}
    try:
        if os.path.exists(stem + ".json"):
            with open(stem + ".json", "rb") as f:
                meta = parse_json_meta(f.read())
            caps, scores = _captions_and_scores(meta)
            extra = {k: v for k, v in meta.items() if k not in ("captions", "scores", "caption")}
        if os.path.exists(stem + ".txt"):
            with open(stem + ".txt", "rb") as f:
                txt = decode_caption(f.read())
            if txt:
                caps["prompt"] = txt
    except BadSample as e:
        return _error(key, path, e)
    except OSError as e:
        return _error(key, path, BadSample("unreadable", repr(e)))
    label = extra.pop("label", None)
    return {"key": sanitize_key(key), "image": path, "captions": caps, "scores": scores, "label": label,
            "extra": extra, "origin": path}


def _manifest_rows(path: str) -> Iterator[Dict]:
    low = path.lower()
    if low.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        row = {"__bad__": f"not UTF-8 JSON ({e})"}
                    yield row if isinstance(row, dict) else {"__bad__": f"a {type(row).__name__}, not an object"}
    elif low.endswith((".csv", ".tsv")):
        with open(path, newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if low.endswith(".tsv") else ",")
    elif low.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        for batch in table.to_batches():
            yield from batch.to_pylist()
    else:
        raise SourceError(f"{path}: unknown manifest type (want .jsonl, .csv, .tsv or .parquet)")


def manifest_records(path: str) -> Records:
    """JSONL / CSV / Parquet rows: an image column (relative to the manifest, or a ``file://`` URL), caption(s),
    scores, label. A remote URL is an error: downloading is not the builder's job."""
    if not os.path.isfile(path):
        raise SourceError(f"manifest {path!r} not found (resolved to {os.path.abspath(path)})")
    return Records(_manifest_records(path), total=_manifest_len(path))


def _manifest_records(path: str) -> Iterator[Dict]:
    base = os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(_manifest_rows(path)):
        origin = f"{path}:{i + 1}"
        if "__bad__" in row:
            yield _error(f"{i:09d}", origin, BadSample("bad_row", row["__bad__"]))
            continue
        img_col = next((c for c in _IMAGE_COLUMNS if row.get(c)), None)
        img = _local_image(row.get(img_col), img_col, origin, base) if img_col else None
        key = row.get("key") or (os.path.splitext(os.path.basename(img))[0] if img else f"{i:09d}")
        try:
            for col in ("captions", "scores"):
                if isinstance(row.get(col), str):
                    row[col] = parse_json_meta(row[col])
            caps, scores = _captions_and_scores(row)
            label = row.get("label")
            label = parse_label(label) if label not in (None, "") else None
        except BadSample as e:
            yield _error(str(key), origin, BadSample("bad_row", e.detail))
            continue
        yield {"key": sanitize_key(str(key)), "image": img or "", "captions": caps, "scores": scores,
               "label": label, "extra": {}, "origin": origin}


def _local_image(value, column: str, origin: str, base: str) -> Optional[str]:
    """A manifest's image cell as a local path; ``file://`` URLs are local, other URLs are refused."""
    if not isinstance(value, str) or not value:
        return None
    scheme = urllib.parse.urlparse(value).scheme
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlparse(value).path)
    if len(scheme) > 1:  # http(s), s3, ... (a one-letter scheme is a Windows drive)
        raise SourceError(f"{origin}: column {column!r} holds the URL {value[:80]!r}; the builder does not "
                          f"download (download first, e.g. with img2dataset, then re-shard with --kind wds), "
                          f"or give local paths or file:// URLs")
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


def _manifest_len(path: str) -> Optional[int]:
    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    if low.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None  # CSV: quoted newlines make line counts wrong


def expand_shard_spec(spec: str) -> List[str]:
    """A directory (all ``*.tar`` in it), a glob, or a brace spec ``dir/name-{000000..000009}.tar``."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    out = []
    for part in braceexpand.braceexpand(spec):
        out.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    return out


def wds_records(spec: str) -> Records:
    """Samples of existing WebDataset / img2dataset shards (re-shard, filter). A shard that cannot be opened
    or is cut short becomes one error record (the builder counts it); its complete samples are kept. A bad
    sample (json, caption or class label) becomes an error record of its own; the rest of its shard is read."""
    urls = expand_shard_spec(spec)
    if all(is_local(u) for u in urls) and not any(os.path.exists(u) for u in urls):
        raise SourceError(f"no shard found for {spec!r} (resolved against {os.getcwd()})")
    return Records(_wds_records(urls), total=_wds_total(urls))


def _wds_total(urls: List[str]) -> Optional[int]:
    """Samples in the input shards, from our ``index.json`` beside them or img2dataset's ``<shard>_stats.json``
    (``successes``); None when a shard has neither."""
    total, indexes = 0, {}
    for u in urls:
        d = os.path.dirname(u)
        if d not in indexes:
            try:
                with open(os.path.join(d, "index.json")) as f:
                    indexes[d] = {s["name"]: int(s["count"]) for s in json.load(f)["shards"]}
            except (OSError, ValueError, KeyError, TypeError):
                indexes[d] = {}
        count = indexes[d].get(os.path.basename(u))
        if count is None:
            try:
                with open(os.path.splitext(u)[0] + "_stats.json") as f:
                    count = int(json.load(f)["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        total += count
    return total


def _wds_records(urls: List[str]) -> Iterator[Dict]:
    for url in urls:
        got = 0
        samples = iter_shard(url)
        while True:
            try:
                _, members = next(samples)
            except StopIteration:
                break
            except (OSError, tarfile.TarError, EOFError, ValueError) as e:
                yield {"key": os.path.basename(url), "image": None, "origin": url, "detail": repr(e),
                       "error": "truncated_shard" if got else "unreadable_shard"}
                break
            got += 1
            key = members.pop("__key__")
            try:
                yield _wds_sample_to_record(key, members, url)
            except BadSample as e:
                yield _error(key, f"{url}:{key}", e)


def _wds_sample_to_record(key: str, members: Dict[str, bytes], url: str) -> Dict:
    img = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), b"")
    meta = parse_json_meta(members["json"]) if "json" in members else {}
    caps, scores = _captions_and_scores(meta)
    t = decode_caption(members.get("txt"))
    if t:
        caps["prompt"] = t
    label = meta.get("label")
    if label is None and "cls" in members:
        label = parse_label(members["cls"])
    extra = {k: v for k, v in meta.items()
             if k not in ("captions", "scores", "clip_scores", "caption", "width", "height", "label",
                          "original_width", "original_height") + _IMG2DATASET_DROP}
    return {"key": sanitize_key(key), "image": img, "captions": caps, "scores": scores, "label": label,
            "extra": extra, "origin": f"{url}:{key}"}


def imagenet_records(root: str, classes: Optional[List[str]] = None) -> Records:
    """ImageNet-style tree ``root/<synset>/<image>``; class index = position in the sorted synset list."""
    classes = classes or imagenet_classes(root)
    files = [(label, synset, f) for label, synset in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, synset))) if f.lower().endswith(IMAGE_EXTS)]
    return Records((_imagenet_record(root, *x) for x in files), total=len(files))


def _imagenet_record(root: str, label: int, synset: str, f: str) -> Dict:
    stem = os.path.splitext(f)[0]
    key = stem if stem.startswith(synset) else f"{synset}_{stem}"
    path = os.path.join(root, synset, f)
    return {"key": sanitize_key(key), "image": path, "captions": {"prompt": synset}, "scores": {},
            "label": label, "extra": {"class_name": synset}, "origin": path}


def imagenet_classes(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise SourceError(f"ImageNet tree {root!r} not found (resolved to {os.path.abspath(root)})")
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
    if not os.path.exists(source):
        raise SourceError(f"source {source!r} not found (resolved to {os.path.abspath(source)})")
    raise SourceError(f"cannot tell what kind of source {source!r} is; pass --kind")
