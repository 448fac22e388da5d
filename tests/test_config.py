"""Run-config schema: YAML + overrides, clear errors naming the key, global-batch check, shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from t2i_train.config import ConfigError, check_global_batch, dump_yaml, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("backend: {name: fsdp, micro_batch: 4}\noptim: {lr: 1.0e-4}\n")
    cfg = load_config(p, ["optim.lr=1e-5", "backend.grad_accum=3", "ema.enabled=false",
                          "optim.step_downs=[{step: 10, lr: 1.0e-6}]", "model.init_from=x/y"])
    assert cfg.optim.lr == 1e-5 and cfg.backend.grad_accum == 3 and cfg.ema.enabled is False
    assert cfg.optim.step_downs[0].step == 10 and cfg.optim.step_downs[0].clip is None
    assert cfg.backend.name == "fsdp" and cfg.model.init_from == "x/y"


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("bogus.x=1", "bogus"),
    ("backend.name=horovod", "allowed values: ['single', 'ddp', 'fsdp', 'deepspeed']"),
    ("backend.zero_stage=4", "backend.zero_stage"),
    ("optim.name=sgd", "['adamw', 'came']"),
    ("backend.micro_batch=two", "backend.micro_batch: expected an integer"),
    ("ema.decay=1.5", "ema.decay"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("logging.report_to=mlflow", "['wandb', 'tensorboard', 'none']"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"allowed keys: \['name', 'zero_stage'"):
        load_config(None, ["backend.stage=2"])


def test_global_batch_is_checked():
    cfg = load_config(None, ["backend.micro_batch=16", "backend.grad_accum=1", "backend.global_batch=1024"])
    assert check_global_batch(cfg, 64) == 1024
    with pytest.raises(ConfigError, match="grad_accum"):
        check_global_batch(cfg, 8)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "t2i_1024.yaml")
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_shipped_configs_follow_the_paper():
    c512 = load_config(REPO / "configs" / "t2i_512.yaml")
    c1024 = load_config(REPO / "configs" / "t2i_1024.yaml")
    assert (c512.objective.shift, c512.optim.lr, c512.optim.grad_clip, c512.run.max_steps) == (3.0, 1e-4, 0.2, 400000)
    assert (c512.objective.repa_block, c512.objective.repa_weight, c512.objective.cond_drop_prob) == (6, 0.5, 0.1)
    assert c512.backend.global_batch == 1024 and check_global_batch(c512, 64) == 1024
    assert c512.data.loader["resolution"] == 512 and c512.data.loader["bucket_mode"] == "fixed"
    assert (c1024.objective.shift, c1024.optim.lr, c1024.optim.grad_clip, c1024.run.max_steps) == (4.0, 2e-5, 0.1, 100000)
    assert c1024.objective.repa_weight == 0.0 and c1024.backend.global_batch == 768
    assert c1024.data.loader["resolution"] == 1024 and c1024.data.loader["bucket_mode"] == "multi"
    assert (c1024.model.init_from, c1024.model.init_weights) == ("runs/t2i_512", "raw")
    assert c512.optim.name == "came" and c512.optim.betas == [0.9, 0.999, 0.9999] and c512.optim.eps == [1e-30, 1e-16]
    i256 = load_config(REPO / "configs" / "imagenet256_xl.yaml")
    i512 = load_config(REPO / "configs" / "imagenet512_xl.yaml")
    assert i256.optim.name == "adamw" and i256.optim.betas == [0.9, 0.999] and i256.optim.weight_decay == 0
    assert i256.ema.decay == 0.9999 and i256.optim.lr == 1e-4 and i256.optim.grad_clip == 1.0
    sd = i256.optim.step_downs[0]
    assert (sd.lr, sd.clip) == (1e-5, 0.5) and check_global_batch(i256, 8) == 256
    assert i512.model.init_from == "runs/imagenet256_xl/export/ema" and i512.objective.shift == 3.0
    assert (i512.optim.lr, i512.optim.grad_clip) == (1e-5, 0.5) and check_global_batch(i512, 8) == 256


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")) +
                         sorted("demo/" + p.name for p in (REPO / "configs" / "demo").glob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(REPO / "configs" / path)
    assert cfg.run.name
    if path.startswith("demo/"):
        assert cfg.data.source == "loader"  # demos run the real loader
