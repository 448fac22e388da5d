"""Exactly-resumable streaming loader over WebDataset shards, with aspect-ratio buckets.

How samples flow (one *stream* = one independent, deterministic reader):

    shards of stream g (seeded shard shuffle per epoch, split across all streams of the job)
      -> raw samples -> shuffle buffer (raw bytes) -> decode + caption choice + bucket resize/crop
      -> per-bucket accumulation -> batch of one bucket shape

Decoding (:mod:`data_pipeline.decode`) caps decoded pixels, applies EXIF orientation, converts any mode to
8-bit RGB and decodes JPEGs at reduced size when the bucket allows; per-sample fields are validated by
:mod:`data_pipeline.sample_meta`. A bad sample is counted under its reason and skipped, never a crash.

Each rank runs ``streams_per_rank`` streams; dataloader worker ``w`` of ``W`` serves the streams
``l % W == w``. Streams, not workers, own the data order, so a job may resume with a different number of
workers. Every batch leaves its worker with the state of its stream right after it; the main process keeps
the state of the last batch it handed out per stream, which is exactly what ``state_dict()`` returns:
per stream the shard cursor (epoch, shard, offset) of every dataset, the shuffle RNG, and the *locators*
``(dataset, epoch, shard, member)`` of the samples in the shuffle buffer and in partly filled buckets.
Restoring re-reads those samples; every per-sample random choice (caption source, crop, text dropout) is
seeded by the locator, so a restored sample is bit-identical to the one that was in memory.

Exactly once: in epoch ``e`` of a dataset, its shards are permuted with ``(seed, dataset, e)`` and stream
``g`` of ``G`` takes shards ``g, g+G, ...``; with fewer shards than streams every stream reads all shards
and keeps sample ``i`` (global position in the epoch) when ``i % G == g`` (needs the dataset index).

Transport: a worker writes each batch as uint8 NCHW into recycled shared memory (a fresh segment per batch
costs a page fault per 4 KiB); the main process turns it into float32 NCHW in [-1, 1] on arrival (or hands
out uint8 with ``image_dtype="uint8"`` for normalising on the accelerator).
"""
from __future__ import annotations

import copy
import io
import logging
import os
import random
import tarfile
import time
import warnings
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.buckets import BucketSpec
from data_pipeline.captions import MAIN_SOURCE, caption_dropout, captions_from_json, choose_caption
from data_pipeline.decode import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_to_bucket
from data_pipeline.sample_meta import BadSample, decode_caption, parse_json_meta, parse_label
from data_pipeline.shard_index import find_index, read_index
from data_pipeline.tario import is_local, iter_shard, shard_name

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STATE_VERSION = 1
BAD_DATA_REASONS = ("decode_error", "too_large", "missing_image", "missing_caption", "truncated_shard",
                    "unreadable_shard", "bad_json", "bad_caption", "bad_label")


# ----------------------------------------------------------------------------------------------- datasets
class DatasetSpec:
    """One dataset: its shard URLs (local paths, ``pipe:`` commands, http...), sample counts, mixing weight."""

    def __init__(self, urls: Sequence[str], counts: Optional[Sequence[int]] = None, weight: float = 1.0,
                 name: str = ""):
        self.urls, self.counts = list(urls), (list(counts) if counts is not None else None)
        self.weight, self.name = float(weight), name
        if not self.urls:
            raise ValueError(f"dataset {name!r} has no shards")

    @classmethod
    def from_config(cls, entry, base_dir: Optional[str] = None) -> "DatasetSpec":
        """``"dir"`` | ``{"path": dir}`` | ``{"urls": "pipe:aws s3 cp s3://b/x-{000000..000099}.tar -",
        "index": "index.json"}``, each with an optional ``weight``. Relative local paths resolve against
        ``base_dir`` (default: the current directory); a local path that does not exist is an error."""
        if isinstance(entry, str):
            entry = {"path": entry}
        weight = entry.get("weight", 1.0)
        path = entry.get("path")
        if path and not _is_spec(path):
            path = _existing(path, base_dir, "dataset path")
        if path and os.path.isdir(path):
            idx_path = _existing(entry["index"], base_dir, "index") if entry.get("index") else find_index(path)
            if not idx_path:
                raise FileNotFoundError(f"{path}: no index.json (build the shards with t2i-build-shards)")
            index = _read_checked_index(idx_path)
            urls = [os.path.join(path, s["name"]) for s in index["shards"]]
            return cls(urls, [s["count"] for s in index["shards"]], weight,
                       entry.get("name", index.get("name", entry["path"])))
        spec = entry.get("urls") or path
        if not spec:
            raise ValueError(f"dataset entry {entry!r} needs 'path' (a shard directory) or 'urls'")
        specs = spec if isinstance(spec, list) else [spec]
        urls = [u for s in specs for u in braceexpand.braceexpand(s)]
        urls = [_existing(u, base_dir, "shard") if is_local(u) and not u.startswith("file:") else u for u in urls]
        counts = None
        if entry.get("index"):
            index = _read_checked_index(_existing(entry["index"], base_dir, "index"))
            by_name = {s["name"]: s["count"] for s in index["shards"]}
            counts = [by_name.get(shard_name(u)) for u in urls]
            counts = None if any(c is None for c in counts) else counts
        return cls(urls, counts, weight, entry.get("name", specs[0]))


def _is_spec(path: str) -> bool:
    """A brace range, a ``pipe:`` command or a URL rather than one local directory."""
    return "{" in path or not is_local(path)


def _existing(path: str, base_dir: Optional[str], what: str) -> str:
    """``path`` resolved against ``base_dir`` (or the current directory); an error naming both if missing."""
    given = os.path.expanduser(path)
    base = os.path.abspath(base_dir) if base_dir else os.getcwd()
    resolved = given if os.path.isabs(given) else os.path.normpath(os.path.join(base, given))
    if not os.path.exists(resolved):
        where = "" if os.path.isabs(given) else (
            f", relative to {'base directory ' + base if base_dir else 'the current directory ' + base}")
        raise FileNotFoundError(f"{what} {path!r} not found (resolved to {resolved}{where})")
    return resolved


def _read_checked_index(path: str) -> Dict:
    index = read_index(path)
    if index.get("complete") is False:
        log.warning("%s: the shard build did not finish (complete: false); using the %d samples written so far "
                    "(finish it with t2i-build-shards ... --resume)", path, sum(s["count"] for s in index["shards"]))
    return index


# -------------------------------------------------------------------------------------------- the stream
def _plan(ds: DatasetSpec, ds_idx: int, epoch: int, sid: int, nstreams: int, seed: int, shuffle: bool):
    """Tasks ``(shard_index, stride, phase, base)`` of stream ``sid`` for one epoch of dataset ``ds_idx``."""
    order = list(range(len(ds.urls)))
    if shuffle:
        random.Random(f"shards-{seed}-{ds_idx}-{epoch}").shuffle(order)
    if len(order) >= nstreams:
        return [(order[i], 1, 0, 0) for i in range(sid, len(order), nstreams)]
    if ds.counts is None:
        raise ValueError(f"dataset {ds.name!r}: {len(order)} shards for {nstreams} streams and no index with "
                         f"sample counts; give it an index.json or use fewer ranks x streams")
    tasks, base = [], 0
    for s in order:
        tasks.append((s, nstreams, sid, base))
        base += ds.counts[s]
    return tasks


class _Cursor:
    """Sequential reader of one dataset for one stream; ``epoch, task, offset`` is its whole position."""

    def __init__(self, loader_cfg, ds: DatasetSpec, ds_idx: int, sid: int, state: Optional[Dict], counters: Counter,
                 warn):
        self.cfg, self.ds, self.ds_idx, self.sid = loader_cfg, ds, ds_idx, sid
        st = state or {"epoch": 0, "task": 0, "offset": 0, "done": False, "yielded_in_epoch": 0}
        self.epoch, self.task, self.offset, self.done = st["epoch"], st["task"], st["offset"], st["done"]
        self.yielded_in_epoch = st.get("yielded_in_epoch", 0)
        self.counters, self.warn = counters, warn
        self._it, self._tasks_epoch, self._tasks = None, None, None

    def state(self) -> Dict:
        return {"epoch": self.epoch, "task": self.task, "offset": self.offset, "done": self.done,
                "yielded_in_epoch": self.yielded_in_epoch}

    def tasks(self, epoch):
        if self._tasks_epoch != epoch:
            self._tasks = _plan(self.ds, self.ds_idx, epoch, self.sid, self.cfg["nstreams"], self.cfg["seed"],
                                self.cfg["shuffle_shards"])
            self._tasks_epoch = epoch
        return self._tasks

    def next(self) -> Optional[Dict]:
        """Next raw sample of this stream (with its locator), or None once the last epoch is done."""
        while not self.done:
            tasks = self.tasks(self.epoch)
            if self.task >= len(tasks):
                if self.yielded_in_epoch == 0 and self.cfg["epochs"] is None and self.epoch > 0:
                    self.warn("empty_stream", f"dataset {self.ds.name}", f"stream {self.sid}",
                              "a whole epoch yielded no sample; stopping this dataset for this stream")
                    self.done = True
                    break
                self.epoch, self.task, self.offset, self.yielded_in_epoch = self.epoch + 1, 0, 0, 0
                self._it = None
                if self.cfg["epochs"] is not None and self.epoch >= self.cfg["epochs"]:
                    self.done = True
                continue
            shard, stride, phase, base = tasks[self.task]
            url = self.ds.urls[shard]
            if self._it is None:
                self._it = iter_shard(url, skip=self.offset)
            try:
                member, sample = next(self._it)
            except StopIteration:
                expected = self.ds.counts[shard] if self.ds.counts else None
                if expected is not None and self.offset < expected:  # tar ended early on a header boundary
                    self._shard_fault("truncated_shard", shard, stride, phase, f"after member {self.offset}",
                                      f"{expected} samples in the index")
                self._advance_shard()
                continue
            except (OSError, tarfile.TarError, EOFError, ValueError) as e:
                reason = "unreadable_shard" if self.offset == 0 else "truncated_shard"
                self._shard_fault(reason, shard, stride, phase, f"after member {self.offset}", repr(e))
                self._advance_shard()
                continue
            self.offset = member + 1
            if stride > 1 and (base + member) % stride != phase:
                continue
            self.yielded_in_epoch += 1
            sample["__loc__"] = (self.ds_idx, self.epoch, shard, member)
            sample["__url__"] = url
            return sample
        return None

    def _shard_fault(self, reason, shard, stride, phase, where, detail):
        # With fewer shards than streams every stream reads every shard: only the stream that owns the shard
        # (shard % stride == phase) counts and reports its fault, so the job counts it once.
        if stride == 1 or shard % stride == phase:
            self.counters[reason] += 1
            self.warn(reason, shard_name(self.ds.urls[shard]), where, detail)

    def _advance_shard(self):
        self._it, self.task, self.offset = None, self.task + 1, 0


def _reread(datasets: List[DatasetSpec], locs: List[Tuple]) -> Dict[Tuple, Dict]:
    """Fetch the raw samples at ``locs`` (used when restoring buffers and buckets)."""
    by_shard: Dict[Tuple[int, int], List[int]] = {}
    for d, _, s, m in locs:
        by_shard.setdefault((d, s), []).append(m)
    found: Dict[Tuple[int, int, int], Dict] = {}
    for (d, s), members in by_shard.items():
        want, url = set(members), datasets[d].urls[s]
        for m, sample in iter_shard(url, skip=min(want)):
            if m in want:
                sample["__url__"] = url
                found[(d, s, m)] = sample
                want.discard(m)
                if not want:
                    break
        if want:
            raise RuntimeError(f"cannot restore loader state: members {sorted(want)} missing from {url}")
    out = {}
    for loc in locs:
        d, e, s, m = loc
        sample = dict(found[(d, s, m)])
        sample["__loc__"] = tuple(loc)
        out[tuple(loc)] = sample
    return out


class _Stream:
    """One deterministic reader: datasets mixed by weight -> shuffle buffer -> decode -> buckets -> batches."""

    def __init__(self, cfg: Dict, datasets: List[DatasetSpec], sid: int, state: Optional[Dict]):
        self.cfg, self.datasets, self.sid = cfg, datasets, sid
        self.spec = BucketSpec(cfg["bucket_mode"], cfg["resolution"], cfg["crop"], table=cfg["bucket_table"])
        self.counters = Counter((state or {}).get("counters", {}))
        self._warned = set()
        self.rng = random.Random(f"stream-{cfg['seed']}-{sid}")
        if state and state.get("rng") is not None:
            self.rng.setstate(_tuplify(state["rng"]))
        cur_states = (state or {}).get("cursors", {})
        self.cursors = [_Cursor(cfg, ds, i, sid, cur_states.get(i, cur_states.get(str(i))), self.counters,
                                self._warn) for i, ds in enumerate(datasets)]
        self.batches = (state or {}).get("batches", 0)
        self.shared = get_worker_info() is not None
        self.buffer: List[Dict] = []
        self.buckets: "OrderedDict[Tuple[int, int], List[Dict]]" = OrderedDict()
        if state:
            buf_locs = [tuple(x) for x in state.get("buffer", [])]
            bucket_locs = {tuple(int(v) for v in k.split("x")): [tuple(x) for x in v]
                           for k, v in state.get("buckets", {}).items()}
            all_locs = buf_locs + [l for v in bucket_locs.values() for l in v]
            raw = _reread(datasets, all_locs) if all_locs else {}
            self.buffer = [raw[l] for l in buf_locs]
            for b, locs in bucket_locs.items():
                items = [self.process(raw[l], count=False) for l in locs]
                self.buckets[b] = [it for it in items if it is not None]

    # ---- state
    def state(self) -> Dict:
        return {"sid": self.sid, "batches": self.batches, "rng": self.rng.getstate(),
                "cursors": {i: c.state() for i, c in enumerate(self.cursors)},
                "buffer": [s["__loc__"] for s in self.buffer],
                "buckets": {f"{h}x{w}": [it["loc"] for it in v] for (h, w), v in self.buckets.items() if v},
                "counters": dict(self.counters)}

    def _warn(self, reason, shard, key, detail=""):
        if (reason, shard, key) not in self._warned:
            self._warned.add((reason, shard, key))
            log.warning("bad data (%s) in shard %s, key %s: %s", reason, shard, key, detail)

    # ---- per-sample processing (deterministic in the locator)
    def process(self, sample: Dict, count: bool = True) -> Optional[Dict]:
        cfg, loc = self.cfg, tuple(sample["__loc__"])
        key, shard = sample.get("__key__", "?"), shard_name(sample.get("__url__", "?"))
        prng = random.Random("sample-{}-{}-{}-{}-{}".format(cfg["seed"], *loc))

        def bad(reason, detail=""):
            if count:
                self.counters[reason] += 1
                self._warn(reason, shard, key, detail)
            return None

        try:
            meta = parse_json_meta(sample["json"]) if "json" in sample else {}
            txt = decode_caption(sample.get("txt"))
            label = meta.get("label")
            if label is None and "cls" in sample:
                label = parse_label(sample["cls"])
        except BadSample as e:
            return bad(e.reason, e.detail)
        captions = captions_from_json(meta, txt)
        if cfg["use_text_emb"]:
            source, caption = MAIN_SOURCE, captions.get(MAIN_SOURCE, txt or "")
        else:
            source, caption = choose_caption(captions, meta.get("scores"), prng, cfg["clip_thr"],
                                             cfg["clip_thr_temperature"], cfg["caption_proportion"])
        require = cfg["require_caption"] if cfg["require_caption"] is not None else label is None
        if require and not caption:
            return bad("missing_caption")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            return bad("missing_image")
        try:
            img, bucket = decode_to_bucket(sample[ext], self.spec, prng, cfg["max_pixels"])
        except ImageTooLarge as e:
            return bad("too_large", str(e))
        except Exception as e:  # noqa: BLE001 - any decoder failure is bad data, never a crash
            return bad("decode_error", repr(e))
        dropped = caption_dropout([caption], cfg["text_dropout"], prng)[0] == "" and caption != ""
        if cfg["hflip"] and prng.random() < 0.5:
            img = img[:, ::-1] if isinstance(img, np.ndarray) else img.transpose(Image.FLIP_LEFT_RIGHT)
        item = {"loc": loc, "key": key, "bucket": bucket, "pixels": img,
                "caption": "" if dropped else caption, "dropped": dropped, "label": label,
                "meta": {**{k: v for k, v in meta.items() if k not in ("captions", "scores")},
                         "caption_source": source, "shard": shard}}
        if cfg["use_text_emb"]:
            try:
                item["text_emb"] = torch.from_numpy(np.load(io.BytesIO(sample["txt_emb.npy"])))
                m = sample.get("txt_mask.npy")
                item["text_mask"] = (torch.from_numpy(np.load(io.BytesIO(m))).bool() if m is not None
                                     else torch.ones(item["text_emb"].shape[0], dtype=torch.bool))
            except (KeyError, ValueError, OSError) as e:
                return bad("missing_text_emb", repr(e))
        return item

    # ---- the stream
    def _fill(self):
        weights = [ds.weight for ds in self.datasets]
        while len(self.buffer) < self.cfg["shuffle_buffer"]:
            active = [i for i, c in enumerate(self.cursors) if not c.done]
            if not active:
                return
            i = active[0] if len(active) == 1 else self.rng.choices(active, [weights[a] for a in active])[0]
            sample = self.cursors[i].next()
            if sample is not None:
                self.buffer.append(sample)

    def _pop(self) -> Dict:
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def __iter__(self):
        bs = self.cfg["batch_size"]
        while True:
            self._fill()
            if not self.buffer:
                break
            item = self.process(self._pop())
            if item is None:
                continue
            bucket = self.buckets.setdefault(item["bucket"], [])
            bucket.append(item)
            if len(bucket) >= bs:
                items = self.buckets.pop(item["bucket"])
                self.batches += 1
                yield collate(items, self.shared), self.state()
        if not self.cfg["drop_last"]:  # finite run: flush partial buckets in a fixed order
            for b in sorted(self.buckets):
                items = self.buckets.pop(b)
                if items:
                    self.batches += 1
                    yield collate(items, self.shared), self.state()


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def collate(items: List[Dict], shared: bool = False) -> Dict:
    """One bucket's items -> batch; ``image`` is uint8 NCHW here (4x less to move between processes than float).

    Planes, not interleaved pixels: torch's resize (the reduced-decoding and cover-grid paths) writes planes, so
    its crops go in as plain row copies; decoder crops and PIL images are interleaved and transposed here."""
    h, w = items[0]["bucket"]
    shape = (len(items), 3, h, w)
    # In a worker: written in place in (recycled) shared memory, so the dataloader sends it without a copy.
    pix = (_SHM_RING if shared else _LOCAL_RING).take(shape)
    with warnings.catch_warnings():  # the buffers are read-only; they are only read
        warnings.simplefilter("ignore", UserWarning)
        for i, it in enumerate(items):
            p = it["pixels"]
            if isinstance(p, np.ndarray):  # an HWC view (any strides, flips included): one copy into the batch
                pix[i].numpy()[...] = p.transpose(2, 0, 1)
            else:
                pix[i].copy_(torch.frombuffer(_rgb_bytes(p), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1))
    batch = {"image": pix,
             "caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
             "meta": [it["meta"] for it in items],
             "dropped": torch.tensor([it["dropped"] for it in items], dtype=torch.bool)}
    if all(it["label"] is not None for it in items):
        batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    if "text_emb" in items[0]:
        L = max(it["text_emb"].shape[0] for it in items)
        D = items[0]["text_emb"].shape[1]
        emb = torch.zeros(len(items), L, D, dtype=items[0]["text_emb"].dtype)
        mask = torch.zeros(len(items), L, dtype=torch.bool)
        for i, it in enumerate(items):
            n = it["text_emb"].shape[0]
            emb[i, :n], mask[i, :n] = it["text_emb"], it["text_mask"][:n]
        batch["text_emb"], batch["text_mask"] = emb, mask
    return batch


def _rgb_bytes(img: Image.Image) -> bytes:
    """Packed RGB bytes of ``img`` in one encoder call (``tobytes`` encodes in 64 KiB pieces and joins them)."""
    try:
        enc = Image._getencoder("RGB", "raw", "RGB")
        try:
            enc.setimage(img.im, (0, 0, *img.size))
            _, err, data = enc.encode(img.width * img.height * 3 + 65536)
        finally:
            enc.cleanup()
        if err > 0:  # finished in one call
            return data
    except Exception:  # noqa: BLE001 - private PIL API: fall back to the public one
        pass
    return img.tobytes()


def to_float_image(pix: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 [0, 255] NCHW -> float32 [-1, 1] (also usable on the accelerator: ``to_float_image(x.cuda())``)."""
    out = torch.empty(pix.shape, dtype=torch.float32, device=pix.device) if out is None else out
    return out.copy_(pix).div_(127.5).sub_(1.0)


class _ShmRing:
    """Recycled shared-memory batch buffers of a dataloader worker.

    Fresh shared memory costs a page fault per 4 KiB on first touch, as much as decoding on some hosts.
    A buffer is rewritten only ``depth`` batches of its shape later; the main process converts (copies) each
    batch as soon as it arrives and a worker is never more than ``prefetch_factor + 1`` batches ahead of
    that, so ``depth = prefetch_factor + 3`` never overwrites a batch still in use.
    """

    def __init__(self, depth: int = 5, max_bytes: int = 1 << 30, shared: bool = True):
        self.depth, self.max_bytes, self.shared, self.rings = depth, max_bytes, shared, OrderedDict()

    def _new(self, shape) -> torch.Tensor:
        buf = torch.empty(shape, dtype=torch.uint8)
        return buf.share_memory_() if self.shared else buf

    def take(self, shape) -> torch.Tensor:
        if self.max_bytes <= 0:
            return self._new(shape)
        ring = self.rings.pop(shape, None) or []
        if len(ring) < self.depth:
            buf = self._new(shape)
        else:
            buf = ring.pop(0)
        ring.append(buf)
        self.rings[shape] = ring  # most recently used last
        while sum(b.numel() for r in self.rings.values() for b in r) > self.max_bytes and len(self.rings) > 1:
            self.rings.popitem(last=False)
        return buf


_SHM_RING = _ShmRing()
# In-process loading (no workers): ShardLoader converts (copies) each batch before asking for the next one.
_LOCAL_RING = _ShmRing(depth=2, shared=False)


class _FloatPool:
    """Float batch buffers of the main process, reused once nothing references them any more.

    A batch gets a *view* of a pooled buffer; while the trainer (or any tensor derived from the batch without
    a copy) holds it, the storage's use count stays above one and the buffer is not handed out again.
    Avoids a fresh multi-MiB allocation (and its page faults) per batch.
    """

    def __init__(self, per_shape: int = 4):
        self.per_shape, self.bufs = per_shape, {}

    def get(self, shape) -> torch.Tensor:
        bufs = self.bufs.setdefault(tuple(shape), [])
        for b, ref, idle in bufs:
            try:
                free = torch._C._storage_Use_Count(ref.cdata) == idle  # no view of it is alive
            except Exception:  # noqa: BLE001 - private API gone: fall back to fresh buffers
                return torch.empty(shape, dtype=torch.float32)
            if free:
                return b.view(b.shape)
        b = torch.empty(shape, dtype=torch.float32)
        if len(bufs) < self.per_shape:
            ref = StorageWeakRef(b.untyped_storage())
            bufs.append((b, ref, torch._C._storage_Use_Count(ref.cdata)))
            return b.view(b.shape)
        return b


# ------------------------------------------------------------------------------------------ torch plumbing
class _StreamsDataset(IterableDataset):
    def __init__(self, cfg, datasets, states: Dict[int, Dict]):
        self.cfg, self.datasets, self.states = cfg, datasets, states

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        _SHM_RING.depth, _SHM_RING.max_bytes = self.cfg["shm_ring_depth"], self.cfg["shm_ring_bytes"]
        _LOCAL_RING.max_bytes = self.cfg["shm_ring_bytes"]
        cfg = self.cfg
        first = cfg["rank"] * cfg["streams_per_rank"]
        sids = [first + l for l in range(cfg["streams_per_rank"]) if l % nw == w]
        streams = [_Stream(cfg, self.datasets, sid, self.states.get(sid)) for sid in sids]
        gens = [(s, iter(s)) for s in streams]
        while gens:  # round-robin over this worker's streams
            for entry in list(gens):
                stream, g = entry
                try:
                    batch, state = next(g)
                except StopIteration:
                    gens.remove(entry)
                    # A finished stream reports its last state (bad-data counts after its last batch).
                    yield {"_stream": stream.sid, "_state": stream.state(), "_final": True}
                    continue
                batch["_stream"], batch["_state"] = stream.sid, state
                batch["_cpu"] = (w, time.process_time())
                yield batch


def _identity(x):
    return x


class ShardLoader:
    """Iterable of batches (see module doc) with ``state_dict`` / ``load_state_dict`` and bad-data counters."""

    def __init__(self, datasets: Sequence, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, bucket_mode: str = "fixed", resolution: int = 512,
                 crop: str = "center", bucket_table=None, hflip: bool = False, shuffle_buffer: int = 1000,
                 shuffle_shards: bool = True, epochs: Optional[int] = None, drop_last: bool = True,
                 streams_per_rank: Optional[int] = None, clip_thr: float = 0.0, clip_thr_temperature: float = 1.0,
                 caption_proportion: Optional[Dict[str, float]] = None, text_dropout: float = 0.0,
                 use_text_emb: bool = False, require_caption: Optional[bool] = None, prefetch_factor: int = 2,
                 pin_memory: bool = False, mp_context: Optional[str] = None, image_dtype: str = "float32",
                 shm_ring_bytes: int = 1 << 30, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 base_dir: Optional[str] = None):
        # Every dataset is resolved and checked here, so a typo stops the run before the first step.
        self.datasets = [d if isinstance(d, DatasetSpec) else DatasetSpec.from_config(d, base_dir) for d in datasets]
        spr = streams_per_rank or max(1, num_workers)
        self.cfg = {"batch_size": int(batch_size), "rank": int(rank), "world_size": int(world_size),
                    "seed": int(seed), "bucket_mode": bucket_mode, "resolution": int(resolution), "crop": crop,
                    "bucket_table": bucket_table, "hflip": bool(hflip), "shuffle_buffer": max(1, int(shuffle_buffer)),
                    "shuffle_shards": bool(shuffle_shards), "epochs": epochs, "drop_last": bool(drop_last),
                    "streams_per_rank": int(spr), "nstreams": int(spr) * int(world_size),
                    "clip_thr": float(clip_thr), "clip_thr_temperature": float(clip_thr_temperature),
                    "caption_proportion": caption_proportion, "text_dropout": float(text_dropout),
                    "use_text_emb": bool(use_text_emb), "require_caption": require_caption,
                    "shm_ring_depth": int(prefetch_factor) + 3, "shm_ring_bytes": int(shm_ring_bytes),
                    "max_pixels": int(max_pixels) if max_pixels else None}
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        if image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be float32 or uint8, got {image_dtype!r}")
        self.image_dtype = image_dtype  # uint8: [0, 255], for trainers that normalise on the accelerator
        self.mp_context = mp_context
        self._float_pool = _FloatPool()
        self.worker_cpu_s: Dict[int, float] = {}  # CPU seconds of each worker when it made its last batch
  # None = torch's default (fork on Linux); "spawn" / "forkserver" work too
        self._states: Dict[int, Dict] = {}
        BucketSpec(bucket_mode, resolution, crop, table=bucket_table)  # validate early

    # -- iteration
    def __iter__(self):
        ds = _StreamsDataset(dict(self.cfg), self.datasets, copy.deepcopy(self._states))
        nw = min(self.num_workers, self.cfg["streams_per_rank"])
        kw = dict(prefetch_factor=self.prefetch_factor, multiprocessing_context=self.mp_context) if nw > 0 else {}
        dl = DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=self.pin_memory, collate_fn=_identity,
                        **kw)
        for batch in dl:
            self._states[int(batch.pop("_stream"))] = batch.pop("_state")
            if "_cpu" in batch:
                w, cpu = batch.pop("_cpu")
                self.worker_cpu_s[w] = cpu
            if not batch.pop("_final", False):
                pix = batch["image"]  # NCHW uint8 from the stream
                if self.image_dtype == "float32":
                    batch["image"] = to_float_image(pix, self._float_pool.get(pix.shape))
                else:  # a copy: the worker recycles its shared buffers
                    batch["image"] = pix.clone(memory_format=torch.contiguous_format)
                del pix
                yield batch

    # -- resumption
    def state_dict(self) -> Dict:
        return {"version": STATE_VERSION, "seed": self.cfg["seed"], "world_size": self.cfg["world_size"],
                "rank": self.cfg["rank"], "streams_per_rank": self.cfg["streams_per_rank"],
                "batch_size": self.cfg["batch_size"], "streams": copy.deepcopy(self._states)}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        if state["world_size"] != self.cfg["world_size"]:
            raise ValueError(f"loader state was saved with world_size={state['world_size']}, this run has "
                             f"{self.cfg['world_size']}: resuming across a different number of ranks is not "
                             f"supported")
        if state["seed"] != self.cfg["seed"]:
            raise ValueError(f"loader state seed {state['seed']} != configured seed {self.cfg['seed']}")
        spr = int(state["streams_per_rank"])
        self.cfg.update(streams_per_rank=spr, nstreams=spr * self.cfg["world_size"])
        self._states = {int(k): v for k, v in copy.deepcopy(state["streams"]).items()}

    # -- monitoring
    @property
    def bad_data_counters(self) -> Dict[str, int]:
        total = Counter()
        for st in self._states.values():
            total.update(st.get("counters", {}))
        return {k: int(total.get(k, 0)) for k in sorted(set(BAD_DATA_REASONS) | set(total))}

    def epoch_size(self) -> Optional[int]:
        """Samples in one epoch of all datasets (from the indexes), or None when a count is unknown."""
        if any(d.counts is None for d in self.datasets):
            return None
        return sum(sum(d.counts) for d in self.datasets)


def build_loader(data_cfg: Dict, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 batch_size: Optional[int] = None, resolution: Optional[int] = None,
                 bucket_mode: Optional[str] = None, text_dropout: Optional[float] = None,
                 num_workers: Optional[int] = None, **overrides) -> ShardLoader:
    """Build the loader from a ``data:`` config section (keys = ShardLoader arguments; see docs/INTERFACES.md).

    ``data_cfg["datasets"]`` (or ``"path"``) lists the datasets; explicit keyword arguments win over the dict.
    """
    cfg = dict(data_cfg or {})
    datasets = cfg.pop("datasets", None) or cfg.pop("path", None)
    cfg.pop("path", None)
    if datasets is None:
        raise ValueError("data config needs 'datasets' (list of shard dirs / {path|urls, weight}) or 'path'")
    if not isinstance(datasets, list):
        datasets = [datasets]
    if "multi_scale" in cfg:  # the reference's spelling
        cfg.setdefault("bucket_mode", "multi" if cfg.pop("multi_scale") else "fixed")
    if "image_size" in cfg:
        cfg.setdefault("resolution", cfg.pop("image_size"))
    for k, v in (("batch_size", batch_size), ("resolution", resolution), ("bucket_mode", bucket_mode),
                 ("text_dropout", text_dropout), ("num_workers", num_workers)):
        if v is not None:
            cfg[k] = v
    cfg.update(overrides)
    if "batch_size" not in cfg:
        raise ValueError("batch_size is required")
    known = set(ShardLoader.__init__.__code__.co_varnames[: ShardLoader.__init__.__code__.co_argcount +
                                                         ShardLoader.__init__.__code__.co_kwonlyargcount])
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown data config keys: {unknown}")
    bs = cfg.pop("batch_size")
    return ShardLoader(datasets, bs, rank=rank, world_size=world_size, seed=seed, **cfg)
