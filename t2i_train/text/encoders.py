"""One way to name a text encoder everywhere (trainer, t2i-sample, t2i-encode-text).

`name` is a local Gemma-2 directory, a hub id (`google/gemma-2-2b-it`), or `hash:DIM` — the deterministic
bag-of-words stand-in of the CPU demo. A hub id already in the local Hugging Face cache is used from there;
otherwise the hub is asked only when it can be reached (and `HF_HUB_OFFLINE` is not set), so a machine
without network gets one line in milliseconds instead of a minute of retries and a traceback.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

HUB_TIMEOUT_S = 3.0


class TextEncoderNotFound(FileNotFoundError):
    """The named text encoder is neither a local directory nor reachable on the hub."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _looks_local(name: str) -> bool:
    """A hub id is `org/name`; anything else (absolute, ./, ~, deeper paths) can only be a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def resolve_text_encoder(name: str) -> str:
    """A local directory for `name` (a path, or a cached hub id), or the hub id when the hub can be asked."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if _looks_local(name):
        raise TextEncoderNotFound(f"text encoder {name!r}: not found locally ({path.absolute()} does not exist)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not in the cache (the hub client raises several kinds here)
        pass
    if _hub_offline() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "no connection"
        raise TextEncoderNotFound(f"text encoder {name!r}: not found locally and the hub is unreachable ({why}); "
                                  "pass a local Gemma-2 directory, or hash:DIM for the CPU demo's stand-in")
    return name


def hash_dim(name: str, expected_dim: int | None) -> int:
    dim = int(name.split(":", 1)[1]) if ":" in name else expected_dim
    if dim is None:
        raise ValueError(f"text encoder {name!r}: give the embedding size as hash:DIM")
    if expected_dim is not None and dim != expected_dim:
        raise ValueError(f"text encoder {name!r} gives {dim}-d embeddings, the model expects {expected_dim}")
    return dim


def load_text_encoder(name: str, *, max_length: int, expected_dim: int | None = None, chi_prompt: str | None = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, batch_size: int = 32):
    """`hash:DIM` → HashTextEncoder; otherwise GemmaTextEncoder on the resolved local directory or hub id."""
    if name.startswith("hash"):
        from t2i_train.engine.text_adapter import HashTextEncoder

        return HashTextEncoder(hash_dim(name, expected_dim), max_length)
    from .gemma import GemmaTextEncoder

    encoder = GemmaTextEncoder(resolve_text_encoder(name), max_length=max_length, chi_prompt=chi_prompt,
                               dtype=dtype, device=device, batch_size=batch_size)
    encoder.path = name  # record what the user named, not the cache directory
    if expected_dim is not None and encoder.dim != expected_dim:
        raise ValueError(f"text encoder {name!r} gives {encoder.dim}-d embeddings, the model expects {expected_dim}")
    return encoder
