"""Damaged checkpoints: resume takes the newest intact `step_*` and names the file that made it skip a newer one;
no planted pickle is ever executed. One trained run directory is copied and damaged per case."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from t2i_train.config import load_config
from t2i_train.engine.checkpoint import CheckpointManager, ResumeError
from t2i_train.engine.integrity import MANIFEST, sha256_file, verify

REPO = Path(__file__).resolve().parents[1]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
                MASTER_ADDR="127.0.0.1", WANDB_MODE="offline")


def tiny_config(tmp: Path, run_name: str, **backend) -> Path:
    cfg = {"run": {"name": run_name, "output_dir": str(tmp / "runs"), "max_steps": 10},
           "model": {"spec": "pixeldit_tiny_c2i"},
           "data": {"source": "fixed", "fixed_image_size": 16, "fixed_num_samples": 4},
           "backend": {"name": "single", "precision": "fp32", "micro_batch": 2, **backend},
           "checkpoint": {"every": 5, "keep_last": 3},
           "logging": {"every": 1, "tqdm": False}}
    path = tmp / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A single-process run with checkpoints at steps 5 and 10."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = tiny_config(tmp, "base")
    r = subprocess.run([sys.executable, "-m", "t2i_train.train", "--config", str(cfg)], env=env(), cwd=tmp,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = tmp / "runs" / "base" / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000005", "step_00000010"]
    return tmp / "runs" / "base"


def truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


S10 = "step_00000010"
DAMAGE = {  # case: (damage(checkpoints dir), expected resume step, text the warning must contain)
    "latest_missing": (lambda c: (c / "latest").unlink(), 10, "`latest` pointer is missing"),
    "latest_empty": (lambda c: (c / "latest").write_text(""), 10, "latest: empty"),
    "latest_text_garbage": (lambda c: (c / "latest").write_text("hello world\n"), 10, "does not name a checkpoint"),
    "latest_binary_garbage": (lambda c: (c / "latest").write_bytes(b"\x00\xff\xfe\x80"), 10, "not text"),
    "latest_names_deleted_dir": (lambda c: shutil.rmtree(c / S10), 5, "names step_00000010, which does not exist"),
    "model_state_truncated": (lambda c: truncate(c / S10 / "state.pt"), 5, "step_00000010: state.pt: "),
    "model_state_corrupted": (lambda c: flip_byte(c / S10 / "state.pt"), 5, "state.pt: sha256 differs"),
    "extras_truncated": (lambda c: truncate(c / S10 / "extra_rank0.pt"), 5, "extra_rank0.pt: "),
    "extras_corrupted": (lambda c: flip_byte(c / S10 / "extra_rank0.pt"), 5, "extra_rank0.pt: sha256 differs"),
    "meta_json_garbage": (lambda c: (c / S10 / "meta.json").write_text("{"), 5, "meta.json: "),
    "manifest_missing": (lambda c: (c / S10 / MANIFEST).unlink(), 5, "no manifest.json (the save did not finish)"),
    "manifest_garbage": (lambda c: (c / S10 / MANIFEST).write_bytes(b"\x80garbage"), 5, "manifest.json: unreadable"),
    "planted_file": (lambda c: (c / S10 / "evil.pt").write_bytes(b"x"), 5, "evil.pt: not in the manifest"),
}


def resume_in_process(run_dir: Path, capsys, *overrides):
    from t2i_train.train import Trainer

    cfg = load_config(run_dir / "config.yaml", [f"run.output_dir={run_dir.parent}", "run.max_steps=12",
                                                *overrides])
    trainer = Trainer(cfg)
    return trainer.step, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_single_process_resume_skips_damage(trained, tmp_path, capsys, case):
    run = tmp_path / "runs" / "base"
    shutil.copytree(trained, run)
    damage, want_step, warning = DAMAGE[case]
    damage(run / "checkpoints")
    step, err = resume_in_process(run, capsys)
    assert step == want_step, err
    assert warning in err, err
    if want_step == 5 and case != "latest_names_deleted_dir":  # the damaged one is out of rotation, kept aside
        assert (run / "checkpoints" / "damaged" / S10).is_dir() and not (run / "checkpoints" / S10).exists()
    start = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()][-1]
    assert start["event"] == "start" and start["resumed_from"].endswith(f"step_{want_step:08d}")


def test_no_intact_checkpoint_refuses_to_start_over(trained, tmp_path, capsys):
    run = tmp_path / "runs" / "base"
    shutil.copytree(trained, run)
    for name in ("step_00000005", S10):
        truncate(run / "checkpoints" / name / "state.pt")
    with pytest.raises(ResumeError, match="no intact checkpoint.*step_00000005: state.pt.*checkpoint.resume=never"):
        resume_in_process(run, capsys)
    assert (run / "checkpoints" / S10).is_dir()  # nothing deleted
    step, _ = resume_in_process(run, capsys, "checkpoint.resume=never")
    assert step == 0


def test_explicit_resume_path_is_verified(trained, tmp_path, capsys):
    run = tmp_path / "runs" / "base"
    shutil.copytree(trained, run)
    step, _ = resume_in_process(run, capsys, f"checkpoint.resume={run / 'checkpoints' / 'step_00000005'}")
    assert step == 5
    flip_byte(run / "checkpoints" / "step_00000005" / "state.pt")
    with pytest.raises(ResumeError, match="step_00000005: state.pt: sha256 differs"):
        resume_in_process(run, capsys, f"checkpoint.resume={run / 'checkpoints' / 'step_00000005'}")


def test_size_only_verification_still_catches_truncation(trained, tmp_path):
    run = tmp_path / "runs" / "base"
    shutil.copytree(trained, run)
    ck = run / "checkpoints" / S10
    assert verify(ck, "size") is None and verify(ck, "sha256") is None
    flip_byte(ck / "state.pt")
    assert verify(ck, "size") is None and "sha256" in verify(ck, "sha256")
    truncate(ck / "state.pt")
    assert "state.pt" in verify(ck, "size")


def test_manifest_lists_every_file_with_its_digest(trained):
    ck = trained / "checkpoints" / S10
    manifest = json.loads((ck / MANIFEST).read_text())
    assert set(manifest["files"]) == {"state.pt", "extra_rank0.pt", "meta.json"}
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (ck / rel).stat().st_size and entry["sha256"] == sha256_file(ck / rel)


# ------------------------------------------------------------------------------------------ planted pickles

class _Plant:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _reseal(ck: Path) -> None:
    """What an attacker who can also rewrite the manifest would do: the manifest check passes."""
    manifest = json.loads((ck / MANIFEST).read_text())
    for rel in list(manifest["files"]):
        manifest["files"][rel] = {"size": (ck / rel).stat().st_size, "sha256": sha256_file(ck / rel)}
    (ck / MANIFEST).write_text(json.dumps(manifest))


def test_planted_pickle_is_rejected_by_the_manifest_and_never_runs(trained, tmp_path, capsys):
    run = tmp_path / "runs" / "base"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    torch.save({"step": 10, "x": _Plant(marker)}, run / "checkpoints" / S10 / "extra_rank0.pt")
    step, err = resume_in_process(run, capsys)
    assert step == 5 and "extra_rank0.pt" in err
    assert not marker.exists()


def test_own_loaders_refuse_a_resealed_planted_pickle(trained, tmp_path):
    from t2i_train.engine.backends import SingleBackend, TrainModule
    from t2i_train.models import build_model

    run = tmp_path / "runs" / "base"
    shutil.copytree(trained, run)
    ck = run / "checkpoints" / S10
    marker = tmp_path / "pwned"
    state = torch.load(ck / "state.pt", weights_only=True)
    state["x"] = _Plant(marker)
    torch.save(state, ck / "state.pt")
    _reseal(ck)
    assert verify(ck) is None
    cfg = load_config(run / "config.yaml")
    from t2i_train.diffusion import FlowObjective

    module = TrainModule(build_model("pixeldit_tiny_c2i"), FlowObjective({}, hidden_size=64))
    backend = SingleBackend(cfg, module, torch.device("cpu"))
    with pytest.raises(pickle.UnpicklingError):
        CheckpointManager(run, 3).load(ck, backend)
    assert not marker.exists()


def test_deepspeed_and_dcp_readers_refuse_planted_pickles(tmp_path):
    from t2i_train.engine.safe_load import SafeFileSystemReader, WeightsOnlyCheckpointEngine

    marker = tmp_path / "pwned"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": _Plant(marker)}, planted)
    engine = WeightsOnlyCheckpointEngine(inner=None)
    with pytest.raises(pickle.UnpicklingError, match="mp_rank_00_model_states.pt: refused"):
        engine.load(str(planted), map_location="cpu")
    clean = tmp_path / "clean.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, clean)
    assert torch.equal(engine.load(str(clean))["module"]["w"], torch.ones(2))

    dcp_dir = tmp_path / "dcp"
    dcp_dir.mkdir()
    with open(dcp_dir / ".metadata", "wb") as f:
        pickle.dump(_Plant(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="is not allowed in DCP metadata"):
        SafeFileSystemReader(dcp_dir).read_metadata()
    assert not marker.exists()


def test_dcp_metadata_of_a_real_save_loads_safely(tmp_path):
    import torch.distributed.checkpoint as dcp

    from t2i_train.engine.safe_load import SafeFileSystemReader, WeightsOnlyLoadPlanner

    state = {"w": torch.arange(6.0).reshape(2, 3), "hp": {"lr": 0.5, "betas": (0.9, 0.99), "step": 3}}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    meta = SafeFileSystemReader(tmp_path / "dcp").read_metadata()
    assert "w" in meta.state_dict_metadata
    out = {"w": torch.zeros(2, 3), "hp": {"lr": 0.0, "betas": (0.0, 0.0), "step": 0}}
    dcp.load(out, storage_reader=SafeFileSystemReader(tmp_path / "dcp"), planner=WeightsOnlyLoadPlanner(),
             no_dist=True)
    assert torch.equal(out["w"], state["w"]) and out["hp"] == state["hp"]


# ------------------------------------------------------------------------------------------ DeepSpeed, 2 ranks

RESUME_WORKER = """
import json, sys
from t2i_train.config import load_config
from t2i_train.engine import dist
from t2i_train.train import Trainer
out = {}
for path in sys.argv[2:]:
    t = Trainer(load_config(path))
    out[path] = {"step": t.step, "rank": dist.rank()}
    dist.barrier()
if dist.rank() == 0:
    open(sys.argv[1], "w").write(json.dumps(out))
dist.barrier()
dist.shutdown()
"""

DS_DAMAGE = {
    "latest_binary_garbage": (lambda c: (c / "latest").write_bytes(b"\xff\x00"), 10, "latest: not text"),
    "model_states_truncated": (lambda c: truncate(c / S10 / "deepspeed" / "mp_rank_00_model_states.pt"), 5,
                               "deepspeed/mp_rank_00_model_states.pt: "),
    "rank1_optimizer_corrupted": (lambda c: flip_byte(c / S10 / "deepspeed" /
                                                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"), 5,
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 differs"),
    "rank1_extras_truncated": (lambda c: truncate(c / S10 / "extra_rank1.pt"), 5, "extra_rank1.pt: "),
    "meta_json_garbage": (lambda c: (c / S10 / "meta.json").write_text("{"), 5, "meta.json: "),
    "manifest_missing": (lambda c: (c / S10 / MANIFEST).unlink(), 5, "no manifest.json"),
}


def _torchrun(tmp: Path, *args: str, timeout: int = 600):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), *args], env=env(),
                          cwd=tmp, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_deepspeed_two_ranks_resume_skips_damage(tmp_path):
    cfg = tiny_config(tmp_path, "zero2", name="deepspeed", zero_stage=2)
    r = _torchrun(tmp_path, "-m", "t2i_train.train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    base = tmp_path / "runs" / "zero2"
    manifest = json.loads((base / "checkpoints" / S10 / MANIFEST).read_text())
    assert {"extra_rank0.pt", "extra_rank1.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"} \
        <= set(manifest["files"])
    configs = []
    for case, (damage, _, _) in sorted(DS_DAMAGE.items()):
        run = tmp_path / "runs" / case
        shutil.copytree(base, run)
        damage(run / "checkpoints")
        configs.append(tiny_config(tmp_path, case, name="deepspeed", zero_stage=2))
    (tmp_path / "worker.py").write_text(RESUME_WORKER)
    r = _torchrun(tmp_path, str(tmp_path / "worker.py"), str(tmp_path / "out.json"), *map(str, configs))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    for case, (_, want_step, warning) in DS_DAMAGE.items():
        assert got[str(tmp_path / f"{case}.yaml")]["step"] == want_step, case
        start = [json.loads(l) for l in (tmp_path / "runs" / case / "events.jsonl").read_text().splitlines()][-1]
        assert start["resumed_from"].endswith(f"step_{want_step:08d}"), case
        assert any(warning in w for w in start["resume_warnings"]), (case, start["resume_warnings"])
