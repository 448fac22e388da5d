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
