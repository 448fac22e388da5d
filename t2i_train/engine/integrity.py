"""Checkpoint integrity: a manifest (size + sha256 of every file) written last, verified before anything is loaded.

`write_manifest(dir, hash_files)` records every file under `dir` (all ranks' files: the directory is on a shared
file system); `verify(dir, mode)` returns None for an intact checkpoint or a one-line reason naming the bad file.
With several ranks both are collective: each rank hashes a slice of the files and the results are gathered, so
hashing a large checkpoint costs 1/world_size of its bytes per rank. `fsync_tree` makes a save durable before the
rename that publishes it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import dist as d

MANIFEST = "manifest.json"
FORMAT = "pixeldit-checkpoint/1"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and `root`): what this node wrote reaches the disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_text_durably(path: Path, text: str) -> None:
    """Write aside, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def list_files(root: Path) -> list[str]:
    """Relative paths of every file under `root` except the manifest, sorted (the same order on every rank)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _hash_shared(root: Path, files: list[str]) -> dict[str, str]:
    """sha256 of `files`, each rank hashing every world_size-th one; every rank gets all digests."""
    mine = {rel: sha256_file(root / rel) for rel in files[d.rank()::d.world_size()]}
    merged: dict[str, str] = {}
    for part in d.all_gather_object(mine):
        merged.update(part)
    return merged


def write_manifest(root: Path, step: int, hash_files: bool = True) -> None:
    """Collective. Records every file under `root`; rank 0 writes `manifest.json` durably."""
    files = d.broadcast_object(list_files(root) if d.is_main() else None)
    digests = _hash_shared(root, files) if hash_files else {}
    if d.is_main():
        entries = {}
        for rel in files:
            entries[rel] = {"size": (root / rel).stat().st_size}
            if rel in digests:
                entries[rel]["sha256"] = digests[rel]
        write_text_durably(root / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": entries},
                                                       indent=1))


def _cheap_check(root: Path) -> tuple[str | None, dict]:
    """Manifest present and readable, every listed file present with its size, nothing unlisted."""
    path = root / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (the save did not finish)", {}
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST}: unreadable ({e})", {}
    on_disk = set(list_files(root))
    for rel in sorted(files):
        if rel not in on_disk:
            return f"{rel}: missing", {}
        size = (root / rel).stat().st_size
        if size != files[rel].get("size"):
            return f"{rel}: {size} bytes, the manifest says {files[rel].get('size')}", {}
    extra = sorted(on_disk - set(files))
    if extra:
        return f"{extra[0]}: not in the manifest (planted or left over; refusing to load it)", {}
    return None, files


def verify(root: Path, mode: str = "sha256") -> str | None:
    """Collective. None when the checkpoint at `root` is complete and intact, else a reason naming the file.

    mode "size": sizes and the file list only; "sha256": also every file's digest (streamed).
    """
    reason, files = _cheap_check(root) if d.is_main() else (None, None)
    reason, files = d.broadcast_object((reason, files))
    if reason is not None or mode != "sha256":
        return reason
    names = sorted(files)
    digests = _hash_shared(root, names)
    for rel in names:
        want = files[rel].get("sha256")
        if want is not None and digests[rel] != want:
            return f"{rel}: sha256 differs from the manifest (damaged)"
    return None
