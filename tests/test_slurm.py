"""Slurm launchers: shell syntax, node-list expansion, and the launch commands generated from a fake Slurm env."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_headers_requeue_and_signal(script):
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    config = text.split('CONFIG="${CONFIG:-')[1].split("}")[0]
    assert (REPO / config).is_file(), config
    assert "source slurm/common.sh" in text


def _run(env_extra, *args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra)
    r = subprocess.run([sys.executable, str(REPO / "slurm" / "launch_cmd.py"), *args], env=env, cwd=cwd,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout.strip())


FAKE = {"SLURM_JOB_NODELIST": "gpu[007-009],login2", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_ID": "4242", "SLURM_NODEID": "2", "MASTER_PORT": "31000"}


def test_expand_nodelist():
    sys.path.insert(0, str(REPO / "slurm"))
    try:
        from launch_cmd import expand_nodelist
    finally:
        sys.path.pop(0)
    assert expand_nodelist("gpu[007-009],login2") == ["gpu007", "gpu008", "gpu009", "login2"]
    assert expand_nodelist("a[1,3-4]b,c") == ["a1b", "a3b", "a4b", "c"]
    assert expand_nodelist("node5") == ["node5"]


def test_torchrun_rendezvous_command(tmp_path):
    cmd = _run(FAKE, "--launcher", "torchrun", "--", "--config", "configs/imagenet256_xl.yaml", "run.seed=3",
               cwd=tmp_path)
    assert cmd[0] == "torchrun"
    assert "--nnodes=4" in cmd and "--nproc_per_node=8" in cmd and "--rdzv_backend=c10d" in cmd
    assert "--rdzv_endpoint=gpu007:31000" in cmd and "--rdzv_id=4242" in cmd
    assert cmd[-5:] == ["-m", "t2i_train.train", "--config", "configs/imagenet256_xl.yaml", "run.seed=3"]


def test_deepspeed_hostfile_command(tmp_path):
    cmd = _run(FAKE, "--launcher", "deepspeed", "--hostfile", "hf", "--", "--config", "configs/t2i_512.yaml",
               cwd=tmp_path)
    assert cmd[0] == "deepspeed" and "--no_ssh" in cmd and "--node_rank=2" in cmd
    assert "--num_nodes=4" in cmd and "--num_gpus=8" in cmd and "--master_addr=gpu007" in cmd
    assert cmd[cmd.index("--module") + 1] == "t2i_train.train"
    assert (tmp_path / "hf").read_text().splitlines() == ["gpu007 slots=8", "gpu008 slots=8", "gpu009 slots=8",
                                                          "login2 slots=8"]


def test_node_count_mismatch_is_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(FAKE, SLURM_NNODES="3")
    r = subprocess.run([sys.executable, str(REPO / "slurm" / "launch_cmd.py")], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "SLURM_NNODES=3" in r.stderr


def test_common_sh_with_fake_srun_launches_and_requeues(tmp_path):
    """Run common.sh with stub srun/scontrol: it launches one task per node and, after USR1, requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\n"
                                  "for a in \"$@\"; do last=\"$a\"; done\n"
                                  "if [[ \"$*\" == *--overlap* ]]; then echo overlap >> \"$LOG\"; exit 0; fi\n"
                                  "echo \"srun $*\" >> \"$LOG\"\n"
                                  "export SLURM_NODEID=0; bash -c \"$last\" >> \"$LOG\" 2>&1\n"
                                  "sleep 2\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"scontrol $*\" >> \"$LOG\"\n")
    (bin_dir / "torchrun").write_text("#!/bin/bash\necho \"torchrun-called $*\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    (tmp_path / "slurm").symlink_to(REPO / "slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(FAKE, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", LOG=str(log),
               CONFIG="configs/imagenet256_xl.yaml", RUN_DIR=str(tmp_path / "run"), SLURM_SUBMIT_DIR=str(tmp_path))
    p = subprocess.Popen(["bash", str(REPO / "slurm" / "common.sh")], env=env, cwd=tmp_path)
    import time

    time.sleep(1.0)
    p.send_signal(__import__("signal").SIGUSR1)
    assert p.wait(timeout=30) == 0
    text = log.read_text()
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1" in text
    assert "torchrun-called --nnodes=4" in text and "--rdzv_endpoint=gpu007:" in text
    assert "overlap" in text and "scontrol requeue 4242" in text


def test_processes_per_node_come_from_the_gpu_count(tmp_path):
    env = {k: v for k, v in FAKE.items() if k != "SLURM_GPUS_ON_NODE"}
    env.update(SLURM_NTASKS_PER_NODE="1", CUDA_VISIBLE_DEVICES="0,1,2,3")
    cmd = _run(env, "--launcher", "torchrun", "--", "--config", "c.yaml", cwd=tmp_path)
    assert "--nproc_per_node=4" in cmd
    env.update(SLURM_GPUS_PER_NODE="gpu:2")
    assert "--nproc_per_node=2" in _run(env, "--launcher", "torchrun", "--", "--config", "c.yaml", cwd=tmp_path)


def test_common_sh_derives_run_dir_from_the_config_and_uses_the_venv(tmp_path):
    """No RUN_DIR given: the USR1 forwarder looks for pid files in the config's run directory; the repository's
    .venv is activated, so its launcher is used whatever PATH says."""
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    (venv_bin / "python").symlink_to(sys.executable)
    (venv_bin / "torchrun").write_text("#!/bin/bash\necho \"venv-torchrun $*\"\n")
    (venv_bin / "srun").write_text("#!/bin/bash\n"
                                   "for a in \"$@\"; do last=\"$a\"; done\n"
                                   "if [[ \"$*\" == *--overlap* ]]; then echo \"overlap $*\" >> \"$LOG\"; exit 0; fi\n"
                                   "export SLURM_NODEID=0; bash -c \"$last\" >> \"$LOG\" 2>&1\n"
                                   "sleep 2\n")
    (venv_bin / "scontrol").write_text("#!/bin/bash\necho \"scontrol $*\" >> \"$LOG\"\n")
    for f in venv_bin.iterdir():
        if f.name not in ("activate", "python"):
            f.chmod(0o755)
    (tmp_path / "slurm").symlink_to(REPO / "slurm")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "t2i_train").symlink_to(REPO / "t2i_train")
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(FAKE, PATH="/usr/bin:/bin", LOG=str(log), CONFIG="configs/imagenet512_xl.yaml",
               EXTRA_ARGS="run.name=ft", SLURM_SUBMIT_DIR=str(tmp_path))
    env.pop("PYTHONPATH", None)
    p = subprocess.Popen(["bash", str(REPO / "slurm" / "common.sh")], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:  # srun has started: the USR1 trap is in place
        time.sleep(0.1)
    p.send_signal(__import__("signal").SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    text = log.read_text()
    assert "run directory runs/ft" in out
    assert "venv-torchrun --nnodes=4" in text and "run.name=ft" in text
    assert "runs/ft/pids/" in text, text
