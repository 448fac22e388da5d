"""The dataset index written beside the shards: shard names, sample counts, build statistics.

``index.json`` = ``{"format": 1, "name": ..., "shards": [{"name", "count", "inputs_end"}, ...], "total": N,
"classes": [...] (class-conditional data only), "stats": {...}}``. ``inputs_end`` is the number of source
records consumed once that shard was complete (it is what lets the builder resume).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

INDEX_NAME = "index.json"
STATS_NAME = "build_stats.json"


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(path: str) -> Dict:
    """Read ``index.json`` from a dataset directory (or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, INDEX_NAME)
    with open(path) as f:
        index = json.load(f)
    if "shards" not in index:
        raise ValueError(f"{path}: not a shard index (no 'shards' entry)")
    return index


def shard_counts(index: Dict) -> List[int]:
    return [int(s["count"]) for s in index["shards"]]


def shard_names(index: Dict) -> List[str]:
    return [s["name"] for s in index["shards"]]


def find_index(directory: str) -> Optional[str]:
    p = os.path.join(directory, INDEX_NAME)
    return p if os.path.exists(p) else None
