"""ImageNet FID end to end: a tiny c2i checkpoint → `python -m eval fid generate` → `score` with a random Inception."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.cli import main as eval_main
from eval.fid.batches import write_image_batch
from eval.fid.inception import WEIGHTS_NAME
from eval.fid.metrics import inception_score, softmax
from t2i_train.models import build_model
from t2i_train.models.io import save_pretrained
from test_eval_dpg_e2e import run_eval
from test_eval_fid import random_inception_weights
from test_eval_fid_metrics import brute_precision_recall


@pytest.fixture(scope="module")
def sample_batch(tmp_path_factory):
    """`python -m eval fid generate` on a tiny c2i checkpoint (10 classes): 12 samples of 16²."""
    tmp = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    ckpt = save_pretrained(build_model("pixeldit_tiny_c2i"), tmp / "ckpt")
    args = ["fid", "generate", "--ckpt", str(ckpt), "--out", str(tmp / "fid"), "--num-samples", "12",
            "--height", "16", "--steps", "2", "--no-progress"]
    run_eval(*args)
    return tmp / "fid" / "samples_12x16x16x3.npz", args


def test_generate_end_to_end(sample_batch):
    batch, gen_args = sample_batch
    out = batch.parent
    with np.load(batch) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [k % 10 for k in range(12)]  # class-balanced
    settings = json.loads((out / "generation.json").read_text())
    assert settings["benchmark"] == "imagenet_fid" and settings["images"]["samples/000011.png"] == 11
    assert settings["sampler"]["name"] == "flow_dpm_solver" and settings["sampler"]["steps"] == 2
    assert len({images[k].tobytes() for k in range(12)}) == 12

    # resumable: nothing to generate, a lost batch is re-packed from the PNGs (in-process: no second start-up)
    mtime = (out / "samples" / "000000.png").stat().st_mtime_ns
    batch.unlink()
    assert eval_main(gen_args) == 0
    assert (out / "samples" / "000000.png").stat().st_mtime_ns == mtime
    with np.load(batch) as z:
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)

    # a named preset sets the model card's sampler; explicit flags override its fields
    args = gen_args[:gen_args.index("--out")] + ["--out", str(out.parent / "preset"), "--num-samples", "1",
                                                  "--height", "16", "--steps", "1", "--preset", "512", "--no-progress"]
    assert eval_main(args) == 0
    sampler = json.loads((out.parent / "preset" / "generation.json").read_text())["sampler"]
    assert (sampler["name"], sampler["steps"], sampler["cfg_scale"], sampler["cfg_interval"], sampler["shift"]) == \
        ("flow_dpm_solver", 1, 3.5, [0.1, 1.0], 2.0)


@pytest.mark.slow  # ~2 × sqrtm and 1 × eigvals of 2048² matrices: minutes on 2 shared cores
def test_score_end_to_end(sample_batch, tmp_path):
    batch, _ = sample_batch
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8)
    ref_path = write_image_batch(tmp_path / "ref.npz", iter(ref), ref.shape)
    weights = random_inception_weights(tmp_path / WEIGHTS_NAME)
    acts = tmp_path / "acts"
    report_path = tmp_path / "report.json"
    proc = run_eval("fid", "score", str(ref_path), str(batch), "--inception-weights", str(weights),
                    "--also-torch-fidelity", "--save-activations", str(acts), "--report", str(report_path),
                    "--no-progress")
    print(proc.stdout)
    report = json.loads(report_path.read_text())
    assert "FID" in proc.stdout and "sFID" in proc.stdout and "Recall" in proc.stdout
    assert report["num_samples"] == 12 and not report["comparable_with_paper"]
    assert report["reference_stats"] == "from arr_0"

    # the numbers, recomputed independently from the saved activations
    s, r = np.load(acts / "sample_activations.npz"), np.load(acts / "ref_activations.npz")
    assert s["pool"].shape == (12, 2048) and s["spatial"].shape == (12, 2023) and s["logits"].shape == (12, 1008)
    assert np.isfinite(report["fid"]) and np.isfinite(report["sfid"]) and report["sfid"] > 0
    assert report["torch_fidelity_fid"] == pytest.approx(report["fid"], rel=1e-3)  # eigvals, not sqrtm
    assert report["inception_score"] == pytest.approx(inception_score(softmax(s["logits"])))
    bp, br = brute_precision_recall(r["pool"].astype(np.float64), s["pool"].astype(np.float64))
    assert report["precision"] == pytest.approx(bp, abs=1 / 12) and report["recall"] == pytest.approx(br, abs=1 / 10)


def test_score_errors_name_the_files(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, labels=np.arange(3))
    sample = write_image_batch(tmp_path / "s.npz", iter(np.zeros((4, 8, 8, 3), np.uint8)), (4, 8, 8, 3))
    with pytest.raises(ValueError, match="empty.npz: a reference batch needs arr_0 images or mu/sigma"):
        eval_main(["fid", "score", str(empty), str(sample), "--inception-weights", str(tmp_path / "w.pth")])
    with pytest.raises(FileNotFoundError, match="batch file .*nope.npz not found"):
        eval_main(["fid", "score", str(tmp_path / "nope.npz"), str(sample), "--inception-weights", "w.pth"])
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME}, from https://"):
        eval_main(["fid", "score", str(sample), str(sample), "--inception-weights", str(tmp_path / "w.pth")])
