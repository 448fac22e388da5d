"""Real divergence stops within spike_guard.max_rollbacks with a non-zero exit and keeps the known-good checkpoint;
metrics/events are strict JSON; every listed bad config gives one `config error:` line and exit 2."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from t2i_train.engine.integrity import verify

REPO = Path(__file__).resolve().parents[1]


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def run_config(tmp: Path, **sections) -> Path:
    cfg = {"run": {"name": "r", "output_dir": str(tmp / "runs"), "max_steps": 40},
           "model": {"spec": "pixeldit_tiny_c2i"},
           "data": {"source": "fixed", "fixed_image_size": 16, "fixed_num_samples": 4},
           "backend": {"name": "single", "precision": "fp32", "micro_batch": 2},
           "checkpoint": {"every": 5, "keep_last": 1},
           "logging": {"every": 1, "tqdm": False}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_divergence_stops_within_the_cap_and_keeps_the_good_checkpoint(tmp_path):
    """lr 1e30 from step 12: every replay diverges again. checkpoint.every=1 so that saves fall inside streaks."""
    cfg = run_config(tmp_path, optim={"step_downs": [{"step": 12, "lr": 1.0e30}]},
                     checkpoint={"every": 1, "keep_last": 1},
                     spike_guard={"max_consecutive": 2, "max_rollbacks": 2, "min_history": 3})
    r = subprocess.run([sys.executable, "-m", "t2i_train.train", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert r.returncode == 3, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("t2i-train: spike guard:") and "spike_guard.max_rollbacks=2" in last, last
    assert "2 roll-back(s) in a row to step_00000012" in last
    run = tmp_path / "runs" / "r"
    events = strict_json_lines(run / "events.jsonl")
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [e["rollbacks_in_a_row"] for e in rollbacks] == [1, 2]
    assert all(e["checkpoint"].endswith("step_00000012") for e in rollbacks)
    assert events[-1]["event"] == "end" and events[-1]["status"] == "spike guard gave up"
    skipped = [e for e in events if e["event"] == "skipped_update"]
    assert len(skipped) == 6 and all(e["loss"] is None for e in skipped)
    assert all(len(e["keys"]) == 2 and all(k.startswith("fixed/") for k in e["keys"]) for e in skipped)
    # no checkpoint was written during a streak; the known-good one survives keep_last=1 and is intact
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    deferred = {e["step"] for e in events if e["event"] == "checkpoint_deferred"}
    assert deferred and not deferred & set(saved)
    ck = run / "checkpoints"
    assert (ck / "known_good").read_text().strip() == "step_00000012"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000012"]  # the diverged step 13 is discarded
    assert verify(ck / "step_00000012") is None
    state = torch.load(ck / "step_00000012" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())
    metrics = strict_json_lines(run / "metrics.jsonl")
    assert any(m["grad_norm"] is None or m["loss"] is None for m in metrics)


def test_metrics_and_events_never_hold_nan(tmp_path):
    from t2i_train.engine.monitor import json_line

    line = json_line({"loss": float("nan"), "g": float("inf"), "nested": [1.0, float("-inf"), {"x": float("nan")}]})
    assert json.loads(line) == {"loss": None, "g": None, "nested": [1.0, None, {"x": None}]}


# ------------------------------------------------------------------------------------------ config errors

def _tiny_t2i_loader(tmp: Path) -> str:
    return (f"run: {{name: c, output_dir: {tmp}/runs, max_steps: 2}}\n"
            "model: {spec: pixeldit_tiny_t2i}\n"
            "data: {source: loader, loader: {datasets: [" + str(tmp) + "/nodata]}}\n"
            "backend: {name: single, precision: fp32, micro_batch: 2}\n"
            "text: {encoder: 'hash:32'}\n")


BAD = {  # case: (extra YAML text or None, overrides, text the one-line error must contain)
    "loader_unknown_key": (None, ["data.loader.resolutoin=32"], "unknown data.loader key data.loader.resolutoin"),
    "loader_bad_type": (None, ["data.loader.resolution=big"], "data.loader.resolution: expected an integer"),
    "loader_negative_workers": (None, ["data.loader.num_workers=-1"], "data.loader.num_workers: must be >= 0"),
    "loader_bad_bucket_mode": (None, ["data.loader.datasets=[{urls: /no/x.tar}]", "data.loader.bucket_mode=wobbly"],
                               "wobbly"),
    "loader_missing_dataset": (None, [], "data.loader.datasets[0]: "),
    "model_spec_unknown": (None, ["model.spec=pixeldit_huge"], "model.spec: unknown model preset 'pixeldit_huge'"),
    "model_spec_bad_key": (None, ["model.spec={preset: pixeldit_tiny_t2i, wings: 2}"], "model.spec:"),
    "text_encoder_missing": (None, ["text.encoder=null"], "text.encoder: missing"),
    "text_encoder_bad_hash": (None, ["text.encoder=hash:abc"], "text.encoder: 'hash:abc'"),
    "text_encoder_bad_path": (None, ["text.encoder=./no/such/gemma"], "text.encoder: ./no/such/gemma"),
    "global_batch_mismatch": (None, ["backend.global_batch=64"], "backend.global_batch: 64"),
    "init_from_missing": (None, ["data.source=fixed", "model.init_from=/no/such/export"],
                          "model.init_from: /no/such/export does not exist"),
    "yaml_syntax": ("backend: {name: single\n", [], "YAML syntax error at line"),
    "override_yaml_syntax": (None, ["optim.betas=[0.9,"], "YAML syntax error"),
    "cuda_without_cuda": (None, ["backend.device=cuda"], "backend.device: 'cuda', but CUDA is not available"),
    "negative_warmup": (None, ["optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0"),
    "negative_weight_decay": (None, ["optim.weight_decay=-0.1"], "optim.weight_decay: must be >= 0"),
    "resume_not_a_dir": (None, ["checkpoint.resume=/no/such/step_00000010"], "checkpoint.resume:"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_config_errors_are_one_line_and_exit_2(tmp_path, capsys, case):
    if case == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from t2i_train.train import main

    extra, overrides, needle = BAD[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_tiny_t2i_loader(tmp_path) + (extra or ""))
    code = main(["--config", str(cfg), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("t2i-train: config error: ") and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_demo_fsdp_command_in_the_header_is_valid():
    """The header's FSDP command resolves to a valid FSDP2 run (CAME runs on FSDP2's shards)."""
    from t2i_train.config import load_config

    path = REPO / "configs" / "demo" / "t2i_tiny_512.yaml"
    header = [l.lstrip("# ").rstrip() for l in path.read_text().splitlines() if l.startswith("#")]
    command = next(l for l in header if "backend.name=fsdp" in l).split()
    overrides = [a for a in command[command.index(str(path.relative_to(REPO))) + 1:] if "=" in a]
    cfg = load_config(path, overrides)
    assert cfg.backend.name == "fsdp" and cfg.optim.name == "came"
    assert not math.isnan(cfg.optim.lr) and shlex.join(overrides)


def test_spike_guard_counts_roll_backs_in_a_row_until_the_run_gets_past_the_failure():
    from t2i_train.config import load_config
    from t2i_train.engine.spike import SpikeGuard, SpikeGuardError

    g = SpikeGuard(load_config(None, ["spike_guard.max_rollbacks=2"]).spike_guard)
    g.check_rollback_allowed(20, "step_10")
    g.note_rollback(failed_at=20)
    g.accept(1.0, step=15)  # replaying below the failing step: still the same trouble
    g.check_rollback_allowed(20, "step_10")
    g.note_rollback(failed_at=20)
    with pytest.raises(SpikeGuardError, match="2 roll-back\\(s\\) in a row to step_10 did not get past step 20"):
        g.check_rollback_allowed(20, "step_10")
    g2 = SpikeGuard(g.cfg)
    g2.load_state_dict(g.state_dict())  # survives a restart
    assert (g2.rollbacks_in_a_row, g2.failed_at) == (2, 20)
    g2.accept(1.0, step=20)  # got past it: that roll-back worked
    g2.check_rollback_allowed(30, "step_25")
    zero = SpikeGuard(load_config(None, ["spike_guard.max_rollbacks=0"]).spike_guard)
    with pytest.raises(SpikeGuardError, match="no roll-back is allowed"):
        zero.check_rollback_allowed(5, "step_00000005")


def test_save_fsyncs_every_file_before_publishing(tmp_path, monkeypatch):
    from t2i_train.config import load_config
    from t2i_train.engine import integrity
    from t2i_train.engine.backends import SingleBackend, TrainModule
    from t2i_train.engine.checkpoint import CheckpointManager

    synced, published = [], []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(integrity.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    monkeypatch.setattr(Path, "rename", lambda self, target: published.append((self.name, len(synced)))
                        or real_rename(self, target))
    backend = SingleBackend(load_config(None, ["backend.precision=fp32"]),
                            TrainModule(torch.nn.Linear(2, 2), torch.nn.Module()), torch.device("cpu"))
    CheckpointManager(tmp_path, keep_last=2).save(1, backend, {"step": 1}, {})
    name, synced_before = next(p for p in published if p[0] == ".tmp-step_00000001")
    before = {Path(p).name for p in synced[:synced_before]}
    assert {"state.pt", "extra_rank0.pt", "meta.json", "manifest.json.tmp", ".tmp-step_00000001"} <= before
    assert any(Path(p).name == "latest.tmp" for p in synced[synced_before:])


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO / "configs").as_posix()
                                        for p in (REPO / "configs").rglob("*.yaml")))
def test_shipped_configs_pass_the_preflight_checks(path):
    """No false alarms: model, text encoder and bucket settings of every shipped config are accepted."""
    from t2i_train.config import load_config
    from t2i_train.engine.preflight import check_buckets, check_model, check_text_encoder

    cfg = load_config(REPO / "configs" / path)
    model_config = check_model(cfg)
    if str(cfg.text.encoder or "").startswith("data/demo/"):  # written by the demo before it trains
        cfg = load_config(REPO / "configs" / path, [f"text.encoder=hash:{model_config['txt_dim']}"])
    check_text_encoder(cfg, model_config)
    check_buckets(cfg.data.loader)


def test_progress_line_without_a_bar_reports_step_metrics_and_eta():
    from t2i_train.engine.monitor import progress_line

    line = progress_line(500, 2000, {"loss": 0.01234, "grad_norm": 0.031, "lr": 2e-3, "samples_per_s": 201.34,
                                     "repa_loss": -0.9, "skipped": 0}, elapsed=100.0, steps_done=500)
    assert line == ("[t2i-train] step 500/2000  loss 0.0123  repa -0.900  grad_norm 0.031  lr 2.00e-03  "
                    "samples/s 201.3  eta 5:00")
    # a diverged step says so; the last step has no ETA
    line = progress_line(2000, 2000, {"loss": float("nan"), "lr": 1e-4, "skipped": 3}, elapsed=9.0, steps_done=3)
    assert line == "[t2i-train] step 2000/2000  loss nan  lr 1.00e-04  skipped 3"
