"""Resume under every backend, T2I and ImageNet, with AdamW: a run stopped at step 4 and resumed to step 6
logs the same losses as one that ran 6 steps straight.

The T2I model's last block has text-stream outputs that feed nothing (kept: the released checkpoints carry
them), so AdamW keeps no state for them; FSDP2's DCP resume used to fail on exactly those parameters.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_train_backends import BIN, PY, env, free_port

BACKENDS = {"single": {}, "ddp": {}, "zero2": {"name": "deepspeed", "zero_stage": 2}, "fsdp": {"name": "fsdp"}}
TASKS = {"t2i": "pixeldit_tiny_t2i", "c2i": "pixeldit_tiny_c2i"}

WORKER = """
import sys
from t2i_train.config import load_config
from t2i_train.train import Trainer
from t2i_train.engine import dist
for item in sys.argv[1:]:
    path, steps = item.split("@")
    trainer = Trainer(load_config(path, [f"run.max_steps={steps}"]))
    trainer.fit()
    trainer.close()  # as t2i-train's main does, before the next run and the shutdown
    del trainer
dist.barrier()
dist.shutdown()
"""


def write_config(tmp: Path, name: str, task: str, backend: str) -> Path:
    cfg = {
        "run": {"name": name, "output_dir": str(tmp / "runs"), "seed": 0, "max_steps": 6, "task": task},
        "model": {"spec": TASKS[task]},
        "objective": {"shift": 1.0},
        "data": {"source": "fixed", "fixed_image_size": 16, "fixed_num_samples": 4},
        "optim": {"name": "adamw", "lr": 1.0e-2},
        "backend": {"name": backend, "precision": "fp32", "micro_batch": 2, "grad_accum": 1,
                    **BACKENDS[backend], **({"micro_batch": 2, "grad_accum": 2} if backend == "single" else {})},
        "ema": {"decay": 0.9},
        "checkpoint": {"every": 2, "keep_last": 2},
        "logging": {"every": 1, "tqdm": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def train_and_resume(tmp: Path, backends: list[str]) -> Path:
    (tmp / "worker.py").write_text(WORKER)
    jobs = {"single": [], "multi": []}
    for task in TASKS:
        for backend in backends:
            resumed = write_config(tmp, f"{task}_{backend}", task, backend)
            straight = write_config(tmp, f"{task}_{backend}_straight", task, backend)
            jobs["single" if backend == "single" else "multi"] += [f"{resumed}@4", f"{resumed}@6", f"{straight}@6"]
    if jobs["single"]:
        r = subprocess.run([PY, str(tmp / "worker.py"), *jobs["single"]], env=env(), cwd=tmp, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    if jobs["multi"]:
        r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                            str(tmp / "worker.py"), *jobs["multi"]], env=env(), cwd=tmp, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return tmp / "runs"


def check_resume(runs: Path, task: str, backend: str) -> None:
    run_dir = runs / f"{task}_{backend}"
    starts = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert starts[0]["resumed_from"] is None
    assert starts[1]["resumed_from"].endswith("step_00000004")
    got, ref = losses(run_dir), losses(runs / f"{task}_{backend}_straight")
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - ref[s]) <= 1e-6 * abs(ref[s]) for s in ref), (got, ref)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return train_and_resume(tmp_path_factory.mktemp("resume_fsdp"), ["fsdp"])


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    return train_and_resume(tmp_path_factory.mktemp("resume"), ["single", "ddp", "zero2"])


@pytest.mark.parametrize("task", list(TASKS))
def test_fsdp_resume_repeats_the_straight_run(fsdp_runs, task):
    check_resume(fsdp_runs, task, "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["single", "ddp", "zero2"])
@pytest.mark.parametrize("task", list(TASKS))
def test_resume_repeats_the_straight_run(other_runs, task, backend):
    check_resume(other_runs, task, backend)
