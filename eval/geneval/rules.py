"""GenEval's scoring rules, as the official evaluator (djghosh13/geneval `evaluation/evaluate_images.py`) applies them.

* Per class, detections scoring above the threshold (0.3; 0.9 for `counting` prompts) are kept, highest first, at
  most 16; an optional overlap filter (`max_overlap` < 1, off by default as in the official run) drops a box whose
  IoU with a kept one of its class reaches it.
* Includes are ANDed: class `c` needs `count` objects; colour and position are judged on the top-`count` of them.
  Colour: at least `count` of them classified as the colour. Position: every one of them must stand in the relation
  to every object of the include it refers to (which must itself have matched).
* Excludes: `count` or more kept objects of the class fail the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from eval.geneval.detectors import ColorClassifier, Detection
from eval.geneval.metadata import COLORS


@dataclass(frozen=True)
class Rules:
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # 1 = no overlap filter (the official default)
    position_margin: float = 0.1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with the official inclusive-pixel areas ((x2 − x1 + 1)·(y2 − y1 + 1))."""
    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select_objects(detections: Sequence[Detection], tag: str, rules: Rules = Rules()) -> Dict[str, List[Detection]]:
    """Class name → the detections that count, highest score first."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: Dict[str, List[Detection]] = {}
    for d in detections:
        by_class.setdefault(d.label, []).append(d)
    kept: Dict[str, List[Detection]] = {}
    for label, dets in by_class.items():
        order = [d for d in sorted(dets, key=lambda d: -d.score) if d.score > threshold][:rules.max_objects]
        out = []
        while order:
            best = order.pop(0)
            out.append(best)
            if rules.max_overlap < 1:
                order = [d for d in order if box_iou(best.box, d.box) < rules.max_overlap]
        if out:
            kept[label] = out
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set:
    """Relations of A to B: centre offset shrunk by `margin`·(sum of sizes) per axis, then its direction (> 0.5)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(image, objects: Dict[str, List[Detection]], metadata: dict,
             colors: Optional[ColorClassifier] = None, rules: Rules = Rules()) -> tuple[bool, str]:
    """(correct, reason) for one image whose kept objects are `objects` (see `select_objects`)."""
    correct, reasons = True, []
    matched_groups: List[Optional[List[Detection]]] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if req.get("color"):
                if colors is None:
                    raise ValueError(f"prompt {metadata.get('prompt')!r} needs colours but no colour classifier is set")
                named = colors.classify(image, found, COLORS)
                hits = named.count(req["color"])
                if hits < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {hits} {req['color']}; and "
                                   + ", ".join(f"{named.count(c)} {c}" for c in COLORS if c in named))
            if req.get("position") and matched:
                relation, target = req["position"]
                targets = matched_groups[target] if target < len(matched_groups) else None
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        bad = next((rels for t in targets
                                    if relation not in (rels := relative_position(obj.box, t.box,
                                                                                  rules.position_margin))), None)
                        if bad is not None:
                            matched = False
                            found_rels = " and ".join(sorted(bad))
                            reasons.append(f"expected {name} {relation} target, found {found_rels} target")
                            break
        correct &= matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)
