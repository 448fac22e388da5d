"""Image decoding shared by the shard builder and the loader.

* a decoded-pixel cap checked on the header, before any pixel is decoded (:class:`ImageTooLarge`);
* EXIF orientation read from the header (:func:`exif_orientation`) and applied once (:func:`exif_transpose`);
* any PIL mode to 8-bit RGB (:func:`to_rgb`): 16/32-bit integer and float samples are rescaled, not clipped,
  and transparency is composited over white;
* decoder failures sorted into ``truncated`` (a valid start that ends early) and ``corrupt``
  (:func:`decode_failure_reason`);
* JPEGs decoded by libjpeg-turbo through simplejpeg (the same pixels as PIL, faster), at reduced size in the
  DCT domain (scaling by n/8) when the source is at least twice what the bucket needs on both sides
  (:func:`decode_to_bucket`).
"""
from __future__ import annotations

import io
import random
from typing import Optional, Tuple, Union

import numpy as np
import simplejpeg
from PIL import Image

from data_pipeline.buckets import Bucket, BucketSpec, cover_box

# Well above 4096^2 (16.8 MP) and below PIL's decompression-bomb limit (89.5 MP).
DEFAULT_MAX_PIXELS = 8192 * 8192
ORIENTATION_TAG = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SWAPS_SIDES = (5, 6, 7, 8)


class ImageTooLarge(ValueError):
    """The header announces more pixels than the configured cap (or PIL's bomb limit)."""


def open_image(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` lazily (header only) and enforce the pixel cap before anything is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    if max_pixels and img.width * img.height > max_pixels:
        raise ImageTooLarge(f"{img.width}x{img.height} = {img.width * img.height} pixels > max_pixels={max_pixels}")
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not cost the image
        return 1
    return value if value in _TRANSPOSE else 1


def oriented_size(width: int, height: int, orientation: int) -> Tuple[int, int]:
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def exif_transpose(img: Image.Image, orientation: int) -> Image.Image:
    """Apply ``orientation`` to the pixels. The result carries no orientation (PIL's transpose drops EXIF)."""
    return img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB. High-bit-depth samples are rescaled to 0..255 (PIL's own conversion clips them,
    turning a 16-bit PNG white); transparent pixels are composited over white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":  # 16-bit PNG / TIFF samples, 0..65535
        a = np.asarray(img).astype(np.float32)
        return Image.fromarray(_to_uint8(a / 257.0)).convert("RGB")
    if mode == "F":  # float samples: 0..1 when they fit, else 0..255
        a = np.asarray(img).astype(np.float32)
        finite_max = float(np.nanmax(a)) if a.size else 0.0
        return Image.fromarray(_to_uint8(a * 255.0 if finite_max <= 1.0 else a)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (PIL undoes Adobe's inversion), YCbCr, ...


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8)


def decode_failure_reason(data: bytes, error: BaseException) -> str:
    """``truncated`` when the decoder ran out of data and the file lacks its end marker, else ``corrupt``."""
    if isinstance(error, ImageTooLarge):
        return "too_large"
    if "truncated" in str(error).lower() and not _has_end_marker(data):
        return "truncated"
    return "corrupt"


def _has_end_marker(data: bytes) -> bool:
    tail = data[-16:]
    if data[:2] == b"\xff\xd8":  # JPEG: EOI
        return b"\xff\xd9" in tail
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" in tail
    return True  # other formats: no cheap test, trust the decoder's words less


def decode_to_bucket(data: bytes, spec: BucketSpec, rng: random.Random,
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, reduced: bool = True
                     ) -> Tuple[Union[Image.Image, np.ndarray], Bucket]:
    """Bytes -> RGB pixels of the bucket's exact size, and the bucket (``reduced=False``: always full decoding).

    The pixels are a PIL image, or an HWC uint8 array when a decoded JPEG needed only cropping (a view: no copy
    until the batch is filled) or resizing (torch's resize, see :func:`_resize_array`): of the crop when its box
    lies on the decoded pixel grid, else of the whole decoded image to the resize-to-cover size, then cropped at
    the crop's integer offsets there, which samples exactly what PIL's resize of the fractional box samples.
    The bucket and the crop come from the oriented full-size header dimensions, so reduced-size decoding
    changes neither: the crop box (in source coordinates) is scaled by the decoder's n/8. Reduced-size decoding
    is used only when the source has at least twice the pixels the resize needs on both sides (smaller
    reductions cost more quality than they save time).
    """
    img = open_image(data, max_pixels)
    orientation = exif_orientation(img)
    width, height = oriented_size(img.width, img.height, orientation)
    bucket = spec.assign(height, width)
    if spec.crop == "adm":
        img.load()
        return spec.apply(to_rgb(exif_transpose(img, orientation)), bucket, rng), bucket
    (rw, rh), box = cover_box(width, height, bucket, spec.crop == "random", rng)
    needed = oriented_size(rw, rh, orientation)
    if not reduced or img.width < 2 * needed[0] or img.height < 2 * needed[1]:
        needed = img.size
    th, tw = bucket
    pixels, scale = _decode_jpeg(data, img, needed)
    grid = round(box[0] * rw / width), round(box[1] * rh / height)  # the crop's offsets in the (rw, rh) grid
    box = tuple(v * scale for v in box)  # in decoded pixels
    whole = _whole_pixels(box)
    if pixels is not None and orientation == 1 and whole:  # stay in the decoder's array
        left, top, right, bottom = whole
        crop = pixels[top:bottom, left:right]
        return (crop if (right - left, bottom - top) == (tw, th) else _resize_array(crop, bucket)), bucket
    if pixels is not None and orientation == 1 and rw * rh <= _MAX_GRID_RESIZE * tw * th:
        # The crop is whole in the resize-to-cover grid (cover_box's offsets are integers there), and PIL's
        # resize of the box samples exactly the pixels of the whole image resized to (rw, rh) at those offsets:
        # resize the decoded image whole with torch's kernel, then crop (no PIL resample of a fractional box).
        left, top = grid
        return _resize_array(pixels, (rh, rw))[top:top + th, left:left + tw], bucket
    img = img if pixels is None else Image.fromarray(pixels)
    img.load()
    img = to_rgb(exif_transpose(img, orientation))
    if whole and (whole[2] - whole[0], whole[3] - whole[1]) == (tw, th):
        return (img.crop(whole) if whole != (0, 0, tw, th) else img), bucket
    return img.resize((tw, th), resample=Image.BICUBIC, box=box), bucket


# The whole-image resize costs up to this many times the crop's pixels; beyond (long panoramas in a square
# bucket) PIL resamples only the box.
_MAX_GRID_RESIZE = 2


def _whole_pixels(box) -> Optional[Tuple[int, int, int, int]]:
    """``box`` as ints when it lies on the pixel grid, else None."""
    ints = tuple(round(v) for v in box)
    return ints if all(abs(v - i) < 1e-6 for v, i in zip(box, ints)) else None


def _resize_array(pixels: np.ndarray, bucket: Bucket) -> np.ndarray:
    """HWC uint8 -> ``bucket`` (h, w) with torch's antialiased bicubic, PIL's filter (a = -0.5, support scaled
    with the reduction) in vectorised uint8 kernels: about 4x faster than PIL's resize, within rounding of it."""
    import torch  # here, not at the top: the shard builder's worker processes need no torch
    # A channels-last NCHW view of contiguous HWC rows: the layout torch's fast uint8 kernels take.
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    out = torch.nn.functional.interpolate(x, size=tuple(bucket), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _decode_jpeg(data: bytes, img: Image.Image, needed: Tuple[int, int]):
    """libjpeg-turbo through simplejpeg (the same pixels as PIL at full size, and faster), at the smallest
    n/8 scale whose output still has at least ``needed`` (w, h) pixels in stored orientation.

    ``(HWC uint8 array, n/8)``, or ``(None, 1)`` for what PIL should decode (not a plain RGB JPEG, or libjpeg
    complained: PIL then decides between a tolerable glitch and a corrupt file)."""
    if img.format != "JPEG" or img.mode != "RGB":
        return None, 1
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=needed[0], min_height=needed[1])
    except ValueError:
        return None, 1
    return pixels, round(8 * pixels.shape[1] / img.width) / 8
