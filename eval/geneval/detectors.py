"""The contract between GenEval scoring and the models that look at images.

Scoring needs two things from an image: the objects in it (class, confidence, box, mask) and the colour
of an object. Both are pluggable so that the same rules score images with the transformers backends
(Mask2Former + CLIP), the optional mmdet backend, or an exact detector for the demo's synthetic shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

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


# --- the detector registry: `--detector NAME[:ARG]` → (Detector, ColorClassifier or None) -------------------------
# A factory takes the text after the colon ("" when absent) and keyword options (`device`, `clip`: the CLIP id or
# path for backends that name colours with CLIP); returning None as the classifier means "use CLIP".
DetectorFactory = Callable[..., Tuple[Detector, Optional[ColorClassifier]]]
DETECTORS: Dict[str, DetectorFactory] = {}


def register_detector(name: str):
    def wrap(factory: DetectorFactory) -> DetectorFactory:
        DETECTORS[name] = factory
        return factory
    return wrap


def build_detector(spec: str, **options) -> Tuple[Detector, Optional[ColorClassifier]]:
    name, _, arg = spec.partition(":")
    if name not in DETECTORS:
        raise ValueError(f"unknown GenEval detector {spec!r}; choose one of {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](arg, **options)


@register_detector("mask2former")
def _mask2former(arg: str, device=None, **_):
    from eval.geneval.backends import DEFAULT_MASK2FORMER, Mask2FormerDetector

    return Mask2FormerDetector(arg or DEFAULT_MASK2FORMER, device=device), None


@register_detector("mmdet")
def _mmdet(arg: str, device=None, **_):
    from eval.geneval.backends import MMDetDetector

    config, _, checkpoint = arg.partition(",")
    if not config or not checkpoint:
        raise ValueError("--detector mmdet needs CONFIG,CHECKPOINT, e.g. mmdet:mask2former_swin-s-p4-w7-224_lsj_8x2_"
                         "50e_coco.py,mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth (GenEval's download_models.sh)")
    return MMDetDetector(config, checkpoint, device=device), None


@register_detector("shapes")
def _shapes(arg: str, **_):
    from eval.geneval import shapes  # the demo's exact detector for data_pipeline.synthetic images

    return shapes.build()
