"""Aspect-ratio tables, nearest-bucket assignment, cover-resize + crop, caption choice."""
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_pipeline.buckets import (ASPECT_RATIO_512, ASPECT_RATIO_1024, BucketSpec, adm_center_crop, get_table,
                                   nearest_bucket, resize_cover_crop)
from data_pipeline.captions import choose_caption


@pytest.mark.parametrize("table,target", [(ASPECT_RATIO_512, 512 * 512), (ASPECT_RATIO_1024, 1024 * 1024)])
def test_tables_are_patch_multiples_near_target_pixels(table, target):
    for key, (h, w) in table.items():
        assert h % 16 == 0 and w % 16 == 0
        assert 0.85 * target <= h * w <= 1.2 * target, (key, h, w)  # the 1024 table reaches 1.15x
        assert abs(float(key) - h / w) < 0.06, (key, h, w)
    assert len(ASPECT_RATIO_512) == 40 and len(ASPECT_RATIO_1024) == 7
    assert ASPECT_RATIO_1024["0.5625"] == [752, 1344] and ASPECT_RATIO_512["4.0"] == [1024, 256]
    assert get_table(512) is ASPECT_RATIO_512 and get_table("ASPECT_RATIO_1024") is ASPECT_RATIO_1024


def test_nearest_bucket():
    assert nearest_bucket(1024, 1024, ASPECT_RATIO_1024) == (1024, 1024)
    assert nearest_bucket(1080, 1920, ASPECT_RATIO_1024) == (752, 1344)  # 16:9 landscape
    assert nearest_bucket(1920, 1080, ASPECT_RATIO_1024) == (1344, 752)
    assert nearest_bucket(3000, 100, ASPECT_RATIO_512) == (1024, 256)  # beyond the table: the extreme bucket
    assert nearest_bucket(608, 800, ASPECT_RATIO_512) == (448, 576)  # 0.76 -> "0.78"
    assert BucketSpec("fixed", 512).assign(100, 900) == (512, 512)
    with pytest.raises(ValueError):
        BucketSpec("fixed", 500)


def test_resize_cover_crop_shapes_and_content():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 150, 100))  # left half red
    out = resize_cover_crop(img, (64, 96))
    assert out.size == (96, 64)
    a = np.asarray(out)
    assert a[:, :40, 0].min() > 200 and a[:, 56:, 0].max() < 50  # centre crop keeps the red/black split centred
    rng1, rng2 = random.Random(3), random.Random(3)
    r1, r2 = resize_cover_crop(img, (64, 64), True, rng1), resize_cover_crop(img, (64, 64), True, rng2)
    assert r1.size == (64, 64) and np.array_equal(np.asarray(r1), np.asarray(r2))
    lefts = {np.asarray(resize_cover_crop(img, (64, 64), True, random.Random(s)))[:, 0, 0].mean() > 128
             for s in range(20)}
    assert lefts == {True, False}  # random crops land on both halves
    assert adm_center_crop(Image.new("RGB", (1000, 600)), (256, 256)).size == (256, 256)
    spec = BucketSpec("multi", 1024)
    for size in [(1920, 1080), (1080, 1920), (1000, 1000), (1500, 1000)]:
        im = Image.new("RGB", size)
        b = spec.assign(im.height, im.width)
        assert spec.apply(im, b).size == (b[1], b[0])


def test_caption_choice_follows_clip_score_rule():
    caps = {"prompt": "short", "vlm": "long", "other": "x"}
    scores = {"prompt": 20.0, "vlm": 30.0, "other": 29.0}
    rng = random.Random(0)
    picks = Counter(choose_caption(caps, scores, rng, clip_thr=25.0, clip_thr_temperature=0.1)[0]
                    for _ in range(4000))
    assert set(picks) == {"vlm", "other"}  # "prompt" is under the threshold
    ratio = picks["other"] / picks["vlm"]  # (29/30)^10 = 0.71
    assert 0.6 < ratio < 0.83, picks
    # None passes: the best-scored source.
    assert choose_caption(caps, {"prompt": 5.0, "vlm": 9.0}, rng, clip_thr=25.0) == ("vlm", "long")
    # No scores: caption_proportion, else the main caption.
    assert choose_caption(caps, None, rng) == ("prompt", "short")
    props = Counter(choose_caption(caps, None, rng, caption_proportion={"vlm": 3, "prompt": 1})[0]
                    for _ in range(2000))
    assert set(props) == {"vlm", "prompt"} and 2.4 < props["vlm"] / props["prompt"] < 3.8
    assert choose_caption({}, None, rng) == ("prompt", "")


def test_bucket_off_the_patch_grid_is_a_clear_error():
    with pytest.raises(ValueError, match=r"bucket '1.0': 40x40 is not a multiple of 16"):
        BucketSpec("multi", 40, table={"0.5": [32, 64], "1.0": [40, 40]})
    assert BucketSpec("multi", 40, table={"1.0": [40, 40]}, patch_size=8).buckets == [(40, 40)]
