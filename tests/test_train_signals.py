"""Pre-emption: SIGUSR1 (Slurm's warning signal) or SIGTERM makes the trainer checkpoint at the end of the step
and exit 0; the next launch resumes from `latest` automatically and finishes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_checkpoints_and_resume_finishes(tmp_path, sig):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
run: {{name: pre, output_dir: {tmp_path}/runs, max_steps: 100000}}
model: {{spec: pixeldit_tiny_c2i}}
data: {{source: fixed, fixed_image_size: 16, fixed_num_samples: 4}}
backend: {{name: single, precision: fp32, micro_batch: 2}}
checkpoint: {{every: 100000}}
logging: {{every: 1, tqdm: false}}
""")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "t2i_train.train", "--config", str(cfg)]
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "pre"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    events = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["status"] == f"stopped by signal {int(sig)}"
    stopped_at = events[-1]["step"]
    assert 0 < stopped_at < 100000
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert not (run / "export").exists()  # stopped, not finished: no export yet

    r = subprocess.run(cmd + [f"run.max_steps={stopped_at + 3}"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()]
    start = [e for e in events if e["event"] == "start"][-1]
    assert start["resumed_from"].endswith(f"step_{stopped_at:08d}")
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]
    assert (run / "export" / "ema" / "model.safetensors").is_file()
