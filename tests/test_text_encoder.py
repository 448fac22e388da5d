"""The Gemma-2 text path on a tiny random Gemma-2 and a sentencepiece model trained on the fly (no downloads)."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from t2i_train.text import CHI_PROMPT, GemmaTextEncoder
from t2i_train.text.cache import NULL_NAME, load_null_embedding, main as encode_text_main

CAPTIONS = ["a small fluffy white cat sleeping on a sunny windowsill", "a busy city street at dusk",
            "a red car", "portrait photo of a girl, highly detailed face", ""]


def make_tiny_gemma(out_dir, hidden_size=32):
    """Write a loadable tokenizer + random 2-layer Gemma-2 into `out_dir` (like a local copy of gemma-2-2b-it)."""
    import sentencepiece as spm
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    out_dir = str(out_dir)
    sp_dir = os.path.join(out_dir, "sp")
    os.makedirs(sp_dir, exist_ok=True)
    corpus = os.path.join(sp_dir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join((CAPTIONS + CHI_PROMPT.split("\n")) * 10))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(sp_dir, "tokenizer"), vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    tok = GemmaTokenizer.from_pretrained(sp_dir, add_bos_token=True)
    tok.save_pretrained(out_dir)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=2048, sliding_window=64, pad_token_id=0, bos_token_id=2,
                       eos_token_id=1)
    Gemma2Model(cfg).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_tiny_gemma(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def encoder(gemma_dir):
    return GemmaTextEncoder(gemma_dir, max_length=16, dtype=torch.float32, batch_size=2)


def test_encode_matches_reference_procedure(encoder):
    tok, model = encoder.tokenizer, encoder.model
    assert tok.padding_side == "right"
    emb, mask = encoder.encode(CAPTIONS[:3])
    assert emb.shape == (3, 16, 32) and mask.shape == (3, 16) and emb.dtype == torch.float32
    n_chi = len(tok.encode(CHI_PROMPT))
    assert tok.encode(CHI_PROMPT)[0] == tok.bos_token_id and n_chi > 20
    for i, caption in enumerate(CAPTIONS[:3]):
        ids = tok(CHI_PROMPT + caption).input_ids
        length = n_chi + 16 - 2
        full = (ids + [tok.pad_token_id] * length)[:length]
        att = ([1] * len(ids) + [0] * length)[:length]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([full]), attention_mask=torch.tensor([att]))[0][0]
        keep = [0] + list(range(length - 15, length))
        assert torch.allclose(emb[i], h[keep], atol=1e-5)
        assert mask[i].tolist() == [att[j] for j in keep]
        assert mask[i, 0] == 1 and mask[i].sum() > 1
    assert mask[2].sum() < 16  # a short caption leaves padding


def test_long_captions_are_truncated_and_batching_is_invisible(encoder):
    long = " ".join(CAPTIONS[:4] * 8)
    emb, mask = encoder.encode([long])
    assert mask.shape == (1, 16) and mask.sum() == 16
    batch, _ = encoder.encode(CAPTIONS[:3] + [long])
    assert torch.allclose(batch[3], emb[0], atol=1e-5)
    one, _ = encoder.encode([CAPTIONS[1]])
    assert torch.allclose(batch[1], one[0], atol=1e-5)


def test_null_embedding_is_plain_empty_prompt(encoder):
    emb, mask = encoder.encode_null()
    assert emb.shape == (1, 16, 32) and mask.tolist() == [[1] + [0] * 15]
    ids = encoder.tokenizer("", padding="max_length", max_length=16).input_ids
    with torch.no_grad():
        h = encoder.model(input_ids=torch.tensor([ids]), attention_mask=mask)[0]
    assert torch.allclose(emb, h, atol=1e-5)
    neg, neg_mask = encoder.encode_null("a red car")
    assert neg_mask.sum() > 1 and not torch.allclose(neg, emb)


def test_bf16_encoder_and_frozen(gemma_dir):
    enc = GemmaTextEncoder(gemma_dir, max_length=16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in enc.model.parameters())
    emb, _ = enc.encode(["a red car"])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def _write_dataset(root, shards=2, per_shard=3):
    os.makedirs(root, exist_ok=True)
    entries, captions = [], {}
    for s in range(shards):
        name = f"shard-{s:05d}.tar"
        with tarfile.open(os.path.join(root, name), "w") as tf:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                cap = CAPTIONS[(s * per_shard + j) % len(CAPTIONS)]
                captions[key] = cap
                for ext, data in (("png", b"\x89PNG fake"), ("txt", cap.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        entries.append({"name": name, "count": per_shard, "inputs_end": (s + 1) * per_shard})
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"format": 1, "name": "t", "shards": entries, "total": shards * per_shard}, f)
    return captions


def test_encode_text_cli_writes_embeddings_into_shards(tmp_path, gemma_dir, encoder):
    data = str(tmp_path / "data")
    captions = _write_dataset(data)
    args = [data, "--text-encoder", gemma_dir, "--max-length", "16", "--dtype", "float32", "--batch-size", "2",
            "--device", "cpu"]
    assert encode_text_main(args) == 0
    for s in range(2):
        with tarfile.open(os.path.join(data, f"shard-{s:05d}.tar")) as tf:
            names = tf.getnames()
            assert len(names) == 3 * 5
            for key in [n[:-len(".txt_emb.npy")] for n in names if n.endswith(".txt_emb.npy")]:
                emb = np.load(io.BytesIO(tf.extractfile(f"{key}.txt_emb.npy").read()))
                mask = np.load(io.BytesIO(tf.extractfile(f"{key}.txt_mask.npy").read()))
                assert emb.shape == (16, 32) and emb.dtype == np.float16 and mask.dtype == np.bool_
                ref, ref_mask = encoder.encode([captions[key]])
                assert np.allclose(emb, ref[0].numpy(), atol=2e-2, rtol=1e-2)
                assert (mask == ref_mask[0].bool().numpy()).all()
                assert tf.extractfile(f"{key}.png").read() == b"\x89PNG fake"
    null_emb, null_mask = load_null_embedding(data)
    assert null_emb.shape == (1, 16, 32) and null_mask[0].tolist() == [True] + [False] * 15
    progress = json.load(open(os.path.join(data, "text_cache.json")))
    assert progress["done"] == ["shard-00000.tar", "shard-00001.tar"]
    # a second run resumes: nothing left to do, shards untouched
    before = os.stat(os.path.join(data, "shard-00000.tar")).st_mtime_ns
    assert encode_text_main(args) == 0
    assert os.stat(os.path.join(data, "shard-00000.tar")).st_mtime_ns == before
    # changed settings are refused rather than mixed
    with pytest.raises(ValueError, match="different settings"):
        encode_text_main(args[:-4] + ["--max-length", "8"])
    assert os.path.exists(os.path.join(data, NULL_NAME))


def test_encode_text_cli_missing_index(tmp_path, gemma_dir):
    with pytest.raises(FileNotFoundError, match="index.json"):
        encode_text_main([str(tmp_path), "--text-encoder", gemma_dir, "--device", "cpu"])
