"""Synthetic shapes: exact ground truth, GenEval phrasing, shards through the builder, CLI."""
import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image

from data_pipeline.shard_index import read_index
from data_pipeline.synthetic import COLORS, NUMBERS, SHAPES, TAGS, main, synthetic_records

_NUM_WORDS = {v: k for k, v in NUMBERS.items()}


def _check_record(rec):
    img = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB")).astype(int)
    meta, prompt = rec["extra"], rec["captions"]["prompt"]
    h, w, _ = img.shape
    objs = meta["objects"]
    # Every object's box is inside the image, boxes do not overlap, centre pixel has the object's colour.
    for i, o in enumerate(objs):
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == tuple(COLORS[o["color"]])
        assert o["rgb"] == list(COLORS[o["color"]])
        for p in objs[i + 1:]:
            a, b = o["box"], p["box"]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        # Outside the box nothing of this colour leaks (drawing is exact, no anti-aliasing).
        mask = np.all(img == COLORS[o["color"]], axis=-1)
        others = [p["box"] for p in objs if p["color"] == o["color"]]
        inside = np.zeros_like(mask)
        for bx in others:
            inside[bx[1]:bx[3], bx[0]:bx[2]] = True
        assert not (mask & ~inside).any()
    # Pixels outside every box are background.
    bg = np.ones((h, w), bool)
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        bg[y0:y1, x0:x1] = False
    assert (img[bg] == meta["background_rgb"]).all()
    # Counts and caption agree with the objects.
    assert sum(meta["counts"].values()) == len(objs)
    assert prompt.startswith("a photo of ")
    tag = meta["tag"]
    if tag == "counting":
        word, shape = re.match(r"a photo of (\w+) (\w+)s$", prompt).groups()
        assert meta["counts"] == {shape: _NUM_WORDS[word]}
    elif tag == "position":
        m = re.match(r"a photo of an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)$", prompt)
        c1, s1, rel, c2, s2 = m.groups()
        a = next(o for o in objs if o["shape"] == s1 and o["color"] == c1)["box"]
        b = next(o for o in objs if o["shape"] == s2 and o["color"] == c2)["box"]
        assert {"left of": a[2] <= b[0], "right of": a[0] >= b[2], "above": a[3] <= b[1],
                "below": a[1] >= b[3]}[rel]
    elif tag in ("colors", "color_attr"):
        for o in objs:
            assert f"{o['color']} {o['shape']}" in prompt
    else:
        for o in objs:
            assert o["shape"] in prompt
    return tag


def test_ground_truth_is_exact_for_every_tag():
    tags = [_check_record(r) for r in synthetic_records(120, seed=3, size=64)]
    assert set(tags) == set(TAGS)


def test_class_conditional_flavour():
    for r in synthetic_records(20, seed=1, size=32, mode="c2i", aspect="square"):
        assert SHAPES[r["label"]] == r["extra"]["objects"][0]["shape"]
        assert Image.open(io.BytesIO(r["image"])).size == (32, 32)


def test_cli_writes_shards_through_builder(tmp_path):
    out = str(tmp_path / "demo")
    assert main(["--out", out, "--num", "25", "--size", "48", "--samples-per-shard", "10"]) == 0
    index = read_index(out)
    assert [s["count"] for s in index["shards"]] == [10, 10, 5] and index["total"] == 25
    with tarfile.open(os.path.join(out, index["shards"][0]["name"])) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("synth_0_0000000.json").read())
    assert {"synth_0_0000000.png", "synth_0_0000000.txt", "synth_0_0000000.json"} <= set(names)
    assert meta["tag"] == "single_object" and meta["captions"]["prompt"].startswith("a photo of")
    assert {"objects", "counts", "include", "width", "height"} <= set(meta)
    # Same seed, same data.
    a = [r["image"] for r in synthetic_records(5, seed=9)]
    b = [r["image"] for r in synthetic_records(5, seed=9)]
    assert a == b


def test_layout_fixed_size_grid_backgrounds_and_exact_sizes():
    from data_pipeline.synthetic import Layout
    layout = Layout(object_size=12, grid=4, backgrounds=("grey",))
    sizes = [(48, 48), (64, 32), (32, 64)]
    seen_sizes, tags = set(), set()
    for r in synthetic_records(90, seed=5, size=48, layout=layout, sizes=sizes):
        tags.add(_check_record(r))
        meta = r["extra"]
        seen_sizes.add(Image.open(io.BytesIO(r["image"])).size)
        assert meta["background"] == "grey"
        for o in meta["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert (x1 - x0, y1 - y0) == (12, 12), o
            assert x0 % 4 == 0 and y0 % 4 == 0, o
    assert seen_sizes == set(sizes) and tags == set(TAGS)
    # 32² squares (the demo's stage 1): four 12-px objects still fit, and so do the two halves of a relation
    for r in synthetic_records(60, seed=6, size=32, aspect="square", layout=layout):
        assert all(o["box"][2] - o["box"][0] == 12 for o in r["extra"]["objects"])


def test_layout_rejects_bad_options(capsys):
    import pytest
    from data_pipeline.synthetic import Layout, parse_sizes
    with pytest.raises(ValueError, match="unknown background"):
        Layout(backgrounds=("teal",))
    with pytest.raises(ValueError, match="grid"):
        Layout(grid=0)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_sizes("48,32")
    with pytest.raises(ValueError, match="does not fit"):
        next(synthetic_records(1, size=32, aspect="square", layout=Layout(object_size=40)))
    with pytest.raises(SystemExit):
        main(["--out", "x", "--num", "1", "--backgrounds", "teal"])
    assert "unknown background" in capsys.readouterr().err


def test_holdout_applies_to_shards_too(tmp_path):
    """--holdout keeps held-out combinations out of shards written directly, not only out of --source folders."""
    from data_pipeline.synthetic import Holdout
    out = tmp_path / "shards"
    assert main(["--out", str(out), "--num", "120", "--size", "32", "--aspect", "square", "--holdout",
                 "--samples-per-shard", "60"]) == 0
    holdout, n = Holdout(), 0
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tf.extractfile(m))
                    assert not holdout.covers(meta["tag"], meta["include"]), meta["captions"]
                    n += 1
    assert n == 120
