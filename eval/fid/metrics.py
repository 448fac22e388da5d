"""The ADM evaluator's metrics on Inception features (openai/guided-diffusion `evaluations/evaluator.py`).

* FID / sFID: Fréchet distance between Gaussians fitted to pool_3 (2048-d) / mixed_6/conv (first 7 channels,
  17·17·7 = 2023-d) features; `scipy.linalg.sqrtm` of Σ1·Σ2, retried with 1e-6 on the diagonals when singular.
* Inception Score: exp(E[KL(p(y|x) ‖ p(y))]) over the softmax of the unbiased logits, per split of 5,000
  samples, averaged over splits.
* Precision / recall (Kynkäänniemi et al.): each set's manifold is the union of balls around its points with
  radius the squared distance to the k-th (k = 3) nearest neighbour (the point itself excluded); precision =
  fraction of samples inside the reference manifold, recall = fraction of references inside the sample
  manifold. Squared distances are computed in float16 first and in float32 when that overflows, as ADM does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy


@dataclass
class GaussianStats:
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    sigma1, sigma2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """probs: [N, classes] softmax outputs. 0·log 0 counts as 0 (ADM would give NaN there)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size].astype(np.float64)
        kl = xlogy(part, part) - xlogy(part, np.mean(part, axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1).numpy()


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = (u * u).sum(1, keepdim=True)
    norm_v = (v * v).sum(1, keepdim=True).T
    return torch.clamp(norm_u - 2 * u @ v.T + norm_v, min=0.0)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, half: bool = True) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)] in float32: float16 arithmetic first (as ADM's evaluator),
    float32 when float16 overflows. On CPU float16 is emulated by rounding inputs and result."""
    if half:
        if u.is_cuda:
            d = _sq_distances(u.half(), v.half())
        else:
            d = _sq_distances(u.half().float(), v.half().float()).half()
        if torch.isfinite(d).all():
            return d.float()
    return _sq_distances(u.float(), v.float())


class ManifoldEstimator:
    """k-NN manifolds of feature sets, batched so that 50K × 50K distances never sit in memory at once."""

    def __init__(self, k: int = 3, row_batch: int = 10000, col_batch: int = 10000, half: bool = True,
                 device: str | torch.device = "cpu"):
        self.k, self.row_batch, self.col_batch, self.half = k, row_batch, col_batch, half
        self.device = torch.device(device)

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def radii(self, features: np.ndarray) -> np.ndarray:
        """Squared distance of each point to its k-th nearest neighbour (index k of the sorted row: 0 is itself)."""
        feats = self._t(features)
        if len(feats) <= self.k:
            raise ValueError(f"precision/recall needs more than k={self.k} points per set, got {len(feats)}")
        out = []
        for i in range(0, len(feats), self.row_batch):
            rows = feats[i:i + self.row_batch]
            d = torch.cat([pairwise_sq_distances(rows, feats[j:j + self.col_batch], self.half)
                           for j in range(0, len(feats), self.col_batch)], dim=1)
            out.append(torch.kthvalue(d, self.k + 1, dim=1).values)
        return torch.cat(out).cpu().numpy()

    def coverage(self, features: np.ndarray, radii: np.ndarray, eval_features: np.ndarray) -> float:
        """Fraction of `eval_features` inside some ball (point of `features`, its radius)."""
        feats, r, ev = self._t(features), self._t(radii), self._t(eval_features)
        inside = torch.zeros(len(ev), dtype=torch.bool, device=self.device)
        for i in range(0, len(ev), self.row_batch):
            rows = ev[i:i + self.row_batch]
            for j in range(0, len(feats), self.col_batch):
                d = pairwise_sq_distances(rows, feats[j:j + self.col_batch], self.half)
                inside[i:i + len(rows)] |= (d <= r[j:j + self.col_batch][None, :]).any(dim=1)
        return float(inside.double().mean())

    def precision_recall(self, ref: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
        ref_radii, sample_radii = self.radii(ref), self.radii(sample)
        return self.coverage(ref, ref_radii, sample), self.coverage(sample, sample_radii, ref)
