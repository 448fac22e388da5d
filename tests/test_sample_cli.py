import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_train.models import build_model
from t2i_train.models.io import save_pretrained
from t2i_train.sample import default_shift, main as sample_main, resolve_size
from test_text_encoder import make_tiny_gemma


@pytest.fixture(scope="module")
def c2i_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_pretrained(build_model("pixeldit_tiny_c2i"), tmp_path_factory.mktemp("c2i")))


def _png(path):
    return np.asarray(Image.open(path))


def test_size_and_shift_rules():
    assert resolve_size(512, None, None, None, 16) == (512, 512)
    assert resolve_size(512, "16:9", None, None, 16) == (384, 688)
    assert resolve_size(512, None, 256, 768, 16) == (256, 768)
    with pytest.raises(SystemExit):
        resolve_size(512, None, 250, 256, 16)
    assert default_shift("c2i", 256, 256) == 1.0 and default_shift("c2i", 512, 512) == 3.0
    assert default_shift("t2i", 512, 512) == 3.0 and default_shift("t2i", 1024, 1024) == 4.0


def test_c2i_sampling_writes_pngs_grid_and_settings(tmp_path, c2i_ckpt):
    out = tmp_path / "a"
    args = ["--ckpt", c2i_ckpt, "--classes", "1,2,3", "--images-per-prompt", "2", "--steps", "3",
            "--resolution", "16", "--dtype", "float32", "--no-progress"]
    assert sample_main(args + ["--out", str(out), "--batch-size", "4"]) == 0
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == [f"{i:05d}.png" for i in range(6)]
    assert _png(out / "00000.png").shape == (16, 16, 3)
    assert Image.open(out / "grid.png").size == (2 * 16, 3 * 16)
    s = json.loads((out / "settings.json").read_text())
    assert s["sampler"] == {"name": "flow_dpm_solver", "steps": 3, "shift": 1.0, "cfg_scale": 2.75,
                            "cfg_interval": [0.1, 0.9], "dtype": "float32", "heun_exact": False, "spacing": "uniform"}
    assert [im["class"] for im in s["images"]] == [1, 1, 2, 2, 3, 3]
    assert [im["seed"] for im in s["images"]] == list(range(6)) and s["height"] == s["width"] == 16
    assert not np.array_equal(_png(out / "00000.png"), _png(out / "00001.png"))  # different seeds

    # same seeds → same images whatever the batch size, and whatever the rank split
    single = tmp_path / "b"
    assert sample_main(args + ["--out", str(single), "--batch-size", "1"]) == 0
    for i in range(6):
        diff = np.abs(_png(out / f"{i:05d}.png").astype(int) - _png(single / f"{i:05d}.png").astype(int))
        assert diff.max() <= 1, i


def test_rank_split(tmp_path, c2i_ckpt, monkeypatch):
    args = ["--ckpt", c2i_ckpt, "--classes", "4,5,6", "--steps", "2", "--resolution", "16", "--dtype", "float32",
            "--no-progress", "--sampler", "euler", "--cfg", "1.0"]
    ref = tmp_path / "ref"
    assert sample_main(args + ["--out", str(ref)]) == 0
    split = tmp_path / "split"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert sample_main(args + ["--out", str(split)]) == 0
    assert sorted(p.name for p in split.glob("*.png")) == ["00001.png"]  # rank 1 takes every second image
    monkeypatch.setenv("RANK", "0")
    assert sample_main(args + ["--out", str(split)]) == 0
    assert (split / "grid.png").exists() and json.loads((split / "settings.json").read_text())["world_size"] == 2
    for i in range(3):
        assert np.array_equal(_png(ref / f"{i:05d}.png"), _png(split / f"{i:05d}.png"))


def test_t2i_sampling_with_tiny_gemma(tmp_path):
    torch.manual_seed(0)
    ckpt = str(save_pretrained(build_model("pixeldit_tiny_t2i"), tmp_path / "t2i"))
    gemma = make_tiny_gemma(tmp_path / "gemma", hidden_size=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na busy city street at dusk\n")
    out = tmp_path / "out"
    assert sample_main(["--ckpt", ckpt, "--prompts", str(prompts), "--text-encoder", gemma, "--steps", "2",
                        "--aspect-ratio", "2:1", "--resolution", "16", "--out", str(out), "--no-progress",
                        "--negative-prompt", "blurry"]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert s["sampler"]["name"] == "dpm_solver_2m" and s["sampler"]["cfg_scale"] == 4.5
    assert s["sampler"]["shift"] == 3.0 and s["sampler"]["dtype"] == "bfloat16"
    assert [im["prompt"] for im in s["images"]] == ["a red car", "a busy city street at dusk"]
    assert s["negative_prompt"] == "blurry" and (s["height"], s["width"]) == (8, 24)
    assert _png(out / "00001.png").shape == (8, 24, 3)


@pytest.mark.parametrize("args,needle", [
    ([], "nothing to sample"),
    (["--prompt", "a cat"], "class indices"),
    (["--classes", "3,10"], "class 10 is out of range: this model has classes 0..9"),
    (["--classes", "-1"], "class -1 is out of range"),
])
def test_errors_are_clear(tmp_path, c2i_ckpt, capsys, args, needle):
    assert sample_main(["--ckpt", c2i_ckpt, "--out", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2i-sample: error: ") and needle in err and "\n" not in err, err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert sample_main(["--ckpt", str(tmp_path / "runs" / "x" / "export"), "--out", str(tmp_path / "o"),
                        "--classes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "export/ema" in err and "\n" not in err, err


def test_torchrun_two_ranks_match_single_process(tmp_path, c2i_ckpt):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--ckpt", c2i_ckpt, "--classes", "1,2,3", "--steps", "2", "--resolution", "16", "--dtype", "float32",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "t2i_train.sample", *args, "--out", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sample_main(args + ["--out", str(tmp_path / "one")]) == 0
    s = json.loads((tmp_path / "dist" / "settings.json").read_text())
    assert s["world_size"] == 2 and len(s["images"]) == 3
    for i in range(3):
        assert np.array_equal(_png(tmp_path / "dist" / f"{i:05d}.png"), _png(tmp_path / "one" / f"{i:05d}.png"))
