"""Tiny randomly initialised GenEval models (Mask2Former with a Swin backbone, CLIP with its own BPE vocabulary)
and a tiny T2I checkpoint of ours, saved to directories and loaded by path like real weights."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def save_tiny_mask2former(out: Path, image_size: int = 64, favour: str | None = None) -> Path:
    """favour: a class every query predicts with probability ~1 (so random weights still find objects)."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    from eval.geneval.metadata import OBJECT_NAMES

    torch.manual_seed(0)
    swin = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    # COCO as transformers' checkpoints spell it (mouse, remote, keyboard), mapped to GenEval's names on load
    names = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
    id2label = {i: names.get(n, n) for i, n in enumerate(OBJECT_NAMES)}
    cfg = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, num_queries=8, encoder_layers=1, decoder_layers=2,
                            feature_size=32, mask_feature_size=32, dim_feedforward=32, num_attention_heads=2,
                            encoder_feedforward_dim=32, common_stride=4, use_pretrained_backbone=False,
                            id2label=id2label, label2id={n: i for i, n in id2label.items()})
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if favour is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[OBJECT_NAMES.index(favour)] = 12.0
    model.save_pretrained(out)
    Mask2FormerImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size},
                              size_divisor=32).save_pretrained(out)
    return out


def save_tiny_clip(out: Path) -> Path:
    """CLIP with a character-level BPE vocabulary (no merges) written here, so no download is needed."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + "-.,'"
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>"] + list(chars)
                                              + [c + "</w>" for c in chars])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    CLIPModel(cfg).eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_t2i(out: Path, run_info: dict | None = None) -> Path:
    from t2i_train.models import build_model
    from t2i_train.models.io import save_pretrained

    torch.manual_seed(0)
    save_pretrained(build_model("pixeldit_tiny_t2i"), out)
    if run_info is not None:
        (out / "run_info.json").write_text(json.dumps(run_info))
    return out
