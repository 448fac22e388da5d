"""The contract between GenEval scoring and the models that look at images.

Scoring needs two things from an image: the objects in it (class, confidence, box, mask) and the colour
of an object. Both are pluggable so that the same rules score images with the transformers backends
(Mask2Former + CLIP), the optional mmdet backend, or an exact detector for the demo's synthetic shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
from PIL import Image


@dataclass
class Detection:
    """One detected object.

    label: class name in the vocabulary of the prompts (COCO names for GenEval, shape names for the demo).
    score: confidence in [0, 1]; the scorer applies GenEval's thresholds, a detector returns everything.
    box: (x1, y1, x2, y2) in pixels of the scored image.
    mask: boolean [H, W] instance mask, or None when the backend has no masks.
    """

    label: str
    score: float
    box: Tuple[float, float, float, float]
    mask: Optional[np.ndarray] = None


@runtime_checkable
class Detector(Protocol):
    """Finds objects: ``detect(image) -> detections of every class, sorted by score (highest first)``."""

    classes: Sequence[str]

    def detect(self, image: Image.Image) -> List[Detection]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Names the colour of each detection: ``classify(image, detections, colors) -> one colour per detection``."""

    def classify(self, image: Image.Image, detections: Sequence[Detection], colors: Sequence[str]) -> List[str]: ...
