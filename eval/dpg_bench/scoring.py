"""DPG-Bench scoring rules, independent of files and models.

Per crop: each question scores 1 if the VQA answer is "yes"; then, in CSV order, a question with a parent
scored 0 is set to 0 (the dependency rule; zeros propagate down chains in that order, as the official loop
does in place). Crop score = mean over the item's questions; image score = mean over its 4 crops; the
benchmark score = mean over images × 100.

Category scores (detailed `entity - whole`, broad `entity`), ×100:
* default: mean of the dependency-applied question scores of every crop of every image;
* official-compat: what the official script reports — the raw (before the dependency rule) answers of the
  last crop only (bottom-right), because it keeps the copy made inside its crop loop.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .questions import Question


def split_tile(image: Image.Image) -> list[Image.Image]:
    """The 4 images of a 2×2 tile in the official order: top-left, top-right, bottom-left, bottom-right."""
    w, h = image.width // 2, image.height // 2
    return [image.crop(box) for box in ((0, 0, w, h), (w, 0, 2 * w, h), (0, h, w, 2 * h), (w, h, 2 * w, 2 * h))]


def normalize_answer(answer: str) -> str:
    """VQA output → "yes" / "no" when it says so (`Yes.`, `yes, it is`), else the lower-cased text."""
    words = answer.strip().lower().replace(",", " ").replace(".", " ").replace("!", " ").split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    return " ".join(words)


def apply_dependencies(raw: dict[int, float], questions: list[Question]) -> dict[int, float]:
    """Zero each question whose parent scored 0. KeyError when a parent is not among the questions."""
    scores = dict(raw)
    for q in questions:
        if any(scores[p] == 0 for p in q.parents if p != 0):
            scores[q.qid] = 0.0
    return scores


@dataclass
class ImageScore:
    item_id: str
    raw: list[dict[int, float]]    # per crop: 1.0 for "yes", before the dependency rule
    final: list[dict[int, float]]  # per crop: after the dependency rule

    @property
    def crop_scores(self) -> list[float]:
        return [sum(s.values()) / len(s) for s in self.final]

    @property
    def score(self) -> float:
        return float(np.mean(self.crop_scores))


def score_image(item_id: str, answers: list[dict[int, str]], questions: list[Question]) -> ImageScore:
    """answers: per crop, {qid: normalised answer}."""
    raw = [{q.qid: float(crop[q.qid] == "yes") for q in questions} for crop in answers]
    return ImageScore(item_id, raw, [apply_dependencies(r, questions) for r in raw])


def category_scores(images: list[ImageScore], questions: dict[str, list[Question]], *,
                    official_compat: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(broad, detailed) category → score ×100."""
    detailed: dict[str, list[float]] = defaultdict(list)
    for im in images:
        by_qid = {q.qid: q for q in questions[im.item_id]}
        crops = [im.raw[-1]] if official_compat else im.final
        for crop in crops:
            for qid, s in crop.items():
                detailed[by_qid[qid].category].append(s)
    broad: dict[str, list[float]] = defaultdict(list)
    for cat, values in detailed.items():
        broad[cat.split("-")[0].strip()].extend(values)
    mean = lambda d: {k: float(np.mean(v)) * 100 for k, v in sorted(d.items())}  # noqa: E731
    return mean(broad), mean(detailed)


def benchmark_score(images: list[ImageScore]) -> float:
    return float(np.mean([im.score for im in images])) * 100 if images else float("nan")
