"""ImageNet FID harness parts: ADM batches, the Inception features, the report from activations, presets."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from eval.fid.batches import image_batch_shape, iter_images, read_stats, write_image_batch
from eval.fid.evaluate import adm_metrics, torch_fidelity_fid
from eval.fid.generate import balanced_labels
from eval.fid.inception import WEIGHTS_NAME, Activations, InceptionFeatures
from eval.fid.metrics import GaussianStats, ManifoldEstimator, frechet_distance, inception_score, softmax
from eval.fid.presets import PRESETS, sampler_overrides


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception randomly initialised (conv weights scaled so features stay O(0.1)), saved as a
    state dict: the network is built with its weight loading stubbed, so nothing is ever downloaded."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    torch.manual_seed(seed)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
                       side_effect=AssertionError("no download in tests")):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    sd = net.state_dict()
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            v.mul_(2.45)  # √6: keeps the activation scale through conv + BN(identity) + ReLU at this init
    torch.save(sd, path)
    return path


def test_batches_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(7, 4, 6, 3), dtype=np.uint8)
    write_image_batch(tmp_path / "s.npz", iter(a), a.shape, labels=np.arange(7) % 3)
    with np.load(tmp_path / "s.npz") as z:  # what ADM's evaluator (np.load) sees
        assert sorted(z.files) == ["arr_0", "arr_1"] and np.array_equal(z["arr_0"], a)
        assert z["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert image_batch_shape(tmp_path / "s.npz") == (7, 4, 6, 3)
    assert np.array_equal(np.concatenate(list(iter_images(tmp_path / "s.npz", 3))), a)
    np.savez_compressed(tmp_path / "c.npz", a)  # ADM's own (np.savez) batches read the same
    assert np.array_equal(np.concatenate(list(iter_images(tmp_path / "c.npz", 4))), a)
    assert read_stats(tmp_path / "s.npz") is None
    with pytest.raises(ValueError, match="expected 8 images, got 7"):
        write_image_batch(tmp_path / "bad.npz", iter(a), (8, 4, 6, 3))
    assert not (tmp_path / "bad.npz").exists()
    np.savez(tmp_path / "f.npz", arr_0=a.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        image_batch_shape(tmp_path / "f.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="not all of"):
        read_stats(tmp_path / "half.npz")


def test_balanced_labels_and_presets():
    labels = balanced_labels(50_000, 1000)
    assert np.bincount(labels).tolist() == [50] * 1000
    assert np.bincount(balanced_labels(25, 10)).tolist() == [3] * 5 + [2] * 5
    assert sampler_overrides("256-ep320") == dict(name="flow_dpm_solver", steps=100, cfg_scale=2.75,
                                                  cfg_interval=(0.1, 0.9), shift=1.0)
    assert sampler_overrides("512")["shift"] == 2.0 and PRESETS["512"]["resolution"] == 512
    assert sampler_overrides("256-ep80")["cfg_scale"] == 3.25 and sampler_overrides("256-ep80")["cfg_interval"] == (0.1, 1.0)
    with pytest.raises(ValueError, match="unknown FID preset"):
        sampler_overrides("1024")


def fixed_activations(seed: int, n: int, shift: float = 0.0) -> Activations:
    rng = np.random.default_rng(seed)
    return Activations(pool=(rng.normal(size=(n, 16)) + shift).astype(np.float32),
                       spatial=(rng.normal(size=(n, 12)) * (1 + shift)).astype(np.float32),
                       logits=(rng.normal(size=(n, 10)) * 2).astype(np.float32))


def test_report_from_activations_and_from_precomputed_statistics():
    sample, ref = fixed_activations(0, 300, shift=0.3), fixed_activations(1, 400)
    full = adm_metrics(sample, ref, None, ManifoldEstimator(half=False))
    assert full["fid"] == pytest.approx(frechet_distance(GaussianStats.of(sample.pool), GaussianStats.of(ref.pool)))
    assert full["sfid"] == pytest.approx(
        frechet_distance(GaussianStats.of(sample.spatial), GaussianStats.of(ref.spatial)))
    assert full["inception_score"] == pytest.approx(inception_score(softmax(sample.logits)))
    assert 0 < full["precision"] < 1 and 0 < full["recall"] < 1
    # a reference batch with ADM's precomputed statistics: those are used; no images → no precision/recall
    stats = dict(mu=ref.pool.mean(0), sigma=np.cov(ref.pool, rowvar=False),
                 mu_s=ref.spatial.mean(0) + 1.0, sigma_s=np.cov(ref.spatial, rowvar=False))
    only_stats = adm_metrics(sample, None, stats)
    assert only_stats["fid"] == pytest.approx(full["fid"])
    assert only_stats["sfid"] > full["sfid"] + 11.0  # |Δμ_s|² grew by about 12 · 1²
    assert only_stats["precision"] is None and only_stats["recall"] is None
    # torch-fidelity's code on the same features agrees with the ADM number
    assert torch_fidelity_fid(sample, ref, None) == pytest.approx(full["fid"], rel=1e-5)
    assert torch_fidelity_fid(sample, None, stats) == pytest.approx(full["fid"], rel=1e-5)


def test_inception_features_shapes_and_spatial_layer(tmp_path):
    import torch.nn.functional as F
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    weights = random_inception_weights(tmp_path / WEIGHTS_NAME)
    net = InceptionFeatures(weights)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    pool, spatial, logits = net(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    assert np.isfinite(pool).all() and pool.std() > 1e-3
    # independently: TF-style resize and scaling, the stem, Mixed_5b..6c, then mixed_6/conv = Mixed_6d.branch1x1
    m = net.net
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
    for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]:
        x = getattr(m, name)(x)
    mixed_6_conv = m.Mixed_6d.branch1x1(x)  # [2, 192, 17, 17]
    expected = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1).detach().numpy()  # TF's NHWC order
    np.testing.assert_allclose(spatial, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logits, pool @ m.fc.weight.detach().numpy().T, rtol=1e-4, atol=1e-5)
    assert F.softmax(torch.from_numpy(logits), 1).sum(1).allclose(torch.ones(2))


def test_missing_or_unsafe_inception_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME}, from https://github.com/toshas/torch-fidelity"):
        InceptionFeatures(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a tensor state dict"):
        InceptionFeatures(tmp_path / "junk.pth")
