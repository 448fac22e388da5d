"""GenEval: the real prompt file, and the official scoring rules on constructed detections (hand-computed outcomes)."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.geneval.detectors import DETECTORS, Detection, build_detector
from eval.geneval.metadata import TAGS, load_metadata
from eval.geneval.rules import Rules, box_iou, evaluate, relative_position, select_objects
from eval.geneval.summary import format_table, summarize

REPO = Path(__file__).resolve().parents[1]


def shared_dir():
    """`shared/` beside the repository root, or beside any folder above it (a worktree lives deeper)."""
    for base in [REPO.parent, *REPO.parents[1:]]:
        if (base / "shared").is_dir():
            return base / "shared"
    return None


def real_metadata():
    shared = shared_dir()
    path = shared / "benchmarks" / "geneval" / "evaluation_metadata.jsonl" if shared else None
    if path is None or not path.exists():
        pytest.skip("GenEval's evaluation_metadata.jsonl is not in shared/benchmarks/geneval")
    return path


def test_real_metadata_has_553_prompts_over_the_six_tags():
    entries = load_metadata(real_metadata())
    assert len(entries) == 553
    assert Counter(e["tag"] for e in entries) == {"single_object": 80, "two_object": 99, "counting": 80,
                                                  "colors": 94, "position": 100, "color_attr": 100}
    assert set(e["tag"] for e in entries) == set(TAGS)


def test_bad_metadata_names_the_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n'
                   '{"tag": "shapes", "include": [], "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: unknown tag 'shapes'"):
        load_metadata(bad)
    with pytest.raises(FileNotFoundError, match="djghosh13/geneval"):
        load_metadata(tmp_path / "missing.jsonl")


def det(label, score=0.99, box=(0, 0, 10, 10)):
    return Detection(label=label, score=score, box=box)


class StubColors:
    """Names each detection's colour from a {box: colour} table."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def classify(self, image, detections, colors):
        self.calls.append([d.box for d in detections])
        return [self.table[d.box] for d in detections]


IMAGE = Image.new("RGB", (64, 64))


def run(meta, dets, colors=None, rules=Rules()):
    return evaluate(IMAGE, select_objects(dets, meta["tag"], rules), meta, colors, rules)


# --- counting: threshold 0.9 (strictly above) for counting prompts, 0.3 otherwise; at most 16 per class -----------
TWO_CLOCKS = {"tag": "counting", "prompt": "a photo of two clocks",
              "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}


def test_counting_threshold_is_strictly_above_0_9():
    dets = [det("clock", s) for s in (0.95, 0.91, 0.9, 0.5)]
    assert [d.score for d in select_objects(dets, "counting")["clock"]] == [0.95, 0.91]
    assert run(TWO_CLOCKS, dets) == (True, "")
    # a third confident clock trips the exclude; the same detections under the 0.3 threshold give four
    assert run(TWO_CLOCKS, dets + [det("clock", 0.92)]) == (False, "expected clock<3, found 3")
    assert len(select_objects(dets, "single_object")["clock"]) == 4
    ok, reason = run(TWO_CLOCKS, [det("clock", 0.95), det("clock", 0.9)])
    assert not ok and reason == "expected clock>=2, found 1"


def test_at_most_16_objects_per_class():
    dets = [det("person", 0.5 + i / 100) for i in range(20)]
    kept = select_objects(dets, "two_object")["person"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.69) and kept[-1].score == pytest.approx(0.54)
    meta = {"tag": "counting", "prompt": "x", "include": [{"class": "person", "count": 1}],
            "exclude": [{"class": "person", "count": 17}]}
    assert run(dict(meta, tag="two_object"), dets) == (True, "")
    meta["exclude"][0]["count"] = 16
    assert run(dict(meta, tag="two_object"), dets) == (False, "expected person<16, found 16")


def test_overlap_filter_is_off_by_default_and_uses_inclusive_iou():
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    dets = [det("dog", 0.9, (0, 0, 9, 9)), det("dog", 0.8, (5, 0, 14, 9)), det("dog", 0.7, (30, 30, 39, 39))]
    assert len(select_objects(dets, "single_object")["dog"]) == 3
    kept = select_objects(dets, "single_object", Rules(max_overlap=0.3))["dog"]
    assert [d.score for d in kept] == [0.9, 0.7]


def test_below_threshold_objects_vanish():
    meta = {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}
    assert run(meta, [det("cat", 0.31)]) == (True, "")
    assert run(meta, [det("cat", 0.3)]) == (False, "expected cat>=1, found 0")


# --- position: centre offset shrunk by 0.1 × (sum of the two sizes) per axis, relation where its share > 0.5 -------
B = (0, 0, 10, 10)  # target: centre (5, 5), size 10 × 10 → the margin is 0.1 × 20 = 2 per axis


@pytest.mark.parametrize("offset, expected", [
    # straight offsets: revised = |d| − 2, share (|d| − 2) / |d| > 0.5  ⇔  |d| > 4
    ((4.1, 0), {"right of"}), ((3.9, 0), set()), ((-4.1, 0), {"left of"}), ((-3.9, 0), set()),
    ((0, 4.1), {"below"}), ((0, 3.9), set()), ((0, -4.1), {"above"}), ((0, -3.9), set()),
    ((2, 0), set()),  # within the margin: no relation at all
    # (10, 3): revised (8, 1), norm of the raw offset 10.44 → shares 0.766 and 0.096
    ((10, 3), {"right of"}),
    # (6, 6): revised (4, 4) over 8.485 → 0.471 each: a diagonal of this size is in no relation
    ((6, 6), set()),
    # (20, 20): revised (18, 18) over 28.28 → 0.636 each: both
    ((20, 20), {"right of", "below"}),
])
def test_relative_position_at_the_margin(offset, expected):
    dx, dy = offset
    a = (dx, dy, 10 + dx, 10 + dy)
    assert relative_position(a, B) == expected


def test_position_prompt_checks_every_pair_and_needs_its_target():
    meta = {"tag": "position", "prompt": "a photo of a cat right of a dog",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]}
    dog, cat_right, cat_near = det("dog", 0.9, B), det("cat", 0.9, (4.1, 0, 14.1, 10)), det("cat", 0.8, (3, 0, 13, 10))
    assert run(meta, [dog, cat_right]) == (True, "")
    ok, reason = run(meta, [dog, cat_near])
    assert not ok and reason == "expected cat right of target, found  target"
    # only the top-`count` cat is judged: a lower-scoring misplaced cat does not matter
    assert run(meta, [dog, cat_right, cat_near]) == (True, "")
    ok, reason = run(meta, [cat_right])
    assert not ok and reason == "expected dog>=1, found 0\nno target for cat to be right of"


# --- colour: judged on the top-`count` objects of the class; includes ANDed -----------------------------------------
def test_color_attribution_uses_the_top_count_objects():
    meta = {"tag": "color_attr", "prompt": "a photo of a red cat and a blue dog",
            "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]}
    cat1, cat2, dog = det("cat", 0.9, (0, 0, 1, 1)), det("cat", 0.8, (0, 0, 2, 2)), det("dog", 0.9, (0, 0, 3, 3))
    colors = StubColors({cat1.box: "red", cat2.box: "blue", dog.box: "blue"})
    assert run(meta, [cat1, cat2, dog], colors) == (True, "")
    assert colors.calls == [[cat1.box], [dog.box]]
    colors = StubColors({cat1.box: "blue", cat2.box: "red", dog.box: "blue"})
    ok, reason = run(meta, [cat1, cat2, dog], colors)
    assert not ok and reason == "expected red cat>=1, found 0 red; and 1 blue"
    # the second include fails on its own: both must hold
    colors = StubColors({cat1.box: "red", dog.box: "green"})
    ok, reason = run(meta, [cat1, dog], colors)
    assert not ok and reason == "expected blue dog>=1, found 0 blue; and 1 green"


def test_two_objects_and_excludes():
    meta = {"tag": "two_object", "prompt": "a photo of a cat and a dog",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert run(meta, [det("cat"), det("dog"), det("bird")]) == (True, "")
    ok, reason = run(meta, [det("cat"), det("cat", 0.5)])
    assert not ok and reason == "expected dog>=1, found 0"
    meta = dict(meta, exclude=[{"class": "bird", "count": 1}])
    ok, reason = run(meta, [det("cat"), det("dog"), det("bird", 0.4)])
    assert not ok and reason == "expected bird<1, found 1"
    assert run(meta, [det("cat"), det("dog"), det("bird", 0.2)]) == (True, "")


def test_summary_overall_is_the_unweighted_mean_of_the_tags():
    rows = ([{"prompt_index": 0, "tag": "single_object", "correct": c} for c in (True, True, True, False)]
            + [{"prompt_index": 1, "tag": "counting", "correct": False} for _ in range(4)]
            + [{"prompt_index": 2 + i // 4, "tag": "colors", "correct": i == 0} for i in range(8)])
    s = summarize(rows, expected_prompts=4, n_samples=4)
    assert s["tags"]["single_object"] == {"score": 0.75, "correct": 3, "images": 4}
    assert s["tags"]["colors"]["score"] == 1 / 8
    assert s["overall"] == pytest.approx((0.75 + 0 + 1 / 8) / 3)
    assert s["correct_images"] == 4 / 16 and s["correct_prompts"] == 2 / 4
    assert not s["complete"] and "no images for two_object, position, color_attr" in s["problems"]
    assert "INCOMPLETE" in format_table(s)


def test_detector_registry():
    assert {"mask2former", "mmdet", "shapes"} <= set(DETECTORS)
    with pytest.raises(ValueError, match="unknown GenEval detector 'yolo'"):
        build_detector("yolo")
    with pytest.raises(ValueError, match="mmdet needs CONFIG,CHECKPOINT"):
        build_detector("mmdet:only_config.py")
