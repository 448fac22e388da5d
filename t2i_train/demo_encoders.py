"""Tiny, random-initialised stand-ins for the two frozen encoders a real T2I run downloads.

No weights can be downloaded on the CPU demo machine, so the demo builds, in the layouts the real loaders read:
* a Gemma-2 text encoder: `transformers.Gemma2Config` (2 layers, small width) with a byte-fallback BPE
  sentencepiece tokenizer trained on the demo's captions (and the reference's instruction prefix), saved as a
  local model directory that `text.encoder: <dir>` loads through `t2i_train.text.GemmaTextEncoder`;
* a DINOv2 teacher for REPA: timm's `vit_small_patch14_dinov2` architecture at a small width and depth, saved
  as a timm model folder (`config.json` + `model.safetensors`) that `objective.repa_encoder: <dir>` loads.
A random-initialised Gemma still maps different captions to different embeddings (`caption_separation`
checks it), which is all the denoiser needs to learn caption-dependent images.

Word binding. A trained Gemma's noun token carries its adjective ("green" in the token of "diamond"), which is
what lets a denoiser put the right colour on the right shape. A random Gemma does not: each token comes out as
essentially its own word. The demo's Gemma therefore attends over a 2-token causal window in every layer
(`sliding_window=2`, so the receptive field is the word and the two before it) with uniform attention inside it
(`query_pre_attn_scalar` so large that the random query-key logits vanish): each token then holds its own word
plus a fixed share of the preceding ones. On the demo's held-out prompts (both colour-shape pairs unseen in
training), colour attribution went from 0.00 (the denoiser drew the colours swapped, as the pairs it had seen)
to 0.72 (README, demo).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

GEMMA_SPECIAL = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                     bos_piece="<bos>", unk_piece="<unk>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 640):
    """A Gemma-layout (pad 0, eos 1, bos 2, unk 3) BPE tokenizer with byte fallback, trained on `texts`."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    texts = [t for t in texts if t.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", user_defined_symbols=["<mask>"],
        minloglevel=2, **GEMMA_SPECIAL)
    model_file = Path(_scratch_dir()) / "tokenizer.model"
    model_file.write_bytes(buf.getvalue())
    pieces = SentencePieceExtractor(str(model_file)).extract(None)
    return GemmaTokenizer(vocab=pieces["vocab"], merges=pieces["merges"], add_bos_token=True)


def _scratch_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tiny-gemma-")


def build_tiny_gemma(out_dir: str | Path, captions: Sequence[str], *, hidden_size: int = 64, layers: int = 2,
                     heads: int = 2, seed: int = 0, vocab_size: int = 640, window: int | None = 2) -> Path:
    """Write a random-initialised tiny Gemma-2 model directory (model + tokenizer) loadable by `AutoModel`.

    ``window``: every layer attends uniformly over this many tokens (itself and the ones before it), so words
    carry their neighbours (module docstring); ``None`` keeps Gemma-2's own layout (sliding and global layers
    alternating, random sharp attention).
    """
    from transformers import Gemma2Config, Gemma2Model

    from t2i_train.text.gemma import CHI_PROMPT

    out = Path(out_dir)
    tokenizer = train_tokenizer(list(captions) + CHI_PROMPT.split("\n"), vocab_size)
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    # logits scaled by query_pre_attn_scalar ** -0.5: at 10^12 they are ~0, a plain average over the window
    local = dict(layer_types=["sliding_attention"] * layers, query_pre_attn_scalar=10 ** 12) if window else {}
    n_tokens = len(tokenizer.encode(CHI_PROMPT)) + max(len(tokenizer.encode(c)) for c in captions)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
        head_dim=hidden_size // heads, max_position_embeddings=max(1024, 2 * n_tokens),
        sliding_window=window or 256, **local,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
        # At Gemma's 0.02 the post-norms of the random layers swamp the token embeddings and every caption
        # comes out alike (token cosine ≈ 0.99); a larger init keeps each word's embedding visible.
        initializer_range=0.5)
    torch.manual_seed(seed)
    model = Gemma2Model(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text("Random-initialised tiny Gemma-2 for the CPU demo (no downloaded weights).\n")
    return out


def build_tiny_dinov2(out_dir: str | Path, *, embed_dim: int = 64, depth: int = 2, heads: int = 2,
                      seed: int = 0) -> Path:
    """Write a random-initialised small-width DINOv2 ViT as a timm model folder (`local-dir:` loadable)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    args = dict(embed_dim=embed_dim, depth=depth, num_heads=heads)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    return out


@torch.no_grad()
def caption_separation(encoder, captions: Sequence[str]) -> float:
    """How alike the least distinguishable pair of captions is: over all pairs, the largest of the smallest
    per-token cosine similarity (tokens real in either). Near 1 means the encoder collapsed the two captions
    onto one condition; a word that differs gives a token far from its counterpart."""
    emb, mask = encoder.encode(list(captions))
    worst = -1.0
    for i in range(len(captions)):
        for j in range(i + 1, len(captions)):
            both = (mask[i] > 0) | (mask[j] > 0)
            cos = torch.nn.functional.cosine_similarity(emb[i][both], emb[j][both], dim=-1)
            worst = max(worst, float(cos.min()))
    return worst


def describe(path: str | Path) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = ("architecture", "model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg) or str(path)


def read_captions(source_dir: str | Path) -> list[str]:
    """The distinct main captions of a source folder's json sidecars (what the tokenizer is trained on)."""
    caps = set()
    for f in sorted(Path(source_dir).glob("*.json")):
        try:
            caps.add(json.loads(f.read_text())["captions"]["prompt"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{f}: no captions.prompt ({e})") from e
    if not caps:
        raise ValueError(f"{source_dir}: no *.json sidecars with captions")
    return sorted(caps)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m t2i_train.demo_encoders",
                                description="Build the CPU demo's tiny random-initialised Gemma-2 and DINOv2.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--captions", required=True, help="source folder whose json sidecars hold the training captions")
    p.add_argument("--out", required=True, help="writes OUT/gemma2-tiny and OUT/dinov2-tiny")
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=14,
                   help="the runs' text.max_length: every caption must fit in it (<bos> included), else it fails")
    p.add_argument("--eval-metadata", default=None,
                   help="a GenEval evaluation_metadata.jsonl whose prompts must fit in --max-length too")
    a = p.parse_args(argv)
    from t2i_train.text import GemmaTextEncoder

    captions = read_captions(a.captions)
    gemma = build_tiny_gemma(Path(a.out) / "gemma2-tiny", captions, hidden_size=a.text_width, seed=a.seed)
    dino = build_tiny_dinov2(Path(a.out) / "dinov2-tiny", seed=a.seed)
    encoder = GemmaTextEncoder(str(gemma), max_length=a.max_length, dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in Path(a.eval_metadata).read_text().splitlines()
               if line.strip()] if a.eval_metadata else []
    longest = max(captions + prompts, key=lambda c: len(encoder.tokenizer.encode(c)))
    n_longest = len(encoder.tokenizer.encode(longest))
    if n_longest > a.max_length:
        raise SystemExit(f"caption {longest!r} is {n_longest} tokens, more than --max-length {a.max_length}: "
                         "it would be truncated (raise text.max_length and model.spec.txt_len)")
    sim = caption_separation(encoder, captions[:12])
    print("NOTE: no weights can be downloaded here, so both encoders are RANDOM-INITIALISED stand-ins with the real "
          "architectures,\n      loaded through the same code paths as google/gemma-2-2b-it and "
          "timm/vit_base_patch14_dinov2.lvd142m:")
    print(f"  text encoder  {gemma}  (Gemma-2: {describe(gemma)}; sentencepiece BPE tokenizer trained on "
          f"{len(captions)} demo captions)")
    print(f"  REPA teacher  {dino}  (timm {describe(dino)})")
    print(f"  caption check: longest caption {n_longest} of {a.max_length} tokens; least distinguishable pair of "
          f"captions, smallest token cosine = {sim:.3f}")
    if sim > 0.95:
        raise SystemExit(f"the tiny text encoder collapses different captions (token cosine {sim:.3f} > 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
