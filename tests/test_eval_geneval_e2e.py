"""GenEval end to end on this machine: a tiny checkpoint of ours → `python -m eval geneval generate` → `score` with
tiny randomly initialised Mask2Former (every query says "bench") and CLIP models loaded by path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.cli import main as t2i_eval
from eval_fixtures import save_tiny_clip, save_tiny_mask2former, save_tiny_t2i

REPO = Path(__file__).resolve().parents[1]


def _entry(tag, prompt, *include, exclude=None):
    e = {"tag": tag, "include": list(include), "prompt": prompt}
    return {**e, "exclude": exclude} if exclude else e


# one prompt per tag (our own, in the official format); the detector finds benches only, all with the same box
PROMPTS = [
    _entry("single_object", "a photo of a bench", {"class": "bench", "count": 1}),  # correct
    _entry("two_object", "a photo of a bench and a cat", {"class": "bench", "count": 1},
           {"class": "cat", "count": 1}),  # no cat
    _entry("counting", "a photo of two benches", {"class": "bench", "count": 2},
           exclude=[{"class": "bench", "count": 3}]),  # bench scores ~0.5 are under the counting threshold 0.9
    _entry("colors", "a photo of a red bench", {"class": "bench", "count": 1, "color": "red"}),  # CLIP decides
    _entry("position", "a photo of a bench left of a bench", {"class": "bench", "count": 1},
           {"class": "bench", "count": 1, "position": ["left of", 0]}),  # same box: no relation
    _entry("color_attr", "a photo of a red bench and a blue cat", {"class": "bench", "count": 1, "color": "red"},
           {"class": "cat", "count": 1, "color": "blue"}),  # no cat
    _entry("single_object", "a photo of a cat", {"class": "cat", "count": 1}),  # no cat
]
N = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    meta = root / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(e) + "\n" for e in PROMPTS))
    ckpt = save_tiny_t2i(root / "export", run_info={"text": {"encoder": "hash:32", "max_length": 16},
                                                     "resolution": [32, 32]})
    return dict(root=root, meta=meta, ckpt=ckpt, m2f=save_tiny_mask2former(root / "m2f", favour="bench"),
                clip=save_tiny_clip(root / "clip"), out=root / "images")


def generate_args(s):
    return ["geneval", "generate", "--ckpt", str(s["ckpt"]), "--metadata", str(s["meta"]), "--out", str(s["out"]),
            "--n-samples", str(N), "--steps", "2", "--batch-size", "4", "--grid", "--no-progress"]


def score_args(s, *extra):
    return ["geneval", "score", str(s["out"]), "--detector", f"mask2former:{s['m2f']}", "--clip", str(s["clip"]),
            "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def generated(setup):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "eval", *generate_args(setup)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return setup


def test_generation_writes_the_official_layout_and_settings(generated):
    out = generated["out"]
    for i, entry in enumerate(PROMPTS):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == entry
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert (folder / "grid.png").exists()
    settings = json.loads((out / "generation.json").read_text())
    assert settings["benchmark"] == "geneval" and settings["n_samples"] == N
    assert settings["text_encoder"] == "hash:32" and (settings["height"], settings["width"]) == (32, 32)
    assert settings["sampler"]["name"] == "dpm_solver_2m" and settings["sampler"]["steps"] == 2
    assert settings["images"]["00003/samples/0001.png"] == 3 * N + 1
    assert settings["notes"]["metadata"] == str(generated["meta"].resolve())

    # a second run makes nothing: every image is already there
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert t2i_eval(generate_args(generated)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def test_score_follows_the_rules_and_the_summary_matches_the_results(generated, capsys):
    out = generated["out"]
    assert t2i_eval(score_args(generated)) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(results) == len(PROMPTS) * N
    by_prompt = {i: [r for r in results if r["prompt_index"] == i] for i in range(len(PROMPTS))}
    assert all(r["correct"] for r in by_prompt[0])
    assert all(r["reason"] == "expected cat>=1, found 0" for r in by_prompt[1] + by_prompt[6])
    assert all(r["reason"] == "expected bench>=2, found 0" for r in by_prompt[2])
    assert all(r["reason"] == "expected bench left of target, found  target" for r in by_prompt[4])
    assert all(not r["correct"] for r in by_prompt[5])
    assert all(len(r["details"]["bench"]) == 8 for r in by_prompt[0])  # 8 queries, each a bench above 0.3

    colors = sum(r["correct"] for r in by_prompt[3]) / N
    assert summary["tags"]["single_object"] == {"score": 0.5, "correct": 2, "images": 4}
    assert summary["tags"]["colors"]["score"] == colors
    for tag in ("two_object", "counting", "position", "color_attr"):
        assert summary["tags"][tag]["score"] == 0.0
    assert summary["overall"] == pytest.approx((0.5 + colors) / 6)
    assert summary["correct_images"] == pytest.approx(sum(r["correct"] for r in results) / len(results))
    assert summary["correct_prompts"] == pytest.approx((1 + (colors > 0)) / len(PROMPTS))
    assert summary["complete"] and summary["expected_prompts"] == len(PROMPTS)
    assert summary["generation"]["ckpt"] == str(generated["ckpt"])
    table = capsys.readouterr().out
    assert "single object" in table and "0.5000  (2 / 4)" in table and "INCOMPLETE" not in table


def test_incomplete_prompt_set_is_refused_or_flagged(generated, tmp_path, capsys):
    missing = generated["out"] / "00005" / "samples" / "0001.png"
    data = missing.read_bytes()
    missing.unlink()
    try:
        with pytest.raises(SystemExit, match="incomplete GenEval folder — 0 of 7 prompts have no images"):
            t2i_eval(score_args(generated))
        summary_path = tmp_path / "summary.json"
        assert t2i_eval(score_args(generated, "--allow-incomplete", "--summary", str(summary_path),
                                   "--results", str(tmp_path / "r.jsonl"))) == 0
        summary = json.loads(summary_path.read_text())
        assert not summary["complete"] and summary["short_prompts"] == {"5": 1}
        assert summary["images"] == len(PROMPTS) * N - 1
        assert "INCOMPLETE PROMPT SET" in capsys.readouterr().out
    finally:
        missing.write_bytes(data)


def test_missing_models_say_which_and_how(generated, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"GenEval detector '/nonexistent/m2f' not found .*hf download"):
        t2i_eval(score_args(generated)[:3] + ["--detector", "mask2former:/nonexistent/m2f"])
    with pytest.raises(OSError, match=r"cannot load GenEval CLIP model 'nobody/no-clip' \(HF_HUB_OFFLINE is set\)"):
        t2i_eval(score_args(generated)[:3] + ["--detector", f"mask2former:{generated['m2f']}",
                                              "--clip", "nobody/no-clip"])


def test_clip_colour_is_the_official_zero_shot_on_the_grey_masked_crop(setup):
    import numpy as np
    import torch
    from PIL import Image

    from eval.geneval.backends import ClipColorClassifier
    from eval.geneval.detectors import Detection
    from eval.geneval.metadata import COLORS

    clf = ClipColorClassifier(str(setup["clip"]), device="cpu")
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16], rgb[:, 16:] = (200, 0, 0), (0, 0, 200)
    mask = np.zeros((32, 32), bool)
    mask[4:20, 2:14] = True
    det = Detection("bench", 0.9, (2.0, 4.0, 20.0, 20.0), mask)
    crop = np.asarray(clf.masked_crop(Image.fromarray(rgb), det))
    assert crop.shape == (16, 18, 3)  # rows 4..19, columns 2..19
    assert (crop[:, :12] == (200, 0, 0)).all() and (crop[:, 12:] == (153, 153, 153)).all()  # #999 off the mask

    def unit(x):
        return torch.nn.functional.normalize(x, dim=-1)

    with torch.no_grad():
        cols = []
        for c in COLORS:
            texts = [f"a photo of a {c} bench", f"a photo of a {c}-colored bench", f"a photo of a {c} object"]
            tok = clf.processor.tokenizer(texts, padding=True, return_tensors="pt")
            cols.append(unit(unit(clf._features(clf.model.get_text_features(**tok))).mean(0)))
        text = torch.stack(cols, 1)
        pixels = clf.processor(images=[Image.fromarray(crop)], return_tensors="pt")["pixel_values"]
        image = unit(clf._features(clf.model.get_image_features(pixel_values=pixels)))
    assert torch.allclose(clf.text_classifier("bench", COLORS), text, atol=1e-6)
    assert clf.classify(Image.fromarray(rgb), [det], COLORS) == [COLORS[int((image @ text).argmax())]]
