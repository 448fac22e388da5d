"""The shipped configs' resolved recipe, pinned value by value (a later change must be a deliberate one), and the
pieces that make each paper/reference difference a visible choice: lr scaling, REPA teacher size, init_from
ema|raw (+ optimiser), text.chi, sampling presets, in-run validation settings, `--print-recipe` and the README.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i_train.config import ConfigError, load_config, resolve_effective_lr
from t2i_train.recipe import recipe_table, resolved_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def cfg(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


# ------------------------------------------------------------------ the shipped values

# config → (effective lr, clip, warm-up, text mask, caption rule, REPA teacher side, val sampler, cfg, interval, shift)
PINNED = {
    "t2i_512": (1e-4, 0.2, 2000, False, (25.0, 0.1), 224, "dpm_solver_2m", 4.5, [0.0, 1.0], 3.0),
    "t2i_512_ms": (1e-4, 0.2, 2000, False, (25.0, 0.1), 224, "dpm_solver_2m", 4.5, [0.0, 1.0], 3.0),
    "t2i_1024": (2e-5, 0.1, 2000, False, (25.0, 0.1), 224, "dpm_solver_2m", 4.5, [0.0, 1.0], 4.0),
    "imagenet256_xl": (1e-4, 1.0, 0, None, None, None, "flow_dpm_solver", 3.25, [0.1, 1.0], 1.0),
    "imagenet512_xl": (1e-5, 0.5, 0, None, None, None, "flow_dpm_solver", 3.5, [0.1, 1.0], 2.0),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_config_resolves_to_the_pinned_recipe(name):
    c = cfg(name)
    lr, clip, warmup, mask, caption, teacher, sampler, scale, interval, shift = PINNED[name]
    assert resolve_effective_lr(c, c.backend.global_batch) == pytest.approx(lr)
    assert (c.optim.grad_clip, c.optim.warmup_steps) == (clip, warmup)
    if c.run.task == "t2i":
        assert c.text.use_mask is mask and c.text.chi == "default"
        loader = c.data.loader
        assert (loader["clip_thr"], loader["clip_thr_temperature"]) == caption
        assert c.optim.name == "came" and c.backend.name == "deepspeed" and c.backend.zero_stage == 2
    assert c.objective.repa_teacher_resolution == teacher
    lg = c.logging
    val_shift = lg.val_shift if lg.val_shift is not None else c.objective.shift
    assert (lg.val_sampler, lg.val_cfg_scale, lg.val_cfg_interval, val_shift) == (sampler, scale, interval, shift)


def test_stage_chain_and_imagenet_choices():
    for name in ("t2i_512_ms", "t2i_1024"):
        m = cfg(name).model
        assert (m.init_from, m.init_weights, m.init_optimizer) == ("runs/t2i_512", "raw", False)
    assert cfg("t2i_512").model.init_from is None
    i256, i512 = cfg("imagenet256_xl"), cfg("imagenet512_xl")
    assert i256.data.loader["hflip"] is True and i256.objective.repa_teacher_resolution is None
    assert i512.objective.shift == 3.0 and i512.logging.val_shift == 2.0  # sampler shift ≠ training shift
    assert (i512.model.init_from, i512.model.init_weights) == ("runs/imagenet256_xl/export/ema", "ema")


def test_every_difference_is_commented_with_the_paper_value():
    text = (CONFIGS / "t2i_512.yaml").read_text()
    for key, paper in (("grad_clip: 0.2", "paper: 0.5"), ("lr_scaling: none", "paper: 1e-4"),
                       ("use_mask: false", "paper: not stated"), ("repa_teacher_resolution: 224", "paper: not stated"),
                       ("clip_thr: 25.0", "paper: not stated")):
        line = next(l for l in text.splitlines() if key in l)
        assert paper in line, line
    assert "paper: 2e-5" in next(l for l in (CONFIGS / "t2i_1024.yaml").read_text().splitlines() if "lr_scaling" in l)
    assert "no flip at load time" in (CONFIGS / "imagenet256_xl.yaml").read_text()


# ------------------------------------------------------------------ lr scaling


def test_lr_scaling_sqrt_gives_the_reference_lr_and_is_checked():
    assert resolve_effective_lr(cfg("t2i_512", "optim.lr_scaling=sqrt"), 1024) == pytest.approx(2e-4)
    assert resolve_effective_lr(cfg("t2i_1024", "optim.lr_scaling=sqrt"), 768) == pytest.approx(2e-5 * math.sqrt(3))
    c = cfg("t2i_512", "optim.lr_scaling=sqrt", "optim.effective_lr=1.0e-4")
    with pytest.raises(ConfigError, match=r"optim.effective_lr: 0.0001 given.*gives 0.0002"):
        resolve_effective_lr(c, 1024)
    with pytest.raises(ConfigError, match="lr_scaling"):
        cfg("t2i_512", "optim.lr_scaling=linear")


def test_trainer_applies_and_records_the_effective_lr(tmp_path):
    import json

    import yaml

    from t2i_train.train import Trainer

    c = load_config(None, [f"run.output_dir={tmp_path}", "run.name=lr", "run.max_steps=2", "data.source=fixed",
                           "data.fixed_image_size=16", "backend.micro_batch=4", "backend.precision=fp32",
                           "optim.lr=1.0e-3", "optim.lr_scaling=sqrt", "optim.lr_base_batch=1", "logging.every=1",
                           "logging.tqdm=false", "ema.enabled=false", "spike_guard.enabled=false"])
    Trainer(c).fit()
    resolved = yaml.safe_load((tmp_path / "lr" / "config.yaml").read_text())
    assert resolved["optim"]["effective_lr"] == pytest.approx(2e-3)  # 1e-3 · √(4/1)
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-3, 2e-3])
    assert (tmp_path / "lr" / "export" / "raw" / "model.safetensors").is_file()


# ------------------------------------------------------------------ REPA teacher size


def test_repa_teacher_at_224_compares_resized_student_tokens():
    from t2i_train.diffusion import FlowObjective
    from t2i_train.diffusion.repa import resize_tokens
    from t2i_train.models import build_model
    from test_repa import FakeTeacher

    grid = torch.arange(16.0).reshape(1, 4, 4, 1)  # value = token index, on a 4×4 grid
    down = resize_tokens(grid.reshape(1, 16, 1), (4, 4), (2, 2))
    assert down.flatten().tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5])  # bilinear, align_corners=False
    torch.manual_seed(0)
    model = build_model("pixeldit_tiny_t2i", repa_block=1)
    teacher = FakeTeacher()
    obj = FlowObjective({"repa_weight": 0.5, "repa_block": 1, "repa_teacher_resolution": 28}, model.hidden_size,
                        teacher=teacher)
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # patch 8 → a 4×4 student grid; teacher 28² → 2×2 tokens
    out = obj.loss(model, x, torch.randn(2, 16, 32), None, generator=torch.Generator().manual_seed(0))
    assert teacher.grids == [(2, 2)] and -1.0 <= out["repa_loss"].item() <= 1.0
    out["loss"].backward()
    assert obj.projector[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ init_from, text.chi


def test_init_from_a_run_directory_picks_ema_or_raw(tmp_path):
    from t2i_train.config import ModelConfig
    from t2i_train.train import init_weights_path, previous_checkpoint

    run = tmp_path / "stage1"
    (run / "export" / "ema").mkdir(parents=True)
    assert init_weights_path(ModelConfig(init_from=str(run))) == run / "export" / "ema"
    assert init_weights_path(ModelConfig(init_from=str(run), init_weights="raw")) == run / "export" / "raw"
    with pytest.raises(ValueError, match="EMA export but model.init_weights is raw"):
        init_weights_path(ModelConfig(init_from=str(run / "export" / "ema"), init_weights="raw"))
    with pytest.raises(FileNotFoundError, match="no checkpoints/latest"):
        previous_checkpoint(ModelConfig(init_from=str(run), init_weights="raw", init_optimizer=True))
    with pytest.raises(ConfigError, match="init_weights=raw"):
        load_config(None, ["model.init_from=x", "model.init_optimizer=true"])


def test_init_optimizer_carries_the_previous_stage_state(tmp_path):
    from t2i_train.train import Trainer

    base = [f"run.output_dir={tmp_path}", "data.source=fixed", "data.fixed_image_size=16", "backend.micro_batch=2",
            "backend.precision=fp32", "optim.name=came", "optim.betas=[0.9,0.999,0.9999]",
            "optim.eps=[1.0e-30,1.0e-16]", "logging.tqdm=false", "spike_guard.enabled=false"]
    first = Trainer(load_config(None, base + ["run.name=s1", "run.max_steps=2"]))
    first.fit()
    state1 = first.backend.optimizer.state_dict()["state"]
    second = Trainer(load_config(None, base + ["run.name=s2", "run.max_steps=1", f"model.init_from={tmp_path / 's1'}",
                                               "model.init_weights=raw", "model.init_optimizer=true"]))
    state2 = second.backend.optimizer.state_dict()["state"]
    assert second.step == 0 and state2.keys() == state1.keys()
    assert all(torch.equal(state2[k]["exp_avg"], state1[k]["exp_avg"]) for k in state1)
    fresh = Trainer(load_config(None, base + ["run.name=s3", "run.max_steps=1", f"model.init_from={tmp_path / 's1'}",
                                              "model.init_weights=raw"]))
    assert not fresh.backend.optimizer.state_dict()["state"]


def test_text_chi_choices(tmp_path):
    from t2i_train.engine.text_adapter import chi_prompt
    from t2i_train.text import CHI_PROMPT

    assert chi_prompt("default") == CHI_PROMPT and chi_prompt("none") is None
    (tmp_path / "chi.txt").write_text("Describe:\nUser Prompt: \n")
    assert chi_prompt(str(tmp_path / "chi.txt")) == "Describe:\nUser Prompt: "
    with pytest.raises(ValueError, match="text.chi: 'nope.txt'"):
        chi_prompt("nope.txt")


# ------------------------------------------------------------------ sampling


def test_sampling_presets_follow_the_model_card():
    from t2i_train.sample import SAMPLING_PRESETS, default_preset

    def key(p):
        return p["cfg"], tuple(p["interval"]), p["shift"]

    assert key(SAMPLING_PRESETS["imagenet512"]) == (3.5, (0.1, 1.0), 2.0)
    assert key(SAMPLING_PRESETS["imagenet256_epoch80"]) == key(SAMPLING_PRESETS["imagenet256_epoch160"]) \
        == (3.25, (0.1, 1.0), 1.0)
    assert key(SAMPLING_PRESETS["imagenet256_epoch320"]) == (2.75, (0.1, 0.9), 1.0)
    assert SAMPLING_PRESETS["t2i"]["sampler"] == "dpm_solver_2m" and SAMPLING_PRESETS["t2i"]["cfg"] == 4.5
    assert default_preset("c2i", 512) == "imagenet512" and default_preset("c2i", None) == "imagenet256_epoch320"
    assert default_preset("t2i", 1024) == "t2i"


def test_validation_uses_the_cfg_interval_and_sampler_shift(tmp_path, monkeypatch):
    import t2i_train.diffusion as diffusion
    from t2i_train.train import Trainer

    seen = []

    def fake_sample(model, noise, cond, mask, unc, umask, scfg):
        seen.append(scfg)
        return noise

    monkeypatch.setattr(diffusion, "sample", fake_sample)
    c = load_config(None, [f"run.output_dir={tmp_path}", "run.task=c2i", "model.spec=pixeldit_tiny_c2i",
                           "data.source=fixed", "data.fixed_image_size=16", "run.max_steps=1", "objective.shift=3.0",
                           "logging.val_prompts=[0,1]", "logging.val_steps=2", "logging.val_cfg_scale=3.5",
                           "logging.val_cfg_interval=[0.1,1.0]", "logging.val_shift=2.0", "logging.tqdm=false"])
    Trainer(c).validate()
    assert len(seen) == 1
    assert (seen[0].cfg_scale, seen[0].cfg_interval, seen[0].shift) == (3.5, (0.1, 1.0), 2.0)
    with pytest.raises(ConfigError, match="val_cfg_interval"):
        load_config(None, ["logging.val_cfg_interval=[0.9,0.1]"])


# ------------------------------------------------------------------ --print-recipe and the README


def test_recipe_table_names_every_difference():
    table = recipe_table(cfg("t2i_512"))
    row = next(l for l in table.splitlines() if l.startswith("| grad clip |"))
    assert row.split(" | ")[1:4] == ["0.2", "0.5", "0.2"] and "reference" in row
    ours = resolved_recipe(cfg("t2i_1024", "optim.lr_scaling=sqrt"))
    assert ours["effective lr"].startswith("3.46e-5") and ours["text mask"] == "off"
    assert resolved_recipe(cfg("imagenet512_xl"))["val sampler"] == \
        "flow_dpm_solver, 100 steps, cfg 3.5 on [0.1, 1], shift 2"


def test_print_recipe_cli_prints_the_table():
    import os

    r = subprocess.run([sys.executable, "-m", "t2i_train.train", "--config", str(CONFIGS / "t2i_512.yaml"),
                        "--print-recipe"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == recipe_table(cfg("t2i_512"))


@pytest.mark.parametrize("name", sorted(PINNED))
def test_readme_recipe_table_is_the_print_recipe_output(name):
    readme = (REPO / "README.md").read_text()
    assert recipe_table(cfg(name)) in readme, (f"README's recipe table for {name} is stale: regenerate it with "
                                              f"python -m t2i_train.train --config configs/{name}.yaml --print-recipe")
