"""ADM's evaluation of a sample batch against a reference batch: IS, FID, sFID, precision, recall.

The reference batch's precomputed `mu`/`sigma`/`mu_s`/`sigma_s` are used when present (ADM's ImageNet
reference batches carry statistics of the whole training set); what is missing is computed from its `arr_0`
images. Precision/recall need the reference images. clean-fid's and torch-fidelity's FID can be printed beside
the ADM number (`also_clean_fid`, `also_torch_fidelity`) when those packages can run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .batches import image_batch_shape, iter_images, npz_keys, read_stats
from .inception import Activations, InceptionFeatures, compute_activations
from .metrics import GaussianStats, ManifoldEstimator, frechet_distance, inception_score, softmax

PAPER_NUM_SAMPLES = 50_000


def adm_metrics(sample: Activations, ref: Activations | None, ref_stats: dict | None,
                manifold: ManifoldEstimator | None = None) -> dict:
    """The numbers ADM's evaluator prints, from activations (and/or the reference's precomputed statistics)."""
    if ref_stats is not None:
        ref_pool, ref_spatial = (GaussianStats(ref_stats["mu"], ref_stats["sigma"]),
                                 GaussianStats(ref_stats["mu_s"], ref_stats["sigma_s"]))
    elif ref is not None:
        ref_pool, ref_spatial = GaussianStats.of(ref.pool), GaussianStats.of(ref.spatial)
    else:
        raise ValueError("the reference has neither images nor precomputed statistics")
    out = {
        "inception_score": inception_score(softmax(sample.logits)),
        "fid": frechet_distance(GaussianStats.of(sample.pool), ref_pool),
        "sfid": frechet_distance(GaussianStats.of(sample.spatial), ref_spatial),
        "precision": None,
        "recall": None,
    }
    if ref is not None:
        out["precision"], out["recall"] = (manifold or ManifoldEstimator()).precision_recall(ref.pool, sample.pool)
    return out


def torch_fidelity_fid(sample: Activations, ref: Activations | None, ref_stats: dict | None) -> float:
    """torch-fidelity's Fréchet distance code on the same pool_3 features (it uses the same network)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if ref_stats is not None:
        mu, sigma = ref_stats["mu"], ref_stats["sigma"]
    else:
        mu, sigma = np.mean(ref.pool, axis=0), np.cov(ref.pool, rowvar=False)
    as64 = lambda m, s: {"mu": np.asarray(m, np.float64), "sigma": np.asarray(s, np.float64)}  # noqa: E731
    return float(fid_statistics_to_metric(as64(np.mean(sample.pool, axis=0), np.cov(sample.pool, rowvar=False)),
                                          as64(mu, sigma), verbose=False)[KEY_METRIC_FID])


def clean_fid(ref_path: Path, sample_path: Path, device: torch.device, batch_size: int) -> float:
    """clean-fid's FID (its own Inception and PIL-bicubic resizing) between the two batches' images."""
    from cleanfid.features import build_feature_extractor
    from cleanfid.fid import fid_from_feats, get_batch_features
    from cleanfid.resize import build_resizer

    model, resize = build_feature_extractor("clean", device), build_resizer("clean")

    def features(path: Path) -> np.ndarray:
        out = []
        for batch in iter_images(path, batch_size):
            x = torch.stack([torch.from_numpy(np.asarray(resize(im)).transpose(2, 0, 1).copy()) for im in batch])
            out.append(get_batch_features(x, model, device))
        return np.concatenate(out)

    if "arr_0" not in npz_keys(ref_path):
        raise ValueError(f"clean-fid needs the reference images; {ref_path} has none")
    return float(fid_from_feats(features(sample_path), features(ref_path)))


def _save_activations(acts: Activations, path: Path) -> None:
    np.savez(path, pool=acts.pool, spatial=acts.spatial, logits=acts.logits)


def evaluate(ref_path: str | Path, sample_path: str | Path, weights: str | Path, *, device: str | torch.device = "cpu",
             batch_size: int = 64, also_clean_fid: bool = False, also_torch_fidelity: bool = False,
             save_activations: str | Path | None = None, progress: bool = True) -> dict:
    ref_path, sample_path, device = Path(ref_path), Path(sample_path), torch.device(device)
    ref_keys = npz_keys(ref_path)
    ref_stats = read_stats(ref_path)
    n, h, w, _ = image_batch_shape(sample_path)
    if "arr_0" not in ref_keys and ref_stats is None:
        raise ValueError(f"{ref_path}: a reference batch needs arr_0 images or mu/sigma/mu_s/sigma_s "
                         f"statistics (keys: {ref_keys})")
    net = InceptionFeatures(weights, device)
    sample = compute_activations(iter_images(sample_path, batch_size), net, n, "Inception (samples)", progress)
    ref = None
    if "arr_0" in ref_keys:
        ref = compute_activations(iter_images(ref_path, batch_size), net, image_batch_shape(ref_path)[0],
                                  "Inception (reference)", progress)
    if save_activations:
        Path(save_activations).mkdir(parents=True, exist_ok=True)
        _save_activations(sample, Path(save_activations) / "sample_activations.npz")
        if ref is not None:
            _save_activations(ref, Path(save_activations) / "ref_activations.npz")
    report = {
        "benchmark": "ImageNet FID (ADM protocol)",
        **adm_metrics(sample, ref, ref_stats, ManifoldEstimator(device=device)),
        "num_samples": n, "resolution": [h, w],
        "comparable_with_paper": n == PAPER_NUM_SAMPLES,
        "reference_stats": "precomputed (mu, sigma, mu_s, sigma_s)" if ref_stats is not None else "from arr_0",
        "reference": str(ref_path), "samples": str(sample_path), "inception_weights": str(weights),
    }
    if also_torch_fidelity:
        report["torch_fidelity_fid"] = torch_fidelity_fid(sample, ref, ref_stats)
    if also_clean_fid:
        try:
            report["clean_fid"] = clean_fid(ref_path, sample_path, device, batch_size)
        except Exception as e:  # optional package, own weights download: say why, keep the ADM numbers
            report["clean_fid"] = f"unavailable: {type(e).__name__}: {e}"
    return report


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_report(r: dict) -> str:
    lines = [f"ImageNet FID (ADM protocol): {r['num_samples']} samples {r['resolution'][0]}x{r['resolution'][1]} "
             f"vs {r['reference']} (reference statistics {r['reference_stats']})"]
    if not r["comparable_with_paper"]:
        lines.append(f"  note: the paper uses {PAPER_NUM_SAMPLES} samples; FID on {r['num_samples']} is biased upward")
    names = [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
             ("Recall", "recall"), ("FID (torch-fidelity)", "torch_fidelity_fid"), ("FID (clean-fid)", "clean_fid")]
    for label, key in names:
        if key in r:
            value = r[key] if r[key] is not None else "n/a (reference batch has no images)"
            lines.append(f"  {label:<22}{_fmt(value)}")
    return "\n".join(lines)
