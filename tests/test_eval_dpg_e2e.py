"""DPG-Bench end to end: a tiny checkpoint of ours → `python -m eval dpg generate` → `score` with a tiny random BLIP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.cli import main as eval_main
from t2i_train.models import build_model
from t2i_train.models.io import save_pretrained
from test_eval_dpg import ITEMS, ROWS, write_csv

REPO = Path(__file__).resolve().parents[1]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "?", '"'] + sorted(
    {w.lower() for r in ROWS for w in r[4].replace("?", " ").replace('"', " ").split()})


def tiny_blip(out: Path) -> Path:
    """A randomly initialised BLIP VQA model with an offline-built tokenizer, saved like a hub checkpoint."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor,
                              BlipProcessor)

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, bos_token="[DEC]")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = BlipConfig(text_config=dict(vocab_size=len(VOCAB), encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                                      sep_token_id=3, max_position_embeddings=64, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small))
    torch.manual_seed(0)
    BlipForQuestionAnswering(cfg).save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "eval", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_generate_and_score_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = build_model("pixeldit_tiny_t2i")
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for item in ITEMS:
        (prompts / f"{item}.txt").write_text(f"prompt {item}: a black cat, a red car left of a tree\n")
    out = tmp_path / "images"
    gen_args = ["dpg", "generate", "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out),
                "--text-encoder", f"hash:{model.config['txt_dim']}", "--height", "16", "--steps", "2",
                "--batch-size", "8", "--no-progress"]
    run_eval(*gen_args)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i}.png" for i in ITEMS]
    assert len(list((out / "singles").glob("*.png"))) == 4 * len(ITEMS)
    tile = Image.open(out / "a.png")
    assert tile.size == (32, 32)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["benchmark"] == "dpg_bench" and settings["sampler"]["steps"] == 2
    assert settings["images"]["singles/b_3.png"] == 4 * 1 + 3  # item 1 copy 3
    # the four copies differ (own seeds), and the tile is exactly the four singles
    singles = [Image.open(out / "singles" / f"a_{k}.png") for k in range(4)]
    assert len({s.tobytes() for s in singles}) == 4
    assert tile.crop((16, 16, 32, 32)).tobytes() == singles[3].tobytes()

    # resumable: a deleted tile is re-made from its singles, nothing is regenerated
    (out / "b.png").unlink()
    mtime = (out / "singles" / "a_0.png").stat().st_mtime_ns
    assert eval_main(gen_args) == 0  # in-process: same command, no second interpreter start
    assert (out / "b.png").exists() and (out / "singles" / "a_0.png").stat().st_mtime_ns == mtime

    csv_path, blip = write_csv(tmp_path / "dpg_bench.csv"), tiny_blip(tmp_path / "blip")
    proc = run_eval("dpg", "score", str(out), "--csv", str(csv_path), "--vqa", "transformers",
                    "--vqa-model", str(blip), "--no-progress")
    report = json.loads((out / "dpg_report.json").read_text())
    assert report["mode"] == "default" and report["num_images"] == 3 and report["complete"]
    assert report["vqa"] == f"transformers:{blip}"
    assert 0.0 <= report["score"] <= 100.0
    assert set(report["category_broad"]) == {"entity", "attribute", "relation", "global", "other"}
    assert "DPG-Bench score" in proc.stdout and "default mode" in proc.stdout
    answers = [json.loads(line) for line in (out / "dpg_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(len(a["answers"]) == 4 for a in answers)

    assert eval_main(["dpg", "score", str(out), "--csv", str(csv_path), "--vqa", "transformers",
                      "--vqa-model", str(blip), "--official-compat", "--no-progress"]) == 0
    compat = json.loads((out / "dpg_report_official_compat.json").read_text())
    assert compat["mode"] == "official-compat" and compat["failed_images"] == ["a"]
    assert "official-compat mode" in capsys.readouterr().out


def test_missing_vqa_weights_say_where(tmp_path, monkeypatch):
    from eval.dpg_bench.vqa import build_vqa

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="cannot load VQA model .*nope.*download it first"):
        build_vqa("transformers", str(tmp_path / "nope"))
