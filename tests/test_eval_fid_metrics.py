"""ADM metrics on fixed feature arrays against independent numpy/scipy computations and known answers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from eval.fid.metrics import (GaussianStats, ManifoldEstimator, frechet_distance, inception_score,
                              pairwise_sq_distances, softmax)


def fid_by_eigenvalues(x: np.ndarray, y: np.ndarray) -> float:
    """Independent: tr((Σ1Σ2)^½) = Σ √eig(Σ1Σ2), all in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    d = x.mean(0) - y.mean(0)
    tr = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_fid_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    assert abs(frechet_distance(GaussianStats.of(x), GaussianStats.of(x))) < 1e-6


def test_fid_of_gaussians_with_known_answer():
    # diagonal covariances: FID = |μ1 − μ2|² + Σ (√a − √b)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([3.0, 0.0, 4.0])
    got = frechet_distance(GaussianStats(mu1, np.diag(a)), GaussianStats(mu2, np.diag(b)))
    assert got == pytest.approx(25.0 + 1.0 + 1.0 + 0.0, abs=1e-9)
    # sampled: shifting one set by δ adds |δ|² (same covariance)
    x = np.random.default_rng(1).normal(size=(4000, 8))
    delta = np.full(8, 0.5)
    assert frechet_distance(GaussianStats.of(x), GaussianStats.of(x + delta)) == pytest.approx(8 * 0.25, rel=1e-6)


def test_fid_matches_independent_computation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    y = (rng.normal(size=(700, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.2).astype(np.float32)
    assert frechet_distance(GaussianStats.of(x), GaussianStats.of(y)) == pytest.approx(fid_by_eigenvalues(x, y),
                                                                                      rel=1e-4)
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(GaussianStats.of(x), GaussianStats.of(y[:, :10]))


def test_inception_score_known_answers():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(100) % 10]  # confident and balanced over 10 classes → IS = 10
    assert inception_score(one_hot) == pytest.approx(10.0)
    assert inception_score(one_hot, split_size=50) == pytest.approx(10.0)
    assert inception_score(np.eye(10)[np.zeros(100, int)]) == pytest.approx(1.0)  # always the same class


def test_inception_score_matches_independent_loop():
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(230, 7)) * 3)
    assert np.allclose(probs.sum(1), 1, atol=1e-6)

    def reference(p, split):
        out = []
        for s in range(0, len(p), split):
            part = p[s:s + split].astype(np.float64)
            py = part.mean(0)
            out.append(np.exp(np.mean([sum(q[c] * np.log(q[c] / py[c]) for c in range(len(q))) for q in part])))
        return np.mean(out)

    assert inception_score(probs, split_size=100) == pytest.approx(reference(probs, 100), rel=1e-9)
    assert inception_score(probs) == pytest.approx(reference(probs, 5000), rel=1e-9)


def brute_precision_recall(ref, sample, k=3):
    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    r_ref, r_s = radii(ref), radii(sample)
    d = cdist(sample, ref, "sqeuclidean")
    precision = np.mean((d <= r_ref[None, :]).any(1))
    recall = np.mean((d.T <= r_s[None, :]).any(1))
    return precision, recall


def test_precision_recall_by_hand():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    sample = np.array([[10.0], [2.5], [-3.0], [5.9]])
    est = ManifoldEstimator(half=False)
    assert est.radii(ref).tolist() == [9.0, 4.0, 4.0, 4.0, 9.0]  # 3rd neighbour, squared
    # 10 is 36 from 4 (radius 9): out; 2.5, −3 (9 from 0, radius 9: on the boundary, in), 5.9: in
    assert est.precision_recall(ref, sample) == (0.75, 1.0)


def test_precision_recall_identical_and_disjoint_sets():
    x = np.random.default_rng(4).normal(size=(300, 64)).astype(np.float32)
    est = ManifoldEstimator(row_batch=128, col_batch=100)
    assert est.precision_recall(x, x) == (1.0, 1.0)
    assert est.precision_recall(x, x + 100.0) == (0.0, 0.0)


@pytest.mark.parametrize("half", [False, True])
def test_precision_recall_matches_brute_force(half):
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(257, 32)).astype(np.float32)
    sample = (rng.normal(size=(203, 32)) + 0.4).astype(np.float32)
    est = ManifoldEstimator(row_batch=64, col_batch=50, half=half)  # batches that do not divide the sizes
    p, r = est.precision_recall(ref, sample)
    bp, br = brute_precision_recall(ref, sample)
    assert 0.05 < bp < 0.95 and 0.05 < br < 0.95  # a case where the answer is not trivial
    tol = 0 if not half else 2 / 200  # float16 distances may move a point sitting on a ball's edge
    assert abs(p - bp) <= tol and abs(r - br) <= tol


def test_half_distances_fall_back_to_float32_on_overflow():
    import torch

    u = torch.tensor([[0.0, 0.0], [300.0, 0.0]])
    v = torch.tensor([[1.0, 0.0]])
    assert pairwise_sq_distances(u, v).tolist() == [[1.0], [299.0 ** 2]]  # 89401 > float16 max
