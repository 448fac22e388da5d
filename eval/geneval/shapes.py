"""Exact detector for the demo's synthetic shapes (`--detector shapes`): no model, only geometry and colour.

The synthetic images (`data_pipeline.synthetic`) are flat-coloured circles, squares, triangles and diamonds on a
muted flat background. Detection:
1. background = median colour of the image border;
2. candidate pixels differ from it by more than `tol` (RGB distance); 8-connected components of at least
   `min_area` pixels are the objects (a component holding two clearly different colours is split by colour);
3. each object's colour is the median of its core pixels; its mask is refined to the pixels closer to that
   colour than to the background (the mid-point contour, which a blur does not move);
4. the shape is the template (drawn by the generator's own `draw_shape` into the object's box) with the best
   IoU; the score is that IoU (times a penalty for a box far from square): a clean shape scores 1, and so does
   a slightly blurred one thanks to the mid-point mask, while a blob that matches no template scores lower.
Colour names: the nearest palette colour (`data_pipeline.synthetic.COLORS`) of the median pixel of the mask.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data_pipeline.synthetic import COLORS, SHAPES, draw_shape
from eval.geneval.detectors import Detection

_EIGHT = np.ones((3, 3), dtype=bool)


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border (objects rarely cover much of it)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(border, axis=0)


def shape_template(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean [h, w] mask of `shape` filling a w×h box, drawn exactly as the generator draws it."""
    img = Image.new("L", (w, h), 0)
    draw_shape(ImageDraw.Draw(img), shape, (0, 0, w, h), 255)
    return np.asarray(img) > 127


def match_shape(mask: np.ndarray) -> Tuple[str, float, Dict[str, float]]:
    """Best template for a cropped object mask: (shape, score, IoU per shape)."""
    h, w = mask.shape
    ious = {}
    for shape in SHAPES:
        t = shape_template(shape, w, h)
        ious[shape] = float((mask & t).sum() / max((mask | t).sum(), 1))
    best = max(SHAPES, key=lambda s: ious[s])
    # every shape is drawn in a square box: a box much longer than wide is a smeared shape
    squareness = min(1.0, min(h, w) / max(h, w) / 0.8)
    return best, ious[best] * squareness, ious


def nearest_colour(rgb: np.ndarray, colors: Sequence[str]) -> str:
    names = [c for c in colors if c in COLORS]
    if not names:
        raise ValueError(f"shapes colour classifier: none of {list(colors)} is a palette colour {sorted(COLORS)}")
    palette = np.array([COLORS[c] for c in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(1)))]


class ShapesDetector:
    """`detect(image)` → one `Detection` per flat-coloured object, best score first."""

    classes = SHAPES

    def __init__(self, tol: float = 40.0, min_side_frac: float = 1 / 16, min_area: int = 6,
                 split_frac: float = 0.25):
        self.tol, self.min_side_frac, self.min_area, self.split_frac = tol, min_side_frac, min_area, split_frac

    def _min_area(self, h: int, w: int) -> int:
        """Smaller specks are noise (the generator's smallest shape is a sixth of the short side across)."""
        return max(self.min_area, int(round((self.min_side_frac * min(h, w)) ** 2)))

    def _objects(self, rgb: np.ndarray, bg: np.ndarray) -> List[np.ndarray]:
        """Boolean full-image masks, one per object."""
        h, w, _ = rgb.shape
        dist = np.sqrt(((rgb - bg) ** 2).sum(-1))
        labels, n = ndimage.label(dist > self.tol, _EIGHT)
        min_area = self._min_area(h, w)
        out = []
        for i in range(1, n + 1):
            comp = labels == i
            if comp.sum() < min_area:
                continue
            out.extend(self._split_by_colour(rgb, comp, min_area))
        return out

    def _split_by_colour(self, rgb: np.ndarray, comp: np.ndarray, min_area: int) -> List[np.ndarray]:
        """Two touching objects of clearly different colours make one component: split it by palette colour.

        Only the component's interior votes (a blurred rim blends object and background into other colours)."""
        core = ndimage.binary_erosion(comp, _EIGHT)
        if core.sum() < 2 * min_area:
            return [comp]
        names = list(COLORS)
        palette = np.array([COLORS[c] for c in names], dtype=np.float64)
        idx = np.argmin(((rgb[core][:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(idx, minlength=len(names))
        big = [k for k in np.argsort(-counts) if counts[k] >= max(min_area, self.split_frac * core.sum())]
        if len(big) < 2:
            return [comp]
        label_img = np.full(comp.shape, -1)
        label_img[core] = idx
        parts = []
        for k in big:
            lab, n = ndimage.label(label_img == k, _EIGHT)
            parts += [ndimage.binary_dilation(lab == j, _EIGHT) & comp for j in range(1, n + 1)
                      if (lab == j).sum() >= min_area // 2]
        return parts or [comp]

    def _refine(self, rgb: np.ndarray, bg: np.ndarray, comp: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The object's colour (median of its core) and its mid-point mask, grown by one pixel at most."""
        core = ndimage.binary_erosion(comp, _EIGHT)
        colour = np.median(rgb[core if core.sum() >= 4 else comp], axis=0)
        axis = colour - bg
        denom = float((axis ** 2).sum())
        if denom < 1e-6:
            return colour, comp
        proj = ((rgb - bg) @ axis) / denom
        near = ndimage.binary_dilation(comp, _EIGHT)
        return colour, near & (proj > 0.5)

    def detect(self, image: Image.Image) -> List[Detection]:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        bg = background_colour(rgb)
        dets = []
        for comp in self._objects(rgb, bg):
            _, mask = self._refine(rgb, bg, comp)
            if mask.sum() < self._min_area(*mask.shape):
                continue
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            shape, score, _ = match_shape(mask[y0:y1, x0:x1])
            dets.append(Detection(shape, score, (float(x0), float(y0), float(x1), float(y1)), mask))
        return _drop_duplicates(sorted(dets, key=lambda d: -d.mask.sum()))


def _drop_duplicates(dets: List[Detection], max_overlap: float = 0.5) -> List[Detection]:
    """Keep the larger of two detections whose masks overlap by more than `max_overlap` of the smaller."""
    kept: List[Detection] = []
    for det in dets:
        if all((det.mask & k.mask).sum() <= max_overlap * det.mask.sum() for k in kept):
            kept.append(det)
    return sorted(kept, key=lambda d: -d.score)


class ShapesColorClassifier:
    """`classify(image, detections, colors)`: the palette colour nearest to each mask's median pixel."""

    def classify(self, image: Image.Image, detections: Sequence[Detection], colors: Sequence[str]) -> List[str]:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        out = []
        for det in detections:
            if det.mask is not None and det.mask.any():
                pix = rgb[det.mask]
            else:
                x0, y0, x1, y1 = (int(round(v)) for v in det.box)
                pix = rgb[y0:y1, x0:x1].reshape(-1, 3)
            out.append(nearest_colour(np.median(pix, axis=0), colors))
        return out


def build(**kwargs) -> Tuple[ShapesDetector, ShapesColorClassifier]:
    """The detector registry's entry point for `--detector shapes`."""
    return ShapesDetector(**kwargs), ShapesColorClassifier()
