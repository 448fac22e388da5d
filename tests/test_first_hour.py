"""A user's first hour: every tool says what it is doing, and bad input is one line naming what is wrong.

Trainer runs are the CPU demo config at 3 steps on 16 synthetic samples (a few seconds each).
"""
from __future__ import annotations

import configparser
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEMO = str(REPO / "configs" / "demo" / "t2i_tiny_512.yaml")


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline", **extra)


def train(cwd: Path, *overrides: str, config: str = DEMO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "t2i_train.train", "--config", config, "logging.tqdm=false", *overrides],
                          env=env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, prefix: str) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A working directory with the demo's synthetic T2I shards at data/demo/t2i and one 3-step run."""
    root = tmp_path_factory.mktemp("firsthour")
    from data_pipeline.synthetic import write_synthetic

    write_synthetic(str(root / "data" / "demo" / "t2i"), 16, seed=0, size=32)
    r = train(root, "run.max_steps=3", "logging.val_every=0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (root / "first_run.out").write_text(r.stdout)
    return root


# ---------------------------------------------------------------------------------------- trainer (item 7)

def test_banner_says_what_the_run_is(demo_dir):
    out = (demo_dir / "first_run.out").read_text()
    assert "[t2i-train] run dir    runs/demo_t2i_512 (fresh start)" in out
    assert "backend    single, world size 1, device cpu" in out
    assert "pixeldit_tiny_t2i: 0.59M parameters" in out
    assert "data       16 samples, 4.0 steps per epoch; 3 steps = 0.75 epochs" in out
    assert "global 4 = micro-batch 4 x accumulation 1 x world size 1" in out
    assert "optimizer  came, lr 0.001 (warm-up 5 steps), clip 0.5" in out


def test_every_run_ends_with_a_validation_grid(demo_dir):
    from PIL import Image

    grid = demo_dir / "runs" / "demo_t2i_512" / "val" / "step_00000003.png"  # val_every=0: only the final grid
    assert Image.open(grid).size == (2 * 32, 32)


def test_resume_with_a_changed_config_refuses_and_names_the_keys(demo_dir):
    r = train(demo_dir, "run.max_steps=3", "optim.lr=0.01", "logging.val_every=0")
    line = one_line_error(r, "t2i-train: config error:")
    assert "optim.lr: 0.001 -> 0.01" in line and "run.allow_config_change=true" in line
    saved = (demo_dir / "runs" / "demo_t2i_512" / "config.yaml").read_text()
    assert "lr: 0.001" in saved  # the saved config is not overwritten


def test_resume_with_more_steps_is_allowed_and_reported(demo_dir, tmp_path):
    import shutil

    shutil.copytree(demo_dir / "runs", tmp_path / "runs")
    shutil.copytree(demo_dir / "data", tmp_path / "data")
    r = train(tmp_path, "run.max_steps=4", "logging.val_every=0", "optim.lr=0.002", "run.allow_config_change=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from runs/demo_t2i_512/checkpoints/step_00000003 at step 3" in r.stdout
    assert "changed since the saved config: optim.lr: 0.001 -> 0.002" in r.stdout
    assert "changed since the saved config: run.max_steps: 3 -> 4" in r.stdout


def test_ctrl_c_checkpoints_and_exits(demo_dir, tmp_path):
    import shutil

    shutil.copytree(demo_dir / "data", tmp_path / "data")
    p = subprocess.Popen([PY, "-m", "t2i_train.train", "--config", DEMO, "logging.tqdm=false", "run.max_steps=100000",
                          "logging.every=1", "logging.val_every=0"], env=env(), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "demo_t2i_512" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "Ctrl-C: checkpointing" in err
    end = [json.loads(l) for l in (tmp_path / "runs" / "demo_t2i_512" / "events.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["status"] == f"stopped by signal {int(signal.SIGINT)}"
    latest = (tmp_path / "runs" / "demo_t2i_512" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{end['step']:08d}"


# ---------------------------------------------------------------------------------------- relative paths (item 4)

def test_relative_paths_resolve_against_the_current_directory(demo_dir, tmp_path):
    r = train(tmp_path, "run.max_steps=1")  # data/demo/t2i does not exist under tmp_path
    line = one_line_error(r, "t2i-train: config error:")
    assert f"data.loader.datasets[0]: data/demo/t2i (relative paths are resolved against the current directory " \
           f"{tmp_path}) does not exist" in line
    # the same config from elsewhere, the dataset given absolutely: fine
    r = train(tmp_path, "run.max_steps=1", "logging.val_every=0",
              f"data.loader.datasets=[{demo_dir / 'data' / 'demo' / 't2i'}]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "demo_t2i_512" / "export" / "ema" / "model.safetensors").is_file()


def test_init_from_missing_is_one_line(tmp_path, demo_dir):
    r = train(demo_dir, "run.name=other", "model.init_from=runs/nope/export/ema")
    line = one_line_error(r, "t2i-train: config error:")
    assert "model.init_from: runs/nope/export/ema (relative paths are resolved against the current" in line


# ---------------------------------------------------------------------------------------- export → sample (item 3)

def test_export_records_run_info(demo_dir):
    from t2i_train.models.io import load_run_info
    from t2i_train.text import CHI_PROMPT

    info = load_run_info(demo_dir / "runs" / "demo_t2i_512" / "export" / "ema")
    text = info.pop("text")
    assert text.pop("chi_prompt") in (None, CHI_PROMPT) and text == {"encoder": "hash:32", "max_length": 16,
                                                                      "use_mask": text["use_mask"]}
    assert isinstance(text["use_mask"], bool)
    assert info == {"resolution": [32, 32],
                    "resolutions": [[32, 32]],
                    "sampler": {"name": "flow_dpm_solver", "steps": 4, "shift": 3.0, "cfg_scale": 2.0,
                                "cfg_interval": [0.0, 1.0]}}
    assert load_run_info(demo_dir / "nowhere") == {}


def test_multi_aspect_run_info_lists_its_buckets():
    from t2i_train.config import load_config
    from t2i_train.engine.run_info import build_run_info, training_resolutions
    from t2i_train.text import CHI_PROMPT

    cfg = load_config(REPO / "configs" / "demo" / "t2i_tiny_1024.yaml")
    assert training_resolutions(cfg) == ([48, 48], [[32, 64], [48, 48], [64, 32]])
    cfg = load_config(REPO / "configs" / "t2i_1024.yaml")
    base, buckets = training_resolutions(cfg)
    assert base == [1024, 1024] and [1024, 1024] in buckets and [752, 1344] in buckets
    info = build_run_info(cfg, {"arch": "t2i", "txt_len": 300})
    # the released recipe: the reference's instruction before every caption, no padding mask to the denoiser
    assert info["text"] == {"encoder": "google/gemma-2-2b-it", "max_length": 300, "chi_prompt": CHI_PROMPT,
                            "use_mask": False}
    assert info["sampler"]["shift"] == 4.0
    assert build_run_info(load_config(REPO / "configs" / "imagenet256_xl.yaml"), {"arch": "c2i"})["text"] is None


def test_sample_uses_the_exports_run_info(demo_dir, tmp_path, capsys):
    from t2i_train.sample import main as sample_main

    # the --help epilog's form: a run's export/ directory
    assert sample_main(["--ckpt", str(demo_dir / "runs" / "demo_t2i_512" / "export"), "--prompt", "a red circle",
                        "--out", str(tmp_path), "--dtype", "float32"]) == 0
    s = json.loads((tmp_path / "settings.json").read_text())
    assert (s["height"], s["width"], s["text_encoder"]) == (32, 32, "hash:32")
    assert {k: s["sampler"][k] for k in ("name", "steps", "shift", "cfg_scale")} == \
        {"name": "flow_dpm_solver", "steps": 4, "shift": 3.0, "cfg_scale": 2.0}
    err = capsys.readouterr().err
    assert "4/4" in err and "step" in err  # progress counts denoising steps


def test_sample_help_epilog_and_defaults():
    from t2i_train.sample import build_parser

    text = build_parser().format_help()
    assert "--ckpt runs/demo_t2i_512/export/ema" in text and "run_info.json" in text
    assert "(default: 8)" in text and "(default: None)" not in text


# ---------------------------------------------------------------------------------------- text encoders (item 5)

def _encode(tmp_path, *args, **extra_env):
    return subprocess.run([PY, "-m", "t2i_train.text.cache", *args], env=env(**extra_env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_encode_text_accepts_hash(demo_dir, tmp_path):
    from safetensors import safe_open

    r = _encode(tmp_path, str(demo_dir / "data" / "demo" / "t2i"), "--out", str(tmp_path / "cached"),
                "--text-encoder", "hash:32", "--max-length", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stderr.strip().splitlines()[-1]) == {"rank": 0, "shards": 1, "samples": 16}
    with safe_open(str(tmp_path / "cached" / "null_text_emb.safetensors"), "pt") as f:
        assert f.get_tensor("emb").shape == (1, 16, 32) and f.metadata()["text_encoder"] == "hash:32"


@pytest.mark.parametrize("name,offline,needle", [
    ("/no/such/gemma", "0", "not found locally (/no/such/gemma does not exist)"),
    ("google/gemma-2-2b-it", "1", "not found locally and the hub is unreachable (HF_HUB_OFFLINE is set)"),
    ("google/gemma-2-2b-it", "0", "not found locally and the hub is unreachable (no connection)"),
])
def test_missing_text_encoder_is_one_fast_line(tmp_path, name, offline, needle):
    from t2i_train.text.cache import main

    index = tmp_path / "index.json"
    index.write_text(json.dumps({"shards": [], "total": 0}))
    os.environ["HF_HUB_OFFLINE"], saved = offline, os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_ENDPOINT"], saved_ep = "http://127.0.0.1:9", os.environ.get("HF_ENDPOINT")  # nothing listens
    os.environ["HF_HOME"], saved_home = str(tmp_path / "hf"), os.environ.get("HF_HOME")
    try:
        t0 = time.time()
        rc = main([str(tmp_path), "--text-encoder", name])
        elapsed = time.time() - t0
    finally:
        for k, v in (("HF_HUB_OFFLINE", saved), ("HF_ENDPOINT", saved_ep), ("HF_HOME", saved_home)):
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert rc == 2 and elapsed < 5.0, elapsed


def test_missing_text_encoder_message(tmp_path, capsys):
    from t2i_train.text.encoders import TextEncoderNotFound, resolve_text_encoder

    with pytest.raises(TextEncoderNotFound, match=r"not found locally \(/no/such/gemma does not exist\)"):
        resolve_text_encoder("/no/such/gemma")
    os.environ["HF_HUB_OFFLINE"], saved = "1", os.environ.get("HF_HUB_OFFLINE")
    try:
        with pytest.raises(TextEncoderNotFound, match="not found locally and the hub is unreachable"):
            resolve_text_encoder("someone/not-cached-model")
    finally:
        os.environ.pop("HF_HUB_OFFLINE") if saved is None else os.environ.__setitem__("HF_HUB_OFFLINE", saved)


# ---------------------------------------------------------------------------------------- DeepSpeed noise (item 8)

def test_deepspeed_cpu_op_build_is_announced(monkeypatch, tmp_path, capsys):
    pytest.importorskip("deepspeed")
    import torch.utils.cpp_extension as ext

    from t2i_train.engine import dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    dist._announce_cpu_op_build()
    assert "building DeepSpeed's CPU communication op (first run on this machine, about a minute)" in \
        capsys.readouterr().out
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    dist._announce_cpu_op_build()
    assert capsys.readouterr().out == ""


def test_deprecated_all_gather_warning_is_silenced_and_nothing_else():
    from t2i_train.engine.dist import silence_deprecated_all_gather

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_deprecated_all_gather()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


# ---------------------------------------------------------------------------------------- FLOPs (item 9)

@pytest.mark.parametrize("config,side", [("configs/demo/t2i_tiny_512.yaml", 32), ("configs/demo/t2i_tiny_1024.yaml", 48),
                                         ("configs/imagenet512_xl.yaml", 512)])
def test_flops_uses_the_configs_resolution(capsys, config, side):
    from t2i_train.tools.flops import main

    main(["--config", str(REPO / config), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert (out["height"], out["width"]) == (side, side)


# ---------------------------------------------------------------------------------------- --help (item 11)

def console_scripts() -> dict[str, str]:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    lines = [l.strip() for l in cp["options.entry_points"]["console_scripts"].splitlines() if l.strip()]
    return dict(tuple(p.strip() for p in l.split("=")) for l in lines)


# scripts made of subcommands: the commands whose options have defaults
SUBCOMMANDS = {"t2i-eval": [["geneval", "generate"], ["geneval", "score"], ["dpg", "generate"], ["dpg", "score"],
                            ["fid", "generate"], ["fid", "score"]]}


@pytest.mark.parametrize("script,sub", [(s, c) for s in sorted(console_scripts()) for c in SUBCOMMANDS.get(s, [[]])])
def test_every_console_script_help_shows_defaults(script, sub, capsys):
    module, func = console_scripts()[script].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        main([*sub, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {' '.join([script, *sub])}") and "(default: " in text, text[:500]
    if script == "t2i-train":
        assert "docs/CONFIG.md" in text


def test_config_reference_is_up_to_date_and_complete():
    from t2i_train.config_docs import render

    text = render()
    assert (REPO / "docs" / "CONFIG.md").read_text() == text, \
        "docs/CONFIG.md is out of date: run python -m t2i_train.config_docs docs/CONFIG.md"
    rows = [l for l in text.splitlines() if l.startswith("| `")]
    undocumented = [r.split("`")[1] for r in rows if r.rstrip().endswith("|  |") or r.rstrip().endswith("| |")]
    assert not undocumented, f"keys without a meaning (add an inline # comment in t2i_train/config.py): {undocumented}"
    for key in ("run.allow_config_change", "backend.global_batch", "optim.step_downs[].lr", "extends"):
        assert f"| `{key}` |" in text


def test_run_info_carries_the_text_settings_the_sampler_must_reuse():
    """An export records the instruction and the mask setting; loaders use them (absent: the reference's)."""
    from t2i_train.config import load_config
    from t2i_train.engine.run_info import build_run_info, run_info_chi
    from t2i_train.text import CHI_PROMPT

    cfg = load_config(REPO / "configs" / "t2i_512.yaml", ["text.chi=none", "text.use_mask=true"])
    text = build_run_info(cfg, {"arch": "t2i", "txt_len": 300})["text"]
    assert text["chi_prompt"] is None and text["use_mask"] is True
    assert run_info_chi(text) is None
    assert run_info_chi({"encoder": "x"}) == CHI_PROMPT  # exports from before the key existed
