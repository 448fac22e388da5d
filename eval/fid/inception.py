"""The TF-exact Inception-v3 of ADM's evaluator, through torch-fidelity's PyTorch port.

torch-fidelity's `FeatureExtractorInceptionV3` reproduces the 2015-12-05 TensorFlow graph (its weights are
converted from it, and it resizes to 299² with TF1's bilinear kernel, as the graph does). It gives pool_3
(`2048`) and the logits without bias (`logits_unbiased`, what ADM's softmax uses); the sFID features,
`mixed_6/conv` in the TF graph, are the output of `Mixed_6d.branch1x1` (torch-fidelity's weight map), which a
forward hook captures: first 7 of 192 channels, flattened in TF's (H, W, C) order → 17·17·7 = 2023 values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME
SPATIAL_CHANNELS = 7


@dataclass
class Activations:
    pool: np.ndarray     # [N, 2048] pool_3
    spatial: np.ndarray  # [N, 2023] mixed_6/conv[..., :7]
    logits: np.ndarray   # [N, 1008] pool_3 @ W (no bias), as ADM's softmax input


def _check_weights(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found: the file is {WEIGHTS_NAME}, from "
                                f"{WEIGHTS_URL} (torch-fidelity's conversion of the TF graph ADM uses)")
    try:
        # torch-fidelity loads it with weights_only=False; proving it holds only tensors first keeps that safe
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a tensor state dict of {WEIGHTS_NAME} ({e})") from None
    return path


class InceptionFeatures:
    """`features(uint8 [B, H, W, 3]) -> (pool, spatial, logits)` on `device`, from the weights file."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.device = torch.device(device)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(_check_weights(weights)))
        self.net.to(self.device)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        pool, logits = self.net(x)
        return pool.cpu().numpy(), self._spatial.cpu().numpy(), logits.cpu().numpy()


def compute_activations(batches: Iterable[np.ndarray], net: InceptionFeatures, total: int | None = None,
                        desc: str = "Inception", progress: bool = True) -> Activations:
    parts = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            parts.append(net(batch))
            bar.update(len(batch))
    if not parts:
        raise ValueError(f"{desc}: no images")
    return Activations(*(np.concatenate(p, axis=0) for p in zip(*parts)))
