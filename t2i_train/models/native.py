"""Native CPU kernels of the fused pixel sub-blocks (t2i_train/csrc/pixel_fused.cpp), built on first use.

The source is compiled once per machine, torch version and source text with torch.utils.cpp_extension
(g++ and ninja; about 20 s) into ``$PIXDIT_EXT_DIR`` (default ``~/.cache/pixeldit/ext``), under a
directory named by a hash of all three, the CPU's instruction-set flags included (it is built with
``-march=native``), so a cache shared by different machines never loads a library built for another CPU.
`scripts/bootstrap.sh` builds it during set-up. When it cannot be built (no compiler) the fused path runs its
Python chunk loops instead, with a warning once; ``PIXDIT_NATIVE=0`` forces that path.

The ops land in ``torch.ops.pixdit_fused``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "pixel_fused.cpp"
# -ffp-contract=fast: a·b + c as one FMA in the tiles (ISO -std=c++17, which torch passes, turns it off)
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    key = "\n".join([torch.__version__, SOURCE.read_text(), _cpu_flags(), *CFLAGS])
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("PIXDIT_EXT_DIR") or Path.home() / ".cache" / "pixeldit" / "ext")
    return root / f"pixel_fused-{key}"


def enabled() -> bool:
    return os.environ.get("PIXDIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the native ops; True when torch.ops.pixdit_fused is usable. Never raises:
    a failed build warns once and returns False (the Python path runs)."""
    if not enabled():
        return False
    if "ok" in _STATE:
        return _STATE["ok"]
    with _LOCK:
        if "ok" in _STATE:
            return _STATE["ok"]
        try:
            _quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
            level = _quiet.level
            _quiet.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load as _load
            finally:
                _quiet.setLevel(level)

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            _load(name="pixdit_fused_cpu", sources=[str(SOURCE)], build_directory=str(d),
                  extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                  is_python_module=False,
                  verbose=verbose)
            ok = hasattr(torch.ops.pixdit_fused, "mlp_residual_fwd")
        except Exception as exc:  # no compiler, no ninja, a read-only cache: the Python chunk loops run
            warnings.warn(f"native pixel kernels unavailable ({type(exc).__name__}: {str(exc)[:300]}); "
                          "using the Python chunk loops", RuntimeWarning, stacklevel=2)
            ok = False
        _STATE["ok"] = ok
        return ok


def available() -> bool:
    """Whether the native ops are loaded now (does not build)."""
    return _STATE.get("ok", False) and enabled()


if __name__ == "__main__":  # python -m t2i_train.models.native: build now (set-up)
    import sys

    ok = load(verbose="-v" in sys.argv)
    print(f"native pixel kernels: {'built' if ok else 'NOT built'} ({build_dir()})")
    sys.exit(0 if ok else 1)
