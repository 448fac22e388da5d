"""CPU end-to-end demo on built-in synthetic data: shards → T2I stage 512 → stage 1024 → samples, and the
ImageNet recipe on the same engine.

    python -m t2i_train.demo [--skip-imagenet] [--python PY]

Every stage is a real command a user would run (the same CLIs, the same configs under configs/demo/), so
the demo doubles as a smoke test of the whole flow. Stages are resumable: re-running skips finished data,
and the trainer resumes from the run directory's `latest` checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, cwd: Path) -> None:
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    tail = "\n".join(proc.stdout.strip().splitlines()[-6:])
    print(tail)
    if proc.returncode:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}); full output in {log}")
    print(f"  ({time.time() - t0:.0f} s)")


def shards_exist(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*.tar"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t2i_train.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-imagenet", action="store_true", help="only the text-to-image chain")
    ap.add_argument("--num-images", type=int, default=256, help="synthetic training images per dataset")
    ap.add_argument("--steps", type=int, default=800, help="training steps of the 512 stage and of ImageNet")
    ap.add_argument("--workdir", default=str(ROOT),
                    help="where data/ and runs/ are written (default: the repository root)")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    py = args.python
    work = Path(args.workdir).resolve()
    cfg = lambda name: str(ROOT / "configs" / "demo" / name)  # noqa: E731
    out = work / "runs" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    print(f"PixelDiT CPU demo — full log: {log}")

    t2i_data = work / "data" / "demo" / "t2i"
    if not shards_exist(t2i_data):
        run([py, "-m", "data_pipeline.synthetic", "--out", str(t2i_data), "--num", str(args.num_images),
             "--size", "32", "--mode", "t2i"], log, work)
    longer = [f"run.max_steps={args.steps}", f"checkpoint.every={max(args.steps // 4, 1)}",
              f"logging.val_every={max(args.steps // 2, 1)}"]
    run([py, "-m", "t2i_train.train", "--config", cfg("t2i_tiny_512.yaml"), *longer], log, work)
    run([py, "-m", "t2i_train.train", "--config", cfg("t2i_tiny_1024.yaml"),
         f"run.max_steps={max(args.steps // 4, 1)}"], log, work)
    prompts = ["a photo of a red circle", "a photo of two blue squares",
               "a photo of a green triangle left of a yellow circle"]
    sample_cmd = [py, "-m", "t2i_train.sample", "--ckpt", "runs/demo_t2i_1024/export/ema",
                  "--out", str(out / "samples_t2i"), "--height", "48", "--width", "48", "--steps", "20",
                  "--cfg", "3.0", "--images-per-prompt", "2", "--text-encoder", "hash:32", "--no-progress"]
    for p in prompts:
        sample_cmd += ["--prompt", p]
    run(sample_cmd, log, work)

    if not args.skip_imagenet:
        c2i_data = work / "data" / "demo" / "c2i"
        if not shards_exist(c2i_data):
            run([py, "-m", "data_pipeline.synthetic", "--out", str(c2i_data), "--num", str(args.num_images),
                 "--size", "32", "--mode", "c2i"], log, work)
        # the ImageNet recipe's lr/clip step-down, placed at 3/4 of the demo run
        step_down = f"optim.step_downs=[{{step: {3 * args.steps // 4}, lr: 1.0e-4, clip: 0.5}}]"
        run([py, "-m", "t2i_train.train", "--config", cfg("imagenet_tiny.yaml"), *longer, step_down], log, work)
        run([py, "-m", "t2i_train.sample", "--ckpt", "runs/demo_imagenet/export/ema", "--out",
             str(out / "samples_c2i"), "--classes", "0,1,2", "--height", "32", "--width", "32", "--steps", "20",
             "--images-per-prompt", "2", "--no-progress"], log, work)

    print("\nDemo finished. Outputs:")
    summary = {"log": str(log), "runs": {}}
    for d in ["runs/demo_t2i_512", "runs/demo_t2i_1024", "runs/demo_imagenet", "runs/demo/samples_t2i",
              "runs/demo/samples_c2i"]:
        p = work / d
        if not p.exists():
            continue
        line = f"  {p}/"
        metrics = p / "metrics.jsonl"
        if metrics.exists():
            losses = [json.loads(x)["loss"] for x in metrics.read_text().splitlines() if '"loss"' in x]
            if losses:
                summary["runs"][d] = {"first_loss": losses[0], "last_loss": losses[-1]}
                line += f"  loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        print(line)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
