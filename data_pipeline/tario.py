"""Reading WebDataset tars sample by sample (local paths seekable; ``pipe:`` commands and URLs streamed)."""
from __future__ import annotations

import logging
import os
import re
import tarfile
from typing import Dict, Iterator, Tuple

import webdataset as wds

log = logging.getLogger(__name__)


def iter_shard(url: str, skip: int = 0) -> Iterator[Tuple[int, Dict[str, bytes]]]:
    """``(member_index, {ext: bytes, "__key__": key})`` for each sample of one tar, from ``skip`` on.

    Opens through ``webdataset.gopen`` (local files, ``pipe:`` commands, http). Raises ``OSError`` /
    ``tarfile.TarError`` when the shard cannot be opened or is truncated.
    """
    if is_local(url):  # seekable: skipping members on resume does not read their data
        stream = open(url[len("file:"):] if url.startswith("file:") else url, "rb", buffering=1 << 20)
        mode = "r:"
    else:
        stream, mode = wds.gopen(url, "rb", bufsize=1 << 20), "r|*"
    try:
        tf = tarfile.open(fileobj=stream, mode=mode, bufsize=1 << 20)
        cur_key, cur, idx = None, {}, -1
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if "." not in base or base.startswith("."):
                continue
            key, ext = base.split(".", 1)
            key = os.path.join(os.path.dirname(m.name), key)
            if key != cur_key:
                if cur_key is not None and idx >= skip:
                    yield idx, cur
                idx, cur_key, cur = idx + 1, key, {"__key__": key}
            if idx >= skip:
                cur[ext.lower()] = tf.extractfile(m).read()
        # A complete tar ends with two zero blocks and tarfile stops after reading the first one; a tar cut
        # on a header boundary ends silently instead, so check the second block is there before trusting
        # the last sample.
        if len(tf.fileobj.read(512)) < 512:
            raise tarfile.ReadError(f"{url}: truncated tar (no end-of-archive marker)")
        if cur_key is not None and idx >= skip:
            yield idx, cur
    finally:
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - a pipe closed early exits non-zero (SIGPIPE); nothing is lost
            log.debug("closing %s: %r", url, e)


def is_local(url: str) -> bool:
    return url.startswith("file:") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url)


def shard_name(url: str) -> str:
    """``name-000001.tar`` for a path, an URL or a ``pipe:`` command that mentions the tar."""
    tars = [t for t in url.split() if ".tar" in t]
    return os.path.basename((tars[-1] if tars else url).rstrip("/"))
