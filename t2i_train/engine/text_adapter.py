"""Turning a batch's text into the denoiser's condition: cached embeddings, Gemma-2, or a tiny hash encoder.

`hash:<dim>` is a deterministic bag-of-words stand-in for CPU demos and tests (each word maps to a fixed random
vector); it lets a tiny T2I model learn caption-dependent images without downloading a language model.
"""
from __future__ import annotations

import hashlib

import torch


class HashTextEncoder:
    def __init__(self, dim: int, max_length: int):
        self.dim, self.max_length = int(dim), int(max_length)
        self.path, self.chi_prompt = f"hash:{self.dim}", None  # the settings t2i-encode-text records

    def _vec(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts):
        emb = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = ["<bos>"] + str(p).lower().split()
            for j, w in enumerate(words[: self.max_length]):
                emb[i, j], mask[i, j] = self._vec(w), 1
        return emb, mask

    def encode_null(self, prompt: str = ""):
        return self.encode([prompt])


def build_text_encoder(text_cfg, txt_dim: int, txt_len: int, device):
    name = text_cfg.encoder
    if name is None:
        return None
    from t2i_train.text.encoders import load_text_encoder

    if name.startswith("hash"):
        return load_text_encoder(name, max_length=min(text_cfg.max_length, txt_len), expected_dim=txt_dim)
    return load_text_encoder(name, max_length=text_cfg.max_length, chi_prompt=chi_prompt(getattr(text_cfg, "chi", "default")), device=device)


def chi_prompt(chi: str) -> str | None:
    """`text.chi`: default (the reference's complex human instruction) | none | a text file holding another."""
    from pathlib import Path

    from t2i_train.text import CHI_PROMPT

    if chi == "default":
        return CHI_PROMPT
    if chi == "none":
        return None
    path = Path(chi)
    if not path.is_file():
        raise ValueError(f"text.chi: {chi!r} is not 'default', 'none' or an existing text file")
    return path.read_text().rstrip("\n")
