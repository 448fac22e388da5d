"""Streaming loader: exactly-once epochs, bucket shapes, exact resumption (2 ranks x 2 workers), bad data."""
import os
import pickle
import random
from collections import Counter

import pytest
import torch

from data_pipeline.captions import caption_dropout
from data_pipeline.loader import ShardLoader, build_loader
from data_pipeline.shard_index import read_index
from data_fixtures import TINY_TABLE, good_sample, make_synthetic, write_index, write_tar

NUM = 48


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth") / "s", num=NUM, per_shard=8, size=40)


@pytest.fixture(scope="module")
def synth_long(tmp_path_factory):
    """4 shards of 16: with 2 ranks x 2 streams each stream owns one shard, so a restart lands mid-shard."""
    return make_synthetic(tmp_path_factory.mktemp("synth_long") / "s", num=64, per_shard=16, size=40, seed=5)


def _loader(path, rank=0, world=1, workers=0, **kw):
    args = dict(batch_size=3, rank=rank, world_size=world, num_workers=workers, seed=7, bucket_mode="multi",
                resolution=48, bucket_table=TINY_TABLE, shuffle_buffer=5, epochs=1, drop_last=False)
    args.update(kw)
    bs = args.pop("batch_size")
    return ShardLoader([path], bs, **args)


def _all_keys(path):
    return sorted(f"synth_0_{i:07d}" for i in range(NUM))


def _summ(batch):
    return (tuple(batch["key"]), tuple(batch["image"].shape), round(float(batch["image"].double().sum()), 4),
            tuple(batch["caption"]))


# Every per-sample random choice switched on, so restored samples must be bit-identical to pass.
RANDOM = dict(crop="random", hflip=True, text_dropout=0.3)


def test_batches_have_one_bucket_shape_and_valid_fields(synth):
    shapes = set()
    for b in _loader(synth):
        B, C, H, W = b["image"].shape
        assert C == 3 and [H, W] in TINY_TABLE.values()
        assert b["image"].dtype == torch.float32 and -1 <= b["image"].min() and b["image"].max() <= 1
        assert len(b["caption"]) == len(b["key"]) == len(b["meta"]) == B
        assert all(c.startswith("a photo of") for c in b["caption"])
        assert "label" not in b  # text-to-image data has no labels
        for m in b["meta"]:
            assert "objects" in m and m["shard"].endswith(".tar")
        shapes.add((H, W))
    assert len(shapes) >= 2  # the synthetic data has several aspect ratios


def test_one_epoch_is_exactly_once_across_ranks_and_streams(synth):
    keys = []
    for rank in range(2):
        for b in _loader(synth, rank=rank, world=2, streams_per_rank=3):  # 6 streams, 6 shards
            keys += b["key"]
    assert sorted(keys) == _all_keys(synth)
    # Fewer shards than streams: sample-strided split, still exactly once.
    keys = []
    for rank in range(2):
        for b in _loader(synth, rank=rank, world=2, streams_per_rank=4):  # 8 streams > 6 shards
            keys += b["key"]
    assert sorted(keys) == _all_keys(synth)


def test_seed_changes_order_but_not_content(synth):
    a = [k for b in _loader(synth, seed=1) for k in b["key"]]
    b_ = [k for b in _loader(synth, seed=1) for k in b["key"]]
    c = [k for b in _loader(synth, seed=2) for k in b["key"]]
    assert a == b_ and a != c and sorted(a) == sorted(c)


def test_infinite_mode_and_drop_last_keep_full_batches(synth):
    it = iter(_loader(synth, epochs=None, drop_last=True))
    batches = [next(it) for _ in range(40)]  # 120 samples = 2.5 epochs
    assert all(b["image"].shape[0] == 3 for b in batches)
    counts = Counter(k for b in batches for k in b["key"])
    assert max(counts.values()) <= 3 and len(counts) == NUM


def test_exact_resume_2_ranks_2_workers_then_1_worker(synth_long):
    """Kill after a few batches (mid-shard), restore on each rank -> union == uninterrupted run, no repeats.

    Ranks are independent processes in a real job; here each rank is its own loader with real dataloader
    worker processes (2 before the restart, 1 and 2 after it).
    """
    synth, union = synth_long, []
    for rank in range(2):
        full = [_summ(b) for b in _loader(synth, rank, 2, workers=2, **RANDOM)]
        union += [k for s in full for k in s[0]]
        loader = _loader(synth, rank, 2, workers=2, **RANDOM)
        it = iter(loader)
        before = [_summ(next(it)) for _ in range(3)]
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        del it
        # The restart happens in the middle of a shard with samples waiting in buffers/buckets.
        cursors = [c for s in state["streams"].values() for c in s["cursors"].values()]
        assert any(0 < c["offset"] < 16 for c in cursors), cursors
        assert any(s["buffer"] or s["buckets"] for s in state["streams"].values())
        for workers in (1, 2):
            resumed = _loader(synth, rank, 2, workers=workers, **RANDOM)
            resumed.load_state_dict(state)
            after = [_summ(b) for b in resumed]
            keys = [k for s in before + after for k in s[0]]
            assert len(keys) == len(set(keys)), "a sample was repeated"
            assert sorted(keys) == sorted(k for s in full for k in s[0]), "a sample was lost"
            # Same batches, bit-identical pixels, whatever the number of workers.
            assert sorted(before + after) == sorted(full)
    assert sorted(union) == sorted(f"synth_5_{i:07d}" for i in range(64))  # exactly once across ranks


def test_resume_in_process_matches_uninterrupted_sequence(synth):
    loader = _loader(synth, epochs=None, drop_last=True, shuffle_buffer=7, **RANDOM)
    it = iter(loader)
    full = [_summ(next(it)) for _ in range(30)]  # crosses the epoch boundary (16 batches per epoch)
    loader = _loader(synth, epochs=None, drop_last=True, shuffle_buffer=7, **RANDOM)
    it = iter(loader)
    head = [_summ(next(it)) for _ in range(11)]
    state = loader.state_dict()
    resumed = _loader(synth, epochs=None, drop_last=True, shuffle_buffer=7, **RANDOM)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [_summ(next(it)) for _ in range(19)]
    assert head + tail == full


def test_state_rejects_other_world_size(synth):
    loader = _loader(synth, 0, 2)
    next(iter(loader))
    other = _loader(synth, 0, 4)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(loader.state_dict())


def test_bad_data_is_counted_and_skipped(tmp_path, caplog):
    d = tmp_path / "bad"
    d.mkdir()
    good = [good_sample(f"g{i}") for i in range(6)]
    write_tar(d / "a.tar", good[:3] + [("corrupt", {"png": b"not an image", "txt": b"a photo of x"}),
                                        ("nocap", {"png": good[0][1]["png"]}),
                                        ("noimg", {"txt": b"a photo of nothing"})])
    write_tar(d / "b.tar", good[3:])
    full = open(d / "b.tar", "rb").read()
    write_tar(d / "c.tar", [good_sample(f"t{i}", w=64, h=64) for i in range(3)])
    blob = open(d / "c.tar", "rb").read()
    open(d / "c.tar", "wb").write(blob[: 3 * 1024 + 600])  # truncated inside the 2nd sample's image
    write_tar(d / "e.tar", [good_sample(f"u{i}") for i in range(3)])
    blob = open(d / "e.tar", "rb").read()
    open(d / "e.tar", "wb").write(blob[: 5 * 1024])  # cut on a header boundary: only the index can tell
    open(d / "d.tar", "wb").write(b"\x00garbage" * 3)  # unreadable shard
    write_index(str(d), [("a.tar", 6), ("b.tar", 3), ("c.tar", 3), ("d.tar", 1), ("e.tar", 3)])
    loader = ShardLoader([str(d)], 2, resolution=32, epochs=1, drop_last=False, shuffle_buffer=2)
    keys = [k for b in loader for k in b["key"]]
    assert len(full) > 0
    c = loader.bad_data_counters
    assert c["decode_error"] == 1 and c["missing_caption"] == 1 and c["missing_image"] == 1, c
    assert c["truncated_shard"] == 2 and c["unreadable_shard"] == 1, c
    assert "t1" not in keys and "u1" not in keys  # incomplete last samples of truncated tars are dropped
    assert {f"g{i}" for i in range(6)} | {"t0", "u0"} <= set(keys)
    assert not {"corrupt", "nocap", "noimg"} & set(keys)
    assert "corrupt" in caplog.text and "a.tar" in caplog.text


def test_class_labels_and_weighted_mixing(tmp_path):
    c2i = make_synthetic(tmp_path / "c2i", num=24, per_shard=6, size=32, mode="c2i", aspect="square", seed=1)
    t2i = make_synthetic(tmp_path / "t2i", num=24, per_shard=6, size=32, seed=2)
    assert read_index(c2i)["classes"] == ["circle", "square", "triangle", "diamond"]
    b = next(iter(ShardLoader([c2i], 4, resolution=32, crop="adm")))
    assert b["label"].dtype == torch.long and b["label"].shape == (4,)
    for i, (lab, m) in enumerate(zip(b["label"].tolist(), b["meta"])):
        assert ["circle", "square", "triangle", "diamond"][lab] == m["objects"][0]["shape"]
        # 32x32 images at 32: no resampling, so pixels come through exactly (ground truth survives the loader).
        x0, y0, x1, y1 = m["objects"][0]["box"]
        rgb = b["image"][i, :, (y0 + y1) // 2, (x0 + x1) // 2]
        assert torch.allclose((rgb + 1) * 127.5, torch.tensor(m["objects"][0]["rgb"], dtype=torch.float32),
                              atol=1e-3)
        assert torch.allclose((b["image"][i, :, 0, 0] + 1) * 127.5, torch.tensor(m["background_rgb"]).float(),
                              atol=1e-3) or x0 == 0 or y0 == 0
    # Mixing: weight 3:1, infinite streams; the first 80 samples follow the weights.
    mix = ShardLoader([{"path": c2i, "weight": 3.0}, {"path": t2i, "weight": 1.0}], 4, resolution=32,
                      require_caption=False)
    it = iter(mix)
    seeds = Counter(k.split("_")[1] for _ in range(20) for k in next(it)["key"])
    assert 45 <= seeds["1"] <= 75 and seeds["1"] + seeds["2"] == 80, seeds


def test_build_loader_from_config_and_text_dropout(synth):
    cfg = {"datasets": [{"path": synth}], "multi_scale": False, "image_size": 32, "shuffle_buffer": 4,
           "epochs": 1, "drop_last": False}
    loader = build_loader(cfg, rank=0, world_size=1, seed=3, batch_size=4, text_dropout=1.0)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == NUM
    assert all(c == "" for b in batches for c in b["caption"]) and all(b["dropped"].all() for b in batches)
    with pytest.raises(ValueError, match="unknown data config"):
        build_loader({"path": synth, "bogus": 1}, batch_size=2)
    assert caption_dropout(["a", "b"], 0.0, random.Random(0)) == ["a", "b"]
    out = caption_dropout(["x"] * 2000, 0.25, random.Random(0))
    assert 400 < out.count("") < 600


def test_cached_text_embeddings(tmp_path):
    import io

    import numpy as np
    d = tmp_path / "emb"
    d.mkdir()
    samples = []
    for i in range(4):
        key, members = good_sample(f"e{i}")
        L = 3 + i
        e = io.BytesIO()
        np.save(e, np.full((L, 5), i, dtype=np.float16))
        members["txt_emb.npy"] = e.getvalue()
        samples.append((key, members))
    write_tar(d / "x.tar", samples)
    write_index(str(d), [("x.tar", 4)])
    b = next(iter(ShardLoader([str(d)], 4, resolution=32, use_text_emb=True, shuffle_buffer=1, epochs=1)))
    assert b["text_emb"].shape == (4, 6, 5) and b["text_mask"].shape == (4, 6)
    for i, k in enumerate(b["key"]):
        n = 3 + int(k[1:])
        assert b["text_mask"][i].sum() == n and float(b["text_emb"][i, 0, 0]) == int(k[1:])


def test_url_specs_with_braces_and_pipe_commands(synth):
    index = read_index(synth)
    n = len(index["shards"])
    spec = f"pipe:cat {synth}/synthetic-{{000000..{n - 1:06d}}}.tar"
    entry = {"urls": spec, "index": os.path.join(synth, "index.json")}
    keys = []
    for rank in range(2):  # 8 streams > 6 shards: the sample-strided split needs the counts from the index
        loader = ShardLoader([entry], 4, rank=rank, world_size=2, streams_per_rank=4, resolution=32, epochs=1,
                             drop_last=False, shuffle_buffer=3)
        keys += [k for b in loader for k in b["key"]]
    assert sorted(keys) == _all_keys(synth)
    # Resume through pipes (restoring buffers closes pipes early).
    loader = ShardLoader([entry], 4, streams_per_rank=2, resolution=32, epochs=1, drop_last=False, shuffle_buffer=5)
    it = iter(loader)
    head = [k for _ in range(3) for k in next(it)["key"]]
    resumed = ShardLoader([entry], 4, resolution=32, epochs=1, drop_last=False, shuffle_buffer=5)
    resumed.load_state_dict(loader.state_dict())
    tail = [k for b in resumed for k in b["key"]]
    assert sorted(head + tail) == _all_keys(synth)
    with pytest.raises(ValueError, match="no index"):
        next(iter(ShardLoader([{"urls": spec}], 4, world_size=4, streams_per_rank=2, resolution=32)))


def test_bench_runs_end_to_end(tmp_path):
    from data_pipeline import bench
    results = bench.run(num=8, batch_size=2, repeats=1, workdir=str(tmp_path), warmup=2)
    assert sorted(results) == ["1024", "512"]
    for r in results.values():
        assert r["images"] == 8
        for k in ("floor", "loader_1worker", "loader_inprocess"):
            assert r["images_per_s"][k]["wall"] > 0 and r["images_per_s"][k]["cpu"] > 0
        assert r["ratio_1worker"]["cpu"] > 0 and r["median_paired_ratio_inprocess"]["cpu"] > 0
    assert results["512"]["psnr_fast_vs_full_db"]["min"] >= 35  # 2-3 MP sources: reduced-size decoding
    assert results["1024"]["psnr_fast_vs_full_db"]["min"] == float("inf")  # < 2x the bucket: full decoding


def test_loader_applies_clip_score_caption_rule(tmp_path):
    import json as _json

    from data_fixtures import png_bytes
    d = tmp_path / "caps"
    d.mkdir()
    samples = []
    for i in range(40):
        meta = {"width": 24, "height": 24, "captions": {"prompt": f"short {i}", "vlm": f"long {i}", "other": f"o {i}"},
                "scores": {"prompt": 20.0, "vlm": 30.0, "other": 29.0}}
        samples.append((f"c{i}", {"png": png_bytes(), "txt": f"short {i}".encode(),
                                  "json": _json.dumps(meta).encode()}))
    write_tar(d / "x.tar", samples)
    write_index(str(d), [("x.tar", 40)])
    loader = ShardLoader([str(d)], 8, resolution=16, epochs=1, clip_thr=25.0, clip_thr_temperature=0.1)
    batches = list(loader)
    sources = Counter(m["caption_source"] for b in batches for m in b["meta"])
    assert set(sources) == {"vlm", "other"} and sum(sources.values()) == 40
    for b in batches:
        for k, c, m in zip(b["key"], b["caption"], b["meta"]):
            assert c == {"vlm": f"long {k[1:]}", "other": f"o {k[1:]}"}[m["caption_source"]]


def test_recycled_worker_buffers_never_corrupt_batches(synth_long):
    """One bucket shape, many batches: the worker's shared-memory ring wraps around many times."""
    import time as _time

    def run(workers, slow):
        out, held = [], []
        for b in _loader(synth_long, workers=workers, bucket_mode="fixed", resolution=32, batch_size=2,
                         streams_per_rank=1):
            out.append(_summ(b))
            held = [b] + held[:1]  # the trainer may keep the previous batch a little
            if slow:
                _time.sleep(0.01)
        return out

    assert run(1, slow=True) == run(0, slow=False)
