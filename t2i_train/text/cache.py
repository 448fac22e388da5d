"""`t2i-encode-text`: cache Gemma-2 caption embeddings inside the shards so training can skip the encoder.

For every shard listed in the dataset's `index.json`, each sample gains `<key>.txt_emb.npy` ([L, D] float16, all
L tokens including padding: released weights were trained seeing them) and `<key>.txt_mask.npy` ([L] bool),
computed from its `txt` caption; the loader reads them with `use_text_emb=True`. Shards are rewritten aside and
renamed into place (or written to `--out`), one at a time, so an interrupted run loses nothing and resumes
(`text_cache.json` records finished shards and the encoder settings). The null condition for CFG dropout
(the empty prompt, no instruction) goes to `null_text_emb.safetensors` (`emb` [1, L, D], `mask` [1, L]).
Under torchrun, shards are split across ranks by index (RANK / WORLD_SIZE); no process group is needed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import time
from typing import Iterator

import numpy as np
import torch

from .gemma import CHI_PROMPT, DEFAULT_GEMMA, GemmaTextEncoder

PROGRESS_NAME = "text_cache.json"
NULL_NAME = "null_text_emb.safetensors"
CACHED_EXTS = ("txt_emb.npy", "txt_mask.npy")


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dirname = os.path.dirname(name)
    key, _, ext = base.partition(".")
    return (f"{dirname}/{key}" if dirname else key), ext


def iter_samples(path: str) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """Yield (key, [(member, bytes), ...]) for consecutive members sharing a key (WebDataset layout)."""
    with tarfile.open(path) as tf:
        key, group = None, []
        for m in tf:
            if not m.isfile():
                continue
            k, _ = _split_name(m.name)
            if key is not None and k != key:
                yield key, group
                group = []
            key = k
            group.append((m, tf.extractfile(m).read()))
        if group:
            yield key, group


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes, like: tarfile.TarInfo | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = like.mtime if like is not None else int(time.time())
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def cache_shard(src: str, dst: str, encoder: GemmaTextEncoder, batch_size: int = 32) -> int:
    """Write `dst` = `src` plus cached text embeddings for every sample. Returns the sample count."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    count = 0
    try:
        with tarfile.open(tmp, "w") as out:
            pending: list[tuple[str, list]] = []

            def flush():
                nonlocal count
                captions = []
                for _, group in pending:
                    txt = next((data for m, data in group if _split_name(m.name)[1] == "txt"), b"")
                    captions.append(txt.decode("utf-8", errors="replace").strip())
                emb, mask = encoder.encode(captions)
                for i, (key, group) in enumerate(pending):
                    for m, data in group:
                        if _split_name(m.name)[1] not in CACHED_EXTS:
                            _add(out, m.name, data, m)
                    _add(out, f"{key}.txt_emb.npy", _npy(emb[i].to(torch.float16).cpu().numpy()), group[0][0])
                    _add(out, f"{key}.txt_mask.npy", _npy(mask[i].bool().cpu().numpy()), group[0][0])
                count += len(pending)
                pending.clear()

            for key, group in iter_samples(src):
                pending.append((key, group))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def _settings(encoder: GemmaTextEncoder) -> dict:
    return {"text_encoder": encoder.path, "max_length": encoder.max_length, "chi_prompt": encoder.chi_prompt or "",
            "dim": encoder.dim, "dtype": "float16"}


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def encode_dataset(data_dir: str, encoder: GemmaTextEncoder, out_dir: str | None = None, *, batch_size: int = 32,
                   rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """Cache embeddings for this rank's shards of `data_dir`. Returns {"shards": n_done_here, "samples": n}."""
    index_path = os.path.join(data_dir, "index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{data_dir}: no index.json (build the shards with t2i-build-shards first)")
    with open(index_path) as f:
        index = json.load(f)
    out_dir = out_dir or data_dir
    os.makedirs(out_dir, exist_ok=True)
    if os.path.abspath(out_dir) != os.path.abspath(data_dir) and rank == 0:
        shutil.copyfile(index_path, os.path.join(out_dir, "index.json"))
    settings = _settings(encoder)
    if rank == 0:
        from safetensors.torch import save_file

        emb, mask = encoder.encode_null("")
        tmp = os.path.join(out_dir, NULL_NAME + ".tmp")
        save_file({"emb": emb.to(torch.float16).contiguous(), "mask": mask.bool().contiguous()}, tmp,
                  metadata={k: str(v) for k, v in settings.items()})
        os.replace(tmp, os.path.join(out_dir, NULL_NAME))

    names = [s["name"] for s in index["shards"]]
    mine = [n for i, n in enumerate(names) if i % world_size == rank]
    progress_path = os.path.join(out_dir, f"{PROGRESS_NAME}" if world_size == 1 else f"text_cache.rank{rank}.json")
    done: list[str] = []
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            state = json.load(f)
        if state.get("settings") != settings:
            raise ValueError(f"{progress_path}: cached with different settings {state.get('settings')}; "
                             f"now {settings}. Use a fresh --out directory.")
        done = list(state.get("done", []))
    from tqdm import tqdm

    n_samples, n_shards = 0, 0
    for name in tqdm(mine, desc=f"encode text (rank {rank})", disable=not progress):
        if name in done:
            continue
        src = os.path.join(data_dir, name)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src}: listed in {index_path} but missing")
        n_samples += cache_shard(src, os.path.join(out_dir, name), encoder, batch_size)
        n_shards += 1
        done.append(name)
        _write_json(progress_path, {"settings": settings, "done": done})
    return {"shards": n_shards, "samples": n_samples}


def load_null_embedding(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached null condition: (emb [1, L, D] float32, mask [1, L] bool)."""
    from safetensors.torch import load_file

    t = load_file(os.path.join(data_dir, NULL_NAME))
    return t["emb"].float(), t["mask"].bool()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="t2i-encode-text", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("data_dir", help="dataset directory with index.json and the .tar shards")
    ap.add_argument("--out", default=None, help="write shards here instead of rewriting them in place")
    ap.add_argument("--text-encoder", default=DEFAULT_GEMMA,
                    help="Gemma-2 local directory or hub id, or hash:DIM (the CPU demo's stand-in)")
    ap.add_argument("--max-length", type=int, default=300, help="text tokens per caption")
    ap.add_argument("--no-chi", action="store_true", help="do not prepend the complex human instruction")
    ap.add_argument("--batch-size", type=int, default=32, help="captions per encoder forward")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="encoder device")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="encoder weights' dtype")
    args = ap.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    from .encoders import load_text_encoder

    try:
        encoder = load_text_encoder(args.text_encoder, max_length=args.max_length,
                                    chi_prompt=None if args.no_chi else CHI_PROMPT,
                                    dtype=getattr(torch, args.dtype), device=device, batch_size=args.batch_size)
    except (OSError, ValueError) as e:
        print(f"t2i-encode-text: error: {e}", file=sys.stderr)
        return 2
    stats = encode_dataset(args.data_dir, encoder, args.out, batch_size=args.batch_size, rank=rank, world_size=world)
    print(json.dumps({"rank": rank, **stats}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
