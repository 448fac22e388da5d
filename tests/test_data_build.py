"""Shard builder: every source kind, skip reasons, atomic writes, resume, CLI."""
import csv
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from data_pipeline.build_shards import BuildOptions, build_shards, main, records_for
from data_pipeline.shard_index import read_index
from data_fixtures import jpeg_bytes, png_bytes, write_tar


def _members(path):
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _all_samples(out_dir):
    index = read_index(out_dir)
    samples = {}
    for s in index["shards"]:
        members = _members(os.path.join(out_dir, s["name"]))
        assert len(members) == s["count"]
        samples.update(members)
    return index, samples


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        (root / f"ok{i}.jpg").write_bytes(jpeg_bytes(40 + i, 32))
        (root / f"ok{i}.txt").write_text(f"caption {i}\n")
    (root / "sub" / "j.png").write_bytes(png_bytes(48, 48))
    (root / "sub" / "j.json").write_text(json.dumps({"captions": {"prompt": "main", "vlm": "long one"},
                                                      "scores": {"prompt": 20.0, "vlm": 30.0}}))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8garbage")
    (root / "corrupt.txt").write_text("x")
    good = jpeg_bytes(64, 64)
    (root / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "trunc.txt").write_text("x")
    (root / "tiny.png").write_bytes(png_bytes(8, 8))
    (root / "tiny.txt").write_text("x")
    (root / "nocap.png").write_bytes(png_bytes(40, 40))
    return str(root)


def test_folder_source_counts_keys_and_skip_reasons(folder, tmp_path):
    out = str(tmp_path / "out")
    recs, _, _ = records_for(folder)
    stats = build_shards(recs, out, samples_per_shard=3, opts=BuildOptions(min_side=16), progress=False)
    assert stats["written"] == 8 and stats["inputs"] == 12
    assert stats["skipped"] == {"corrupt": 1, "truncated": 1, "too_small": 1, "no_caption": 1}
    index, samples = _all_samples(out)
    assert [s["name"] for s in index["shards"]] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert [s["count"] for s in index["shards"]] == [3, 3, 2] and index["total"] == 8
    assert set(samples) == {f"ok{i}" for i in range(7)} | {"sub_j"}
    meta = json.loads(samples["sub_j"]["json"])
    assert meta["width"] == 48 and meta["captions"] == {"prompt": "main", "vlm": "long one"}
    assert meta["scores"] == {"prompt": 20.0, "vlm": 30.0} and samples["sub_j"]["txt"] == b"main"
    assert json.loads(samples["ok3"]["json"])["width"] == 43 and samples["ok3"]["txt"] == b"caption 3"
    assert "jpg" in samples["ok0"] and "png" in samples["sub_j"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert json.load(open(os.path.join(out, "build_stats.json")))["written"] == 8


def test_reencode_max_side(folder, tmp_path):
    out = str(tmp_path / "out")
    recs, _, _ = records_for(folder)
    build_shards(recs, out, opts=BuildOptions(max_side=20), progress=False)
    _, samples = _all_samples(out)
    for s in samples.values():
        meta = json.loads(s["json"])
        assert max(meta["width"], meta["height"]) <= 20
        ext = "jpg" if meta["width"] > 8 else "png"  # only images above max_side are re-encoded
        im = Image.open(io.BytesIO(s[ext]))
        assert im.size == (meta["width"], meta["height"])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_sources(tmp_path, fmt):
    rows = []
    for i in range(5):
        (tmp_path / f"m{i}.png").write_bytes(png_bytes(30, 20))
        rows.append({"image": f"m{i}.png", "caption": f"cap {i}", "caption_vlm": f"vlm {i}",
                     "score_vlm": 27.5, "score_prompt": 22.0})
    rows.append({"image": "missing.png", "caption": "gone"})
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    recs, _, _ = records_for(str(path))
    stats = build_shards(recs, str(tmp_path / "out"), progress=False)
    assert stats["written"] == 5 and stats["skipped"] == {"unreadable": 1}
    _, samples = _all_samples(str(tmp_path / "out"))
    meta = json.loads(samples["m2"]["json"])
    assert meta["captions"] == {"prompt": "cap 2", "vlm": "vlm 2"} and meta["scores"]["vlm"] == 27.5
    # Filter on the caption scores.
    recs, _, _ = records_for(str(path))
    stats = build_shards(recs, str(tmp_path / "filtered"), opts=BuildOptions(min_score=28.0), progress=False)
    assert stats["written"] == 0 and stats["skipped"] == {"low_score": 5, "unreadable": 1}  # scoreless row kept


def test_reshard_wds_and_imagenet_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    meta = lambda c: json.dumps({"caption": c, "width": 24, "height": 24, "status": "success"}).encode()  # noqa
    write_tar(src / "00000.tar", [(f"{i:05d}", {"jpg": jpeg_bytes(), "txt": f"c{i}".encode(), "json": meta(f"c{i}")})
                                  for i in range(4)])
    write_tar(src / "00001.tar", [("00004", {"jpg": jpeg_bytes(), "txt": b""})])  # caption-less
    (src / "00002.tar").write_bytes(b"not a tar at all")
    write_tar(src / "00003.tar", [(f"t{i}", {"png": png_bytes(), "txt": b"cut"}) for i in range(3)])
    blob = (src / "00003.tar").read_bytes()
    (src / "00003.tar").write_bytes(blob[: 4 * 1024 + 300])  # t0 complete, t1 cut inside its caption
    recs, _, _ = records_for(str(src / "{00000..00003}.tar"))
    stats = build_shards(recs, str(tmp_path / "re"), samples_per_shard=2, progress=False)
    assert stats["written"] == 5, stats
    assert stats["skipped"] == {"no_caption": 1, "unreadable_shard": 1, "truncated_shard": 1}
    _, samples = _all_samples(str(tmp_path / "re"))
    assert samples["00002"]["txt"] == b"c2" and "t0" in samples and "t1" not in samples

    tree = tmp_path / "imagenet"
    for syn in ("n01440764", "n01443537"):
        (tree / syn).mkdir(parents=True)
        for j in range(3):
            (tree / syn / f"{syn}_{j}.JPEG").write_bytes(jpeg_bytes(36, 30))
    assert main([str(tree), "--out", str(tmp_path / "in"), "--workers", "1", "--quiet"]) == 0
    index, samples = _all_samples(str(tmp_path / "in"))
    assert index["classes"] == ["n01440764", "n01443537"] and index["total"] == 6
    labels = {k: json.loads(v["json"])["label"] for k, v in samples.items()}
    assert labels["n01443537_2"] == 1 and labels["n01440764_0"] == 0


def _numbered(tmp_path, n):
    d = tmp_path / "numbered"
    d.mkdir(exist_ok=True)
    for i in range(n):
        (d / f"{i:03d}.png").write_bytes(png_bytes(20 + i % 5, 20, color=(i, 2 * i, 3 * i)))
        (d / f"{i:03d}.txt").write_text(f"number {i}")
    (d / "bad.png").write_bytes(b"junk")
    (d / "bad.txt").write_text("junk")
    return str(d)


def test_interrupted_build_resumes_to_identical_output(tmp_path):
    src = _numbered(tmp_path, 23)
    ref = str(tmp_path / "ref")
    build_shards(records_for(src)[0], ref, samples_per_shard=5, progress=False)

    def dying(limit):
        for i, r in enumerate(records_for(src)[0]):
            if i == limit:
                raise KeyboardInterrupt("killed")
            yield r

    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        build_shards(dying(13), out, samples_per_shard=5, progress=False)
    assert sorted(os.listdir(out)) == ["data-000000.tar", "data-000001.tar", "index.json"]  # no half tar
    with pytest.raises(FileExistsError):
        build_shards(records_for(src)[0], out, samples_per_shard=5, progress=False)
    # A stray partial shard from a harder kill is removed and rebuilt.
    open(os.path.join(out, "data-000002.tar.tmp"), "wb").write(b"partial")
    stats = build_shards(records_for(src)[0], out, samples_per_shard=5, resume=True, workers=2, progress=False)
    assert stats["written"] == 23 and stats["skipped"] == {"corrupt": 1}
    ri, rs = _all_samples(ref)
    oi, os_ = _all_samples(out)
    assert [(s["name"], s["count"]) for s in ri["shards"]] == [(s["name"], s["count"]) for s in oi["shards"]]
    assert rs == os_
