"""Fault injection over the loader and the shard builder: every bad input is a counted skip under the right
reason (or a one-line error for bad arguments), never a crash; images come out right whatever their mode or
EXIF orientation."""
import io
import json
import logging
import os
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.buckets import BucketSpec
from data_pipeline.build_shards import BuildOptions, build_shards, main, records_for
from data_pipeline.decode import decode_to_bucket, to_rgb
from data_pipeline.loader import ShardLoader, build_loader
from data_pipeline.shard_index import read_index
from data_fixtures import good_sample, jpeg_bytes, png_bytes, write_index, write_tar

BAD_UTF8 = b"caf\xe9 \xff\xfe"


def _keys_and_counters(paths, **kw):
    loader = ShardLoader(paths, 2, resolution=32, epochs=1, drop_last=False, shuffle_buffer=4, **kw)
    keys = [k for b in loader for k in b["key"]]
    return keys, loader.bad_data_counters


def _shard_members(out_dir):
    import tarfile
    samples = {}
    for s in read_index(out_dir)["shards"]:
        with tarfile.open(os.path.join(out_dir, s["name"])) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def bomb_png(w=40000, h=40000):
    """A PNG whose header claims ``w x h`` pixels (no pixel data follows)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def halves_jpeg(w, h, orientation=None, first=(230, 20, 20), second=(20, 20, 230)):
    """Stored pixels: left half ``first``, right half ``second``; optional EXIF orientation tag."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2:] = first, second
    img, buf = Image.fromarray(a), io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- loader
BAD_JSONS = {
    "j_null": b"null", "j_list": b"[1, 2]", "j_str": b'"a string"', "j_num": b"3",
    "j_capstr": json.dumps({"captions": "just a string"}).encode(),
    "j_capnum": json.dumps({"captions": {"prompt": 5}}).encode(),
    "j_scorestr": json.dumps({"captions": {"prompt": "x"}, "scores": {"prompt": "high"}}).encode(),
    "j_scorelist": json.dumps({"captions": {"prompt": "x"}, "scores": {"prompt": [0.3]}}).encode(),
    "j_scoresarr": json.dumps({"scores": [0.3]}).encode(),
    "j_label": json.dumps({"label": "cat"}).encode(),
    "j_utf8": b'{"captions": {"prompt": "caf\xe9"}}',
    "j_syntax": b"{not json",
}


def test_loader_validates_every_json_field_caption_and_label(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    png = png_bytes()
    samples = [good_sample(f"g{i}") for i in range(4)]
    samples += [(k, {"png": png, "txt": b"a photo", "json": v}) for k, v in BAD_JSONS.items()]
    samples += [("badtxt", {"png": png, "txt": BAD_UTF8}), ("badcls", {"png": png, "txt": b"x", "cls": b"cat"})]
    write_tar(d / "a.tar", samples)
    write_index(str(d), [("a.tar", len(samples))])
    keys, c = _keys_and_counters([str(d)])
    assert sorted(keys) == [f"g{i}" for i in range(4)]
    assert c["bad_json"] == len(BAD_JSONS) and c["bad_caption"] == 1 and c["bad_label"] == 1, c


def test_shard_faults_count_once_with_fewer_shards_than_streams(tmp_path):
    d = tmp_path / "few"
    d.mkdir()
    write_tar(d / "a.tar", [good_sample(f"a{i}") for i in range(4)])
    write_tar(d / "b.tar", [good_sample(f"b{i}") for i in range(3)])
    blob = (d / "b.tar").read_bytes()
    (d / "b.tar").write_bytes(blob[: 5 * 1024])  # cut on a header boundary: only the index can tell
    (d / "c.tar").write_bytes(b"\x00garbage" * 3)
    write_index(str(d), [("a.tar", 4), ("b.tar", 3), ("c.tar", 1)])
    keys, c = _keys_and_counters([str(d)], streams_per_rank=4)
    assert sorted(keys) == ["a0", "a1", "a2", "a3", "b0"]
    assert c["truncated_shard"] == 1 and c["unreadable_shard"] == 1, c


def test_every_dataset_path_is_checked_at_start_and_resolves_against_base_dir(tmp_path, monkeypatch):
    d = tmp_path / "data" / "good"
    d.mkdir(parents=True)
    write_tar(d / "a.tar", [good_sample(f"g{i}") for i in range(2)])
    write_index(str(d), [("a.tar", 2)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError) as e:
        ShardLoader([str(d), {"path": "data/tpyo", "weight": 2}], 2, resolution=32)
    msg = str(e.value)
    assert "'data/tpyo'" in msg and str(elsewhere / "data" / "tpyo") in msg and "current directory" in msg
    with pytest.raises(FileNotFoundError, match="urls.tar"):
        ShardLoader([{"urls": f"{tmp_path}/data/good/{{a,urls}}.tar"}], 2, resolution=32)
    loader = build_loader({"datasets": ["data/good"]}, batch_size=2, resolution=32, base_dir=str(tmp_path),
                          epochs=1)
    assert sorted(k for b in loader for k in b["key"]) == ["g0", "g1"]
    with pytest.raises(FileNotFoundError, match="base directory " + str(tmp_path)):
        build_loader({"datasets": ["data/gone"]}, batch_size=2, base_dir=str(tmp_path))


def test_loader_warns_on_an_incomplete_index(tmp_path, caplog):
    d = tmp_path / "part"
    d.mkdir()
    write_tar(d / "a.tar", [good_sample("g0")])
    with open(d / "index.json", "w") as f:
        json.dump({"format": 1, "shards": [{"name": "a.tar", "count": 1}], "total": 1, "complete": False}, f)
    with caplog.at_level(logging.WARNING):
        ShardLoader([str(d)], 1, resolution=32)
    assert "complete: false" in caplog.text and "--resume" in caplog.text


def test_pixel_cap_and_bombs_are_counted_skips_in_the_loader(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    write_tar(d / "a.tar", [good_sample("small", w=24, h=24), good_sample("big", w=64, h=64),
                            ("bomb", {"png": bomb_png(), "txt": b"a bomb"})])
    write_index(str(d), [("a.tar", 3)])
    keys, c = _keys_and_counters([str(d)], max_pixels=40 * 40)
    assert keys == ["small"] and c["too_large"] == 2 and c["decode_error"] == 0, c


# -------------------------------------------------------------------------------------- modes, orientation
def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_high_bit_depth_and_transparent_modes_convert_to_true_8bit_rgb():
    ramp16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512
    img16 = Image.open(io.BytesIO(_png(Image.fromarray(ramp16))))
    assert img16.mode.startswith("I;16")
    got = np.asarray(to_rgb(img16))
    assert got.shape == (8, 8, 3) and np.abs(got[..., 0].astype(int) - np.rint(ramp16 / 257)).max() <= 1
    i32 = Image.fromarray(ramp16.astype(np.int32))
    assert i32.mode == "I" and np.array_equal(np.asarray(to_rgb(i32)), got)
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert np.asarray(to_rgb(f)).max() == 128  # 0..1 floats scale to 0..255
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black -> white background
    assert np.asarray(to_rgb(la)).min() == 255
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(Image.open(io.BytesIO(_png(p))))).min() == 255
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in ink
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)


def test_16bit_png_through_builder_and_loader_is_not_washed_out(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (48, 1))
    (src / "deep.png").write_bytes(_png(Image.fromarray(ramp)))
    (src / "deep.txt").write_text("a grey ramp")
    out = str(tmp_path / "out")
    build_shards(records_for(str(src))[0], out, progress=False)
    loader = ShardLoader([out], 1, resolution=48, epochs=1, drop_last=False)
    img = next(iter(loader))["image"][0]  # [-1, 1]
    pix = (img[0] + 1) * 127.5
    assert abs(pix.mean().item() - 127.5) < 3 and pix[:, :4].mean() < 15 and pix[:, -4:].mean() > 240


@pytest.mark.parametrize("reencode", [False, True], ids=["kept", "reencoded"])
def test_exif_orientation_is_applied_exactly_once(tmp_path, reencode):
    src = tmp_path / "src"
    src.mkdir()
    # Stored 64x32, red left / blue right; orientation 6 shows it 32 wide x 64 high, red on top.
    (src / "rot.jpg").write_bytes(halves_jpeg(64, 32, orientation=6))
    (src / "rot.txt").write_text("rotated")
    out = str(tmp_path / "out")
    build_shards(records_for(str(src))[0], out, opts=BuildOptions(reencode=reencode), progress=False)
    sample = _shard_members(out)["rot"]
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == (32, 64)
    if reencode:
        stored = Image.open(io.BytesIO(sample["jpg"]))
        assert stored.size == (32, 64) and stored.getexif().get(0x0112) in (None, 1)
    table = {"0.5": [32, 64], "1.0": [48, 48], "2.0": [64, 32]}
    loader = ShardLoader([out], 1, bucket_mode="multi", bucket_table=table, epochs=1, drop_last=False)
    img = next(iter(loader))["image"][0]
    assert img.shape == (3, 64, 32)
    top, bottom = img[:, :24].mean((1, 2)), img[:, 40:].mean((1, 2))
    assert top[0] > 0.6 and top[2] < -0.6 and bottom[2] > 0.6 and bottom[0] < -0.6  # red on top, blue below


# ---------------------------------------------------------------------------------------------- builder
def test_builder_skips_bombs_and_decoder_errors_and_resume_completes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = jpeg_bytes(40, 40)
    files = {"a_ok.jpg": good, "b_bomb.png": bomb_png(), "c_half.jpg": good[: len(good) // 2],
             "d_garbage.jpg": good[: len(good) // 2] + bytes(range(256)) * 4 + b"\xff\xd9",
             "e_noise.png": os.urandom(500), "f_big.png": png_bytes(80, 80), "g_ok.png": png_bytes(30, 30)}
    for name, blob in files.items():
        (src / name).write_bytes(blob)
        (src / name).with_suffix(".txt").write_text(f"caption of {name}")

    def dying(limit):
        for i, r in enumerate(records_for(str(src))[0]):
            if i == limit:
                raise KeyboardInterrupt("killed")
            yield r

    out = str(tmp_path / "out")
    opts = BuildOptions(max_pixels=70 * 70)
    with pytest.raises(KeyboardInterrupt):
        build_shards(dying(3), out, samples_per_shard=1, opts=opts, progress=False)
    assert read_index(out)["complete"] is False
    stats = build_shards(records_for(str(src))[0], out, samples_per_shard=1, opts=opts, resume=True,
                         progress=False)
    assert stats["written"] == 2 and read_index(out)["complete"] is True
    assert stats["skipped"] == {"too_large": 2, "truncated": 1, "corrupt": 2}, stats


def test_distinct_files_with_one_sanitised_name_get_unique_keys(tmp_path, caplog):
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "y").mkdir()
    (src / "my photo.png").write_bytes(png_bytes(30, 30, (255, 0, 0)))
    (src / "my photo.txt").write_text("red")
    (src / "my_photo.png").write_bytes(png_bytes(30, 30, (0, 255, 0)))
    (src / "my_photo.txt").write_text("green")
    rows = []
    for folder, color in (("x", (0, 0, 255)), ("y", (9, 9, 9))):
        (src / folder / "same.png").write_bytes(png_bytes(30, 30, color))
        rows.append({"image": f"x/../{folder}/same.png", "caption": f"from {folder}"})
    rows.append(rows[0])  # the same file listed twice is a duplicate, not a new sample
    (src / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING):
        stats = build_shards(records_for(str(src))[0], str(tmp_path / "f"), progress=False)
    assert stats["written"] == 2 and stats["renamed_keys"] == 1  # (x/, y/ have no caption sidecars)
    keys = sorted(_shard_members(str(tmp_path / "f")))
    assert keys[:2] == ["my_photo", "my_photo_" + keys[1][-8:]] and "taken by another source" in caplog.text
    stats = build_shards(records_for(str(src / "m.jsonl"))[0], str(tmp_path / "m"), progress=False)
    assert stats["written"] == 2 and stats["skipped"] == {"duplicate_key": 1} and stats["renamed_keys"] == 1
    captions = sorted(s["txt"] for s in _shard_members(str(tmp_path / "m")).values())
    assert captions == [b"from x", b"from y"]


def test_reshard_per_sample_faults_skip_only_that_sample(tmp_path):
    png = png_bytes()
    write_tar(tmp_path / "in.tar", [
        ("s0", {"png": png, "txt": b"zero"}),
        ("s1", {"png": png, "txt": b"one", "cls": b"not-a-number"}),
        ("s2", {"png": png, "txt": b"two", "json": b"null"}),
        ("s3", {"png": png, "txt": BAD_UTF8}),
        ("s4", {"png": png, "txt": b"four", "json": b'{"scores": {"prompt": "high"}}'}),
        ("s5", {"png": png, "txt": b"five", "cls": b"3"}),
    ])
    stats = build_shards(records_for(str(tmp_path / "in.tar"))[0], str(tmp_path / "out"), progress=False)
    assert stats["skipped"] == {"bad_label": 1, "bad_json": 2, "bad_caption": 1}, stats
    samples = _shard_members(str(tmp_path / "out"))
    assert sorted(samples) == ["s0", "s5"] and json.loads(samples["s5"]["json"])["label"] == 3


def test_folder_sidecars_right_reasons(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ok", "badjson", "badtxt"):
        (src / f"{name}.png").write_bytes(png_bytes())
    (src / "ok.txt").write_text("fine")
    (src / "badjson.json").write_bytes(b'{"caption": "caf\xe9"}')
    (src / "badtxt.txt").write_bytes(BAD_UTF8)
    stats = build_shards(records_for(str(src))[0], str(tmp_path / "out"), progress=False)
    assert stats["written"] == 1 and stats["skipped"] == {"bad_json": 1, "bad_caption": 1}, stats


def test_img2dataset_similarity_is_the_main_caption_score(tmp_path):
    def meta(i, sim):
        return json.dumps({"caption": f"photo {i}", "similarity": sim, "url": f"http://x/{i}.jpg", "key": f"{i:09d}",
                           "status": "success", "error_message": None, "width": 24, "height": 24,
                           "original_width": 640, "original_height": 480, "exif": "{}", "sha256": "ab"}).encode()
    write_tar(tmp_path / "00000.tar", [(f"{i:09d}", {"jpg": jpeg_bytes(), "txt": f"photo {i}".encode(),
                                                     "json": meta(i, s)}) for i, s in enumerate([0.21, 0.27, 0.33])])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    assert records_for(str(tmp_path / "00000.tar"))[0].total == 3  # the progress bar's total
    assert main([str(tmp_path / "00000.tar"), "--out", str(tmp_path / "out"), "--min-score", "25", "--workers", "1",
                 "--quiet"]) == 0
    samples = _shard_members(str(tmp_path / "out"))
    assert sorted(samples) == ["000000001", "000000002"]
    m = json.loads(samples["000000002"]["json"])
    assert m["scores"] == {"prompt": pytest.approx(33.0)} and m["url"] == "http://x/2.jpg"
    assert "similarity" not in m and "exif" not in m and "status" not in m


def test_manifest_urls_file_scheme_local_remote_refused(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"url": (tmp_path / "a.png").as_uri(), "caption": "local"}) + "\n")
    assert main([str(path), "--out", str(tmp_path / "o1"), "--workers", "1", "--quiet"]) == 0
    assert len(_shard_members(str(tmp_path / "o1"))) == 1
    path.write_text(json.dumps({"url": (tmp_path / "a.png").as_uri(), "caption": "local"}) + "\n" +
                    json.dumps({"url": "https://example.com/b.jpg", "caption": "remote"}) + "\n")
    assert main([str(path), "--out", str(tmp_path / "o2"), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.jsonl:2" in err[0] and "'url'" in err[0] and "download" in err[0]


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--kind", "folder", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and str(tmp_path / "nope") in err[0]
    assert not os.path.exists(tmp_path / "o")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes())
    (src / "a.txt").write_text("a")
    assert main([str(src), "--out", str(tmp_path / "o"), "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main([str(src), "--out", str(tmp_path / "o"), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "another --out" in err[0]


def test_progress_bar_has_a_total(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.png").write_bytes(png_bytes())
        (src / f"{i}.txt").write_text("x")
    records = records_for(str(src))[0]
    assert records.total == 5
    build_shards(records, str(tmp_path / "out"), progress=True)
    assert "5/5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ reduced-size decoding
def _photo_jpeg(w, h, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(xx * 0.011 * (c + 1) + yy * 0.007) for c in range(3)], -1)
    a = np.clip(base + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.mark.parametrize("crop", ["center", "random"])
def test_reduced_size_decoding_keeps_bucket_and_crop(crop):
    data = _photo_jpeg(1400, 900)
    spec = BucketSpec("fixed", 256, crop)
    fast, b1 = decode_to_bucket(data, spec, random.Random(7))
    full, b2 = decode_to_bucket(data, spec, random.Random(7), reduced=False)
    assert b1 == b2 == (256, 256) and np.asarray(fast).shape == np.asarray(full).shape == (256, 256, 3)
    assert psnr(fast, full) >= 35
    other, _ = decode_to_bucket(data, spec, random.Random(8), reduced=False)
    if crop == "random":  # a different crop box would be far off: the fast path uses the same one
        assert psnr(other, full) < psnr(fast, full) - 5
    assert np.array_equal(np.asarray(fast), np.asarray(decode_to_bucket(data, spec, random.Random(7))[0]))


def test_jpeg_crop_only_path_is_pil_exact_and_flips(tmp_path):
    data = halves_jpeg(48, 56)  # bucket 48x48: no resize, a centre crop of 8 rows straight from the decoder
    pixels, bucket = decode_to_bucket(data, BucketSpec("fixed", 48), random.Random(0))
    assert bucket == (48, 48) and isinstance(pixels, np.ndarray)
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[4:52])
    d = tmp_path / "j"
    d.mkdir()
    write_tar(d / "a.tar", [(f"k{i}", {"jpg": data, "txt": b"halves"}) for i in range(12)])
    write_index(str(d), [("a.tar", 12)])
    loader = ShardLoader([str(d)], 4, resolution=48, epochs=1, hflip=True, seed=3)
    images = torch.cat([b["image"] for b in loader])
    left_red = images[:, 0, :, :20].mean((1, 2)) > 0.6
    right_red = images[:, 0, :, 28:].mean((1, 2)) > 0.6
    assert images.shape == (12, 3, 48, 48) and bool((left_red ^ right_red).all())
    assert 0 < int(right_red.sum()) < 12  # some flipped, some not


def test_grid_aligned_resize_matches_pil_bicubic():
    data = _photo_jpeg(384, 384)
    pixels, _ = decode_to_bucket(data, BucketSpec("fixed", 256), random.Random(0))
    assert isinstance(pixels, np.ndarray) and pixels.shape == (256, 256, 3)  # torch's antialiased bicubic
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), Image.BICUBIC), np.int16)
    diff = np.abs(pixels.astype(np.int16) - ref)
    assert diff.mean() < 0.1 and psnr(pixels, ref) > 50


@pytest.mark.parametrize("reduced", [False, True])
def test_fractional_crop_box_resized_in_the_cover_grid_matches_pil(reduced):
    """A random crop whose source box is fractional: the decoded image is resized whole to the cover size with
    torch's kernel and cropped at the integer offsets, which samples what PIL's resize of the box samples."""
    from data_pipeline.buckets import resize_cover_crop
    data = _photo_jpeg(1400, 900, seed=3)
    spec = BucketSpec("fixed", 256, "random")
    for seed in range(4):
        pixels, bucket = decode_to_bucket(data, spec, random.Random(seed), reduced=reduced)
        assert bucket == (256, 256) and isinstance(pixels, np.ndarray) and pixels.shape == (256, 256, 3)
        src = Image.open(io.BytesIO(data)).convert("RGB")
        ref = np.asarray(resize_cover_crop(src, (256, 256), True, random.Random(seed)))
        diff = np.abs(pixels.astype(np.int16) - ref.astype(np.int16))
        if reduced:  # DCT-domain reduction first: close, not equal
            assert psnr(pixels, ref) >= 35
        else:
            assert diff.max() <= 2 and diff.mean() < 0.2, (seed, diff.max(), diff.mean())
