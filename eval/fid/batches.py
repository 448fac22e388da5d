"""ADM-style sample batches: an `.npz` with `arr_0` uint8 [N, H, W, 3] (and `arr_1` int labels when
class-conditional); reference batches may also hold precomputed `mu`, `sigma`, `mu_s`, `sigma_s`.

Both directions stream, so a 50K × 512² batch (39 GB) never has to fit in memory: `iter_images` reads
`arr_0` a slice at a time from inside the zip, and `write_image_batch` writes it image by image (ZIP64).
"""
from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def npz_keys(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file {path} not found")
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file") from None


@contextmanager
def _open_array(path: Path, key: str):
    with zipfile.ZipFile(path) as z:
        with z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"{path}: {key} has .npy format version {version}; expected 1.0 or 2.0")
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise ValueError(f"{path}: {key} is stored in Fortran order; expected a C-ordered array")
            yield f, shape, dtype


def image_batch_shape(path: str | Path, key: str = "arr_0") -> tuple[int, ...]:
    path = Path(path)
    if key not in npz_keys(path):
        raise ValueError(f"{path} has no {key!r} images (keys: {npz_keys(path)})")
    with _open_array(path, key) as (_, shape, dtype):
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise ValueError(f"{path}: {key} must be uint8 [N, H, W, 3], got {dtype} {list(shape)}")
        return tuple(shape)


def iter_images(path: str | Path, batch_size: int = 64, key: str = "arr_0") -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] slices of `key`, in order."""
    path = Path(path)
    n, *rest = image_batch_shape(path, key)
    per_image = int(np.prod(rest))
    with _open_array(path, key) as (f, _, _):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            data = f.read(b * per_image)
            if len(data) != b * per_image:
                raise ValueError(f"{path}: {key} is truncated (ends inside image {start + len(data) // per_image})")
            yield np.frombuffer(data, dtype=np.uint8).reshape(b, *rest)


def read_stats(path: str | Path) -> dict[str, np.ndarray] | None:
    """The precomputed (mu, sigma, mu_s, sigma_s) of a reference batch, or None when it has none."""
    keys = npz_keys(path)
    present = [k for k in STATS_KEYS if k in keys]
    if not present:
        return None
    if len(present) != len(STATS_KEYS):
        raise ValueError(f"{path}: has {present} but not all of {list(STATS_KEYS)}")
    with np.load(path) as z:
        return {k: z[k] for k in STATS_KEYS}


def write_image_batch(path: str | Path, images: Iterable[np.ndarray], shape: Sequence[int],
                      labels: np.ndarray | None = None) -> Path:
    """Stream `images` (each uint8 [H, W, 3]) into `path` as arr_0 [N, H, W, 3] (+ arr_1 labels); atomic."""
    path = Path(path)
    n = int(shape[0])
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": tuple(int(s) for s in shape)})
            count = 0
            for im in images:
                if im.shape != tuple(shape[1:]) or im.dtype != np.uint8:
                    raise ValueError(f"image {count} is {im.dtype} {list(im.shape)}, expected uint8 {list(shape[1:])}")
                f.write(np.ascontiguousarray(im).tobytes())
                count += 1
            if count != n:
                raise ValueError(f"expected {n} images, got {count}")
        if labels is not None:
            with z.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)
    return path
