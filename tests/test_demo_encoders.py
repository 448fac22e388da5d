"""The demo's tiny random Gemma-2 and DINOv2 load through the real `text.encoder` / `repa_encoder` code paths."""
import json

import torch

from t2i_train.demo_encoders import build_tiny_dinov2, build_tiny_gemma, caption_separation
from t2i_train.diffusion import FlowObjective
from t2i_train.engine.text_adapter import build_text_encoder

CAPTIONS = ["a photo of a red circle", "a photo of a blue circle", "a photo of two squares",
            "a photo of a green triangle left of a yellow diamond", "a photo of a circle and a square"]


class _TextCfg:
    encoder = None
    max_length = 12


def test_tiny_gemma_loads_as_a_local_model_dir_and_separates_captions(tmp_path):
    path = build_tiny_gemma(tmp_path / "gemma", CAPTIONS, hidden_size=32)
    assert json.loads((path / "config.json").read_text())["model_type"] == "gemma2"
    cfg = _TextCfg()
    cfg.encoder = str(path)
    enc = build_text_encoder(cfg, 32, 12, "cpu")  # the trainer's own factory → GemmaTextEncoder
    assert type(enc).__name__ == "GemmaTextEncoder"
    assert enc.tokenizer("a red circle").input_ids[0] == enc.tokenizer.bos_token_id == 2
    emb, mask = enc.encode(CAPTIONS[:2])
    assert emb.shape == (2, 12, 32) and mask.dtype == torch.long and mask.sum() > 2
    null, null_mask = enc.encode_null("")
    assert null.shape == (1, 12, 32) and null_mask.sum() == 1  # <bos> only
    # no collapse: every pair of different captions has a clearly different token
    assert caption_separation(enc, CAPTIONS) < 0.9
    assert torch.equal(enc.encode(CAPTIONS[:1])[0], emb[:1])  # deterministic


def test_tiny_dinov2_is_a_repa_teacher_of_its_own_width(tmp_path):
    path = build_tiny_dinov2(tmp_path / "dino", embed_dim=32, depth=1, heads=2)
    obj = FlowObjective({"repa_weight": 0.5, "repa_block": 1, "repa_encoder": str(path)}, hidden_size=48)
    assert obj.teacher.dim == 32 and obj.projector[4].out_features == 32
    tokens = obj.teacher(torch.rand(2, 3, 32, 32) * 2 - 1, (4, 4))
    assert tokens.shape == (2, 16, 32) and torch.isfinite(tokens).all()
    assert not any(k.startswith("teacher") for k in obj.state_dict())


def test_tiny_gemma_words_carry_their_neighbours_within_the_window(tmp_path):
    """Each token holds its word plus the two before it (2-token window, 2 layers) and nothing further back:
    "circle" after "red" differs from "circle" after "blue"; "square" four words later does not."""
    path = build_tiny_gemma(tmp_path / "gemma", CAPTIONS, hidden_size=32)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 2 and cfg["sliding_window"] == 2
    cfg_ = _TextCfg()
    cfg_.encoder = str(path)
    enc = build_text_encoder(cfg_, 32, 12, "cpu")
    a, b = "a photo of a red circle and a square", "a photo of a blue circle and a square"
    ids = enc.tokenizer(a).input_ids
    assert len(ids) == len(enc.tokenizer(b).input_ids)
    pieces = enc.tokenizer.convert_ids_to_tokens(ids)
    circle, square = pieces.index("▁circle"), pieces.index("▁square")
    emb, _ = enc.encode([a, b])
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=-1)
    assert cos[circle - 1] < 0.5                     # the colour word itself
    assert 0.5 < cos[circle] < 0.999                 # the noun, coloured by its adjective
    assert torch.allclose(emb[0, square], emb[1, square], atol=1e-5)  # out of reach
    assert torch.allclose(emb[0, :circle - 1], emb[1, :circle - 1], atol=1e-5)  # causal: earlier words untouched
    # Gemma-2's own layout (window=None) is still available
    plain = build_tiny_gemma(tmp_path / "plain", CAPTIONS, hidden_size=32, window=None)
    assert json.loads((plain / "config.json").read_text())["layer_types"] == ["sliding_attention", "full_attention"]


def _caption_folder(path, captions):
    path.mkdir()
    for i, c in enumerate(captions):
        (path / f"{i:03d}.json").write_text(json.dumps({"captions": {"prompt": c}}))
    return path


def test_demo_encoders_refuse_captions_or_eval_prompts_longer_than_the_text_length(tmp_path, capsys):
    import pytest

    from t2i_train.demo_encoders import main

    src = _caption_folder(tmp_path / "src", CAPTIONS)
    meta = tmp_path / "evaluation_metadata.jsonl"
    long_prompt = "a photo of a green triangle left of a yellow diamond and a red circle above a blue square"
    meta.write_text(json.dumps({"tag": "position", "prompt": long_prompt}) + "\n")
    args = ["--captions", str(src), "--text-width", "32", "--max-length", "20"]
    assert main([*args, "--out", str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    longest = int(out.split("longest caption ")[1].split(" of 20 tokens")[0])
    assert 11 <= longest <= 20  # "a photo of a green triangle left of a yellow diamond" with <bos>
    with pytest.raises(SystemExit, match="tokens, more than --max-length 20"):
        main([*args, "--out", str(tmp_path / "enc2"), "--eval-metadata", str(meta)])
    with pytest.raises(SystemExit, match=f"more than --max-length {longest - 1}"):
        main(["--captions", str(src), "--out", str(tmp_path / "enc3"), "--text-width", "32",
              "--max-length", str(longest - 1)])
