"""The README's main job, `python -m t2i_train.demo`, end to end at a few steps in a scratch directory."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image


def test_demo_runs_the_whole_flow(tmp_path):
    r = subprocess.run([sys.executable, "-m", "t2i_train.demo", "--workdir", str(tmp_path), "--steps", "8",
                        "--num-images", "32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = tmp_path / "runs"
    for stage in ("demo_t2i_512", "demo_t2i_1024", "demo_imagenet"):
        export = runs / stage / "export" / "ema"
        assert (export / "model.safetensors").exists() and (export / "config.json").exists(), stage
    # stage 2 of the chain starts from stage 1's EMA export
    assert "runs/demo_t2i_512/export/ema" in (runs / "demo_t2i_1024" / "config.yaml").read_text()
    t2i = sorted((runs / "demo" / "samples_t2i").glob("0*.png"))
    c2i = sorted((runs / "demo" / "samples_c2i").glob("0*.png"))
    assert len(t2i) == 6 and len(c2i) == 6
    assert Image.open(t2i[0]).size == (48, 48) and Image.open(c2i[0]).size == (32, 32)
    assert np.asarray(Image.open(t2i[0])).std() > 0  # an actual image
    settings = json.loads((runs / "demo" / "samples_t2i" / "settings.json").read_text())
    assert settings["sampler"]["steps"] == 20 and len(settings["images"]) == 6
    summary = json.loads((runs / "demo" / "summary.json").read_text())
    assert set(summary["runs"]) == {"runs/demo_t2i_512", "runs/demo_t2i_1024", "runs/demo_imagenet"}
