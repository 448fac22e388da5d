#!/usr/bin/env bash
# Create .venv/ at the repo root and install the project (idempotent).
# torch/torchvision are installed first at the pinned versions, so nothing later can pull another torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pixeldit-install-stamp
want="$(cat setup.cfg pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
build_native() {
  # The fused pixel kernels (t2i_train/csrc, C++): built once per machine and source into ~/.cache/pixeldit
  # (about 20 s), so that the first training step does not pay for it. Not fatal: without a compiler the
  # Python chunk loops run instead (t2i_train/models/native.py).
  if ! .venv/bin/python -c "import sys; from t2i_train.models import native; sys.exit(0 if native.load() else 1)" \
      >>"${log:-.venv/install.log}" 2>&1; then
    echo "bootstrap: could not build the native pixel kernels (see .venv/install.log); the Python loops will run" >&2
  fi
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_native
  exit 0
fi
log=.venv/install.log
: > "$log"
pipi() {
  if ! .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -n 40 >&2
    echo "bootstrap: pip install $* failed (full log: $log)" >&2
    exit 1
  fi
}
echo "bootstrap: installing into .venv (log: $log)"
pipi --upgrade pip
pipi torch==2.14.1 torchvision==0.29.1
# DeepSpeed's build imports torch: build it against the torch already in the venv (no isolated build env).
DS_BUILD_OPS=0 pipi --no-build-isolation deepspeed
pipi -e ".[dev]"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.14.1"), f"unexpected torch {torch.__version__}"
PY
# DeepSpeed's CPU accelerator compiles its shared-memory communication op on first use (about a minute):
# do it here, as part of set-up, so the first `deepspeed` launch (the demo's, a test's) does not pay for it.
# Not fatal: only DeepSpeed runs on CPU need the op, and they would report the same compiler error.
if ! DS_ACCELERATOR=cpu .venv/bin/python -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" >>"$log" 2>&1; then
  echo "bootstrap: could not build DeepSpeed's CPU communication op now (see $log); its first use will try again" >&2
fi
build_native
echo "$want" > "$stamp"
