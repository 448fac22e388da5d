#!/usr/bin/env python3
"""Print the per-node launch command of a multi-node PixelDiT training job from the Slurm environment.

    python slurm/launch_cmd.py --launcher torchrun|deepspeed --hostfile PATH -- --config cfg.yaml [k=v ...]

torchrun: c10d rendezvous at the first host of SLURM_JOB_NODELIST (port MASTER_PORT, default 29500).
deepspeed: writes a hostfile (`host slots=G` per node) and starts this node's ranks with --no_ssh
(one `srun` task per node runs it; --node_rank from SLURM_NODEID).
No Slurm tool is needed: the node list is expanded here (`scontrol show hostnames` gives the same).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys


def expand_nodelist(spec: str) -> list[str]:
    """`gpu[01-03,07],login1` → ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (zero padding kept)."""
    hosts, i = [], 0
    parts = re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                for n in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def gpus_per_node(env) -> int:
    """Processes per node = GPUs on this node (one srun task per node starts them all, so the task count
    SLURM_NTASKS_PER_NODE is 1 and says nothing about it)."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        v = env.get(key)
        if v:
            return int(re.sub(r"^.*:", "", v.split("(")[0]))
    for key in ("SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        v = env.get(key)
        if v:
            return len([g for g in v.split(",") if g.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        n = 0
    if n:
        return n
    raise SystemExit("cannot tell how many GPUs this node has: request them with #SBATCH --gpus-per-node=N "
                     "(SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE) or set CUDA_VISIBLE_DEVICES")


def build(env, launcher: str, train_args: list[str], hostfile: str | None) -> tuple[list[str], str | None]:
    nodes = expand_nodelist(env["SLURM_JOB_NODELIST"])
    nnodes = int(env.get("SLURM_NNODES", len(nodes)))
    if nnodes != len(nodes):
        raise SystemExit(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST names {len(nodes)} hosts")
    gpus = gpus_per_node(env)
    head, port = nodes[0], env.get("MASTER_PORT", "29500")
    node_rank = env.get("SLURM_NODEID", "0")
    if launcher == "torchrun":
        cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={gpus}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint={head}:{port}", f"--rdzv_id={env.get('SLURM_JOB_ID', 'pixeldit')}",
               "-m", "t2i_train.train", *train_args]
        return cmd, None
    if launcher == "deepspeed":
        text = "".join(f"{h} slots={gpus}\n" for h in nodes)
        cmd = ["deepspeed", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node_rank}",
               f"--num_nodes={nnodes}", f"--num_gpus={gpus}", f"--master_addr={head}", f"--master_port={port}",
               "--module", "t2i_train.train", *train_args]
        return cmd, text
    raise SystemExit(f"--launcher must be torchrun or deepspeed, got {launcher!r}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    p.add_argument("--hostfile", default="hostfile")
    args = p.parse_args(own)
    if "SLURM_JOB_NODELIST" not in os.environ:
        raise SystemExit("SLURM_JOB_NODELIST is not set: run inside an sbatch allocation")
    cmd, hosts = build(os.environ, args.launcher, train_args, args.hostfile)
    if hosts is not None:
        with open(args.hostfile + ".tmp", "w") as f:
            f.write(hosts)
        os.replace(args.hostfile + ".tmp", args.hostfile)
    print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
