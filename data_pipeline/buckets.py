"""Aspect-ratio buckets: PixArt/SANA tables, nearest-ratio assignment, resize-to-cover then crop.

Tables map the ratio ``height / width`` (as the string key the reference uses) to ``[height, width]``.
Every bucket holds about the target pixel count and both sides are multiples of the patch size (16).
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

PATCH_SIZE = 16

# Facts from the reference implementation (PixArt-sigma / SANA tables), ratio = h / w.
ASPECT_RATIO_512: Dict[str, List[int]] = {
    "0.25": [256, 1024], "0.26": [256, 992], "0.27": [256, 960], "0.28": [256, 928],
    "0.32": [288, 896], "0.33": [288, 864], "0.35": [288, 832], "0.4": [320, 800],
    "0.42": [320, 768], "0.48": [352, 736], "0.5": [352, 704], "0.52": [352, 672],
    "0.57": [384, 672], "0.6": [384, 640], "0.68": [416, 608], "0.72": [416, 576],
    "0.78": [448, 576], "0.82": [448, 544], "0.88": [480, 544], "0.94": [480, 512],
    "1.0": [512, 512], "1.07": [512, 480], "1.13": [544, 480], "1.21": [544, 448],
    "1.29": [576, 448], "1.38": [576, 416], "1.46": [608, 416], "1.67": [640, 384],
    "1.75": [672, 384], "2.0": [704, 352], "2.09": [736, 352], "2.4": [768, 320],
    "2.5": [800, 320], "2.89": [832, 288], "3.0": [864, 288], "3.11": [896, 288],
    "3.62": [928, 256], "3.75": [960, 256], "3.88": [992, 256], "4.0": [1024, 256],
}

# The 1024 table of the released PixelDiT T2I stage-3 training (seven buckets).
ASPECT_RATIO_1024: Dict[str, List[int]] = {
    "0.5625": [752, 1344], "0.66": [896, 1344], "0.75": [896, 1200], "1.0": [1024, 1024],
    "1.33": [1200, 896], "1.5": [1344, 896], "1.77": [1344, 752],
}

TABLES = {"ASPECT_RATIO_512": ASPECT_RATIO_512, "ASPECT_RATIO_1024": ASPECT_RATIO_1024}

Bucket = Tuple[int, int]  # (height, width)


def get_table(name_or_resolution) -> Dict[str, List[int]]:
    """Table by name (``ASPECT_RATIO_512``) or by base resolution (512, 1024)."""
    if isinstance(name_or_resolution, int) or str(name_or_resolution).isdigit():
        name_or_resolution = f"ASPECT_RATIO_{int(name_or_resolution)}"
    try:
        return TABLES[name_or_resolution]
    except KeyError:
        raise ValueError(f"unknown aspect-ratio table {name_or_resolution!r}; known: {sorted(TABLES)}") from None


def nearest_bucket(height: int, width: int, table: Dict[str, Sequence[int]]) -> Bucket:
    """The bucket whose ratio key is nearest to ``height / width`` (absolute difference, as the reference)."""
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    h, w = table[key]
    return int(h), int(w)


class BucketSpec:
    """Which target shapes a run uses.

    ``mode="fixed"``: every image becomes ``resolution x resolution`` (stage 1, ImageNet).
    ``mode="multi"``: nearest bucket of the ``ASPECT_RATIO_<resolution>`` table (later stages).
    ``crop``: ``center`` | ``random`` | ``adm`` (ADM/guided-diffusion centre crop, for ImageNet).
    ``table``: a table name, or a ``{ratio: [h, w]}`` dict of one's own (tiny tables for tests and demos).
    """

    def __init__(self, mode: str = "fixed", resolution: int = 512, crop: str = "center",
                 patch_size: int = PATCH_SIZE, table=None):
        if mode not in ("fixed", "multi"):
            raise ValueError(f"bucket mode must be 'fixed' or 'multi', got {mode!r}")
        if crop not in ("center", "random", "adm"):
            raise ValueError(f"crop must be center|random|adm, got {crop!r}")
        self.mode, self.resolution, self.crop, self.patch_size = mode, int(resolution), crop, patch_size
        if mode == "fixed":
            if self.resolution % patch_size:
                raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
            self.table = {"1.0": [self.resolution, self.resolution]}
        else:
            self.table = dict(table) if isinstance(table, dict) else get_table(table or self.resolution)
        for key, (h, w) in self.table.items():
            if h % patch_size or w % patch_size:
                raise ValueError(f"bucket {key!r}: {h}x{w} is not a multiple of {patch_size} on both sides "
                                 f"(bucket sides must be multiples of {patch_size}, the patch grid)")

    def assign(self, height: int, width: int) -> Bucket:
        return nearest_bucket(height, width, self.table)

    @property
    def buckets(self) -> List[Bucket]:
        return [(int(h), int(w)) for h, w in self.table.values()]

    def apply(self, img: Image.Image, bucket: Bucket, rng: Optional[random.Random] = None) -> Image.Image:
        if self.crop == "adm":
            return adm_center_crop(img, bucket)
        return resize_cover_crop(img, bucket, random_crop=self.crop == "random", rng=rng)


def cover_box(width: int, height: int, size: Bucket, random_crop: bool = False, rng=None):
    """Resize-to-cover then crop, as numbers: ``((rw, rh), box)``, the size the whole image would be resized to
    so that it covers ``size`` (h, w) keeping its aspect ratio, and the region of the source (in its pixels,
    floats) that ends up in the crop (centre, or random from ``rng``)."""
    th, tw = size
    scale = max(th / height, tw / width)
    rw, rh = max(tw, math.ceil(width * scale - 1e-6)), max(th, math.ceil(height * scale - 1e-6))
    if random_crop:
        rng = rng or random
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    else:
        left, top = (rw - tw) // 2, (rh - th) // 2
    sx, sy = width / rw, height / rh
    return (rw, rh), (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)


def resize_cover_crop(img: Image.Image, size: Bucket, random_crop: bool = False,
                      rng: Optional[random.Random] = None, resample=Image.BICUBIC) -> Image.Image:
    """Resize so the image covers ``size`` (h, w) keeping its aspect ratio, then crop to exactly ``size``.

    Done as one resampling of the source region that survives the crop (PIL's ``resize(box=...)``), so no
    pixel that is cropped away is ever resampled.
    """
    th, tw = size
    (rw, rh), box = cover_box(img.width, img.height, size, random_crop, rng)
    if (rw, rh) == img.size:
        box = tuple(round(v) for v in box)
        return img.crop(box) if box != (0, 0, tw, th) else img
    return img.resize((tw, th), resample=resample, box=box)


def adm_center_crop(img: Image.Image, size: Bucket) -> Image.Image:
    """ADM (guided-diffusion) preprocessing: box-halve while large, bicubic to the short side, centre crop."""
    th, tw = size
    target = min(th, tw)
    while min(img.size) >= 2 * target:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = target / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - tw) // 2, (h - th) // 2
    return img.crop((left, top, left + tw, top + th))
