"""The demo's exact shapes detector against the synthetic generator's own ground truth; the held-out prompts."""
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from data_pipeline.synthetic import COLORS, SHAPES, TAGS, Holdout, main, synthetic_records
from eval.geneval.shapes import ShapesColorClassifier, ShapesDetector, build, match_shape, shape_template


def _perturb(img: Image.Image, how: str, rng: np.random.Generator) -> Image.Image:
    if how == "noise":
        a = np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (img.size[1], img.size[0], 3))
        return Image.fromarray(a.clip(0, 255).astype(np.uint8))
    if how == "blur":
        return img.filter(ImageFilter.GaussianBlur(0.6))
    return img


@pytest.mark.parametrize("how", ["clean", "noise", "blur"])
@pytest.mark.parametrize("size", [32, 64, "demo"])
def test_detector_recovers_ground_truth(how, size):
    """Default layouts at 32² and around 64², and the demo's: 8-px shapes on the 8-px grid, one background, in
    stage 2's bucket sizes (the smallest shapes the detector has to tell apart)."""
    from data_pipeline.synthetic import Layout
    detector, colours = build()
    rng = np.random.default_rng(0)
    wrong = []
    scores = []
    if size == "demo":
        records = synthetic_records(120, seed=11, layout=Layout(object_size=8, grid=8, backgrounds=("grey",)),
                                    sizes=[(32, 32), (48, 48), (64, 32), (32, 64)])
    else:
        records = synthetic_records(120, seed=11, size=size, aspect="varied" if size == 64 else "square")
    for rec in records:
        img = _perturb(Image.open(io.BytesIO(rec["image"])).convert("RGB"), how, rng)
        dets = detector.detect(img)
        names = colours.classify(img, dets, list(COLORS))
        got = sorted((d.label, c) for d, c in zip(dets, names))
        want = sorted((o["shape"], o["color"]) for o in rec["extra"]["objects"])
        if got != want:
            wrong.append((rec["key"], got, want))
        scores += [d.score for d in dets]
        for d in dets:  # boxes agree with the ground truth within the blur's pixel
            x0, y0, x1, y1 = d.box
            assert any(abs(x0 - o["box"][0]) <= 1 and abs(y1 - o["box"][3]) <= 1 for o in rec["extra"]["objects"])
    assert not wrong, wrong[:3]
    assert min(scores) > 0.9  # clean, noisy or slightly blurred shapes pass GenEval's counting threshold


def test_templates_are_told_apart_and_blobs_score_low():
    for shape in SHAPES:
        best, score, ious = match_shape(shape_template(shape, 12, 12))
        assert best == shape and score == pytest.approx(1.0)
        assert sorted(ious.values())[-2] < 0.8  # the runner-up template is far off
    # an irregular blob: a plus sign
    blob = np.zeros((12, 12), bool)
    blob[4:8, :] = blob[:, 4:8] = True
    assert match_shape(blob)[1] < 0.8
    # a smear three times longer than high
    assert match_shape(np.ones((4, 12), bool))[1] < 0.5


def test_empty_and_touching_objects():
    detector = ShapesDetector()
    assert detector.detect(Image.new("RGB", (32, 32), (128, 128, 128))) == []
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle([4, 10, 13, 19], fill=COLORS["red"])
    d.rectangle([14, 10, 23, 19], fill=COLORS["blue"])  # touches the red square
    dets = detector.detect(img)
    names = ShapesColorClassifier().classify(img, dets, ["red", "blue", "green"])
    assert sorted(zip([x.label for x in dets], names)) == [("square", "blue"), ("square", "red")]


def test_holdout_never_in_training_captions_and_eval_prompts_are_all_held_out(tmp_path):
    h = Holdout()
    assert len(h.colour_shape) == 10 and len(h.relations) == 8
    train = [r["extra"] for r in synthetic_records(600, seed=3, size=32, aspect="square", holdout=h)]
    assert {e["tag"] for e in train} == set(TAGS)
    assert not any(h.covers(e["tag"], e["include"]) for e in train)
    seen_colour_pairs = {(o["color"], o["class"]) for e in train for o in e["include"] if "color" in o}
    assert not seen_colour_pairs & h.colour_shape
    # without the hold-out these captions do occur
    free = [r["extra"] for r in synthetic_records(600, seed=3, size=32, aspect="square")]
    assert any(h.covers(e["tag"], e["include"]) for e in free)

    meta = tmp_path / "evaluation_metadata.jsonl"
    assert main(["--out", str(tmp_path / "src"), "--num", "20", "--size", "32", "--source", "--holdout",
                 "--eval-metadata", str(meta), "--eval-per-tag", "8"]) == 0
    entries = [json.loads(x) for x in meta.read_text().splitlines()]
    assert {e["tag"] for e in entries} == set(TAGS)
    for e in entries:
        assert set(e) <= {"tag", "include", "exclude", "prompt"} and e["prompt"].startswith("a photo of ")
        if e["tag"] != "single_object":
            assert h.covers(e["tag"], e["include"]), e
    assert len({e["prompt"] for e in entries}) == len(entries)
    # the source folder: one png + json sidecar per image, with captions and ground truth
    sidecars = sorted((tmp_path / "src").glob("*.json"))
    assert len(sidecars) == 20 and len(list((tmp_path / "src").glob("*.png"))) == 20
    first = json.loads(sidecars[0].read_text())
    assert first["captions"]["prompt"].startswith("a photo of ") and first["objects"]
