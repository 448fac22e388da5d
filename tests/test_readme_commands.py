"""Every command the README's code blocks and the config headers show is run here, so the docs cannot drift.

Each documented command must match one rule of `RULES` (first match wins):
  ("train", how)   a `t2i_train.train` launch: resolved exactly as written at its launcher's world size (config,
                   overrides, the global-batch check), then run at toy scale (tiny model, synthetic data, 2 steps)
                   with the same backend and optimizer — `how` = "launch": under its own launcher on 2 ranks;
                   "toy": one process (backends that need a process group get a 1-rank one).
  ("dry", why)      a `t2i_train.train` launch resolved as written (no toy run: `why` names the one that covers it).
  ("sbatch", None) an sbatch script: its config resolved at the script's nodes × GPUs per node.
  ("run", extra)   run as written (console scripts as `python -m module`) in a scratch directory, with `extra`
                   arguments appended to bring it to toy scale.
  ("skip", why)    not runnable here (weights, GPUs, the user's own data, placeholders); `why` says what covers it.
A new command in the README (outside ```text blocks) or in a config's comments fails
`test_every_documented_command_is_registered` until it gets a rule.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
PROGRAMS = ("python", "t2i-", "torchrun", "deepspeed", "sbatch", "bash", ".venv/bin/", "source")

RULES: list[tuple[str, str, object]] = [
    (r"^bash scripts/bootstrap\.sh", "skip",
     "creates the venv and reinstalls the project (what CI runs); the demo is tests/test_demo.py"),
    (r"^\.venv/bin/python -m pytest", "skip", "the test suite itself"),
    (r"^t2i-convert ", "skip", "needs the released checkpoints (no download here); tests/test_models_convert.py "
                               "converts checkpoints in the official layout"),
    (r"^python -m t2i_train\.bench\.step", "skip", "a benchmark (minutes on CPU); tests/test_models.py counts its FLOPs"),
    (r"^t2i-build-shards ", "skip", "needs the user's images; tests/test_data_build.py builds every --kind"),
    (r"^t2i-sample --ckpt runs/t2i_1024/", "skip", "needs a trained 1.3B export and Gemma-2 weights; the demo form "
                                                   "is run below and tests/test_sample_cli.py samples with a tiny Gemma"),
    (r"^torchrun .*-m t2i_train\.sample \.\.\.", "skip", "placeholder arguments; tests/test_sample_cli.py runs "
                                                         "t2i-sample on two ranks"),
    (r"^t2i-sample --ckpt runs/demo_t2i_512/", "run", []),
    (r"^t2i-sample --ckpt weights/pixeldit_xl_512 |^t2i-sample \.\.\. --preset ", "skip",
     "needs the released 512² weights; the 256² form runs below and tests/test_recipe.py checks the presets"),
    (r"^torchrun .*-m eval ", "skip", "placeholder arguments; tests/test_eval_runner.py generates on two ranks"),
    (r"^t2i-memplan ", "skip", "a full-scale plan on the meta/fake device (about a minute per config); "
                               "tests/test_memplan.py runs the CLI and checks its estimate against measured peaks"),
    (r"^t2i-eval geneval ", "skip", "needs a trained export and Mask2Former/CLIP weights; "
                                    "tests/test_eval_geneval_e2e.py runs generate and score with tiny models"),
    (r"^t2i-eval dpg ", "skip", "needs a trained export, the ELLA prompts/CSV and VQA weights; "
                                "tests/test_eval_dpg_e2e.py runs generate and score with a tiny BLIP"),
    (r"^t2i-eval fid ", "skip", "needs the released ImageNet weights, the ADM reference batch and Inception weights; "
                                "tests/test_eval_fid_e2e.py runs generate (and, marked slow, score)"),
    (r"^t2i-sample --ckpt weights/pixeldit_xl_256 ", "run", ["--steps", "2", "--resolution", "32"]),
    (r"^python -m t2i_train\.tools\.flops ", "run", []),
    (r"^python -m data_pipeline\.synthetic ", "run", []),
    (r"^deepspeed .*--config configs/t2i_1024\.yaml backend\.grad_accum=8$", "dry",
     "the backend and optimizer of the t2i_512 command, which runs at toy scale"),
    (r"^torchrun --nproc_per_node 2 .*--config configs/demo/t2i_tiny_512\.yaml backend\.name=fsdp", "train", "launch"),
    (r"^(deepspeed|torchrun|python -m t2i_train\.train|t2i-train) ", "train", "toy"),
    (r"^sbatch slurm/\S+\.sbatch$", "sbatch", None),
]


# ------------------------------------------------------------------------------------------ extraction

def _split(line: str) -> list[str]:
    line = re.sub(r"\s+#\s.*$", "", line).strip()  # trailing comment
    return [c.strip() for c in re.split(r"\s+(?:;|&&)\s+|\s*;\s*$", line) if c.strip()]


def readme_commands(text: str) -> list[str]:
    out, block, info = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block, info = [], line[3:].strip()
            else:
                if info not in ("text", "yaml", "json", "python", "console"):
                    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(block))
                    for cmd_line in joined.splitlines():
                        if cmd_line.strip() and not cmd_line.strip().startswith("#"):
                            out += _split(cmd_line)
                block = None
            continue
        if block is not None:
            block.append(line)
    return out


def config_commands(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r"\s*#\s*(.*)$", line)
        if m and m.group(1).startswith(PROGRAMS):
            out += _split(m.group(1))
    return out


def documented() -> list[tuple[str, str]]:
    """(where, command) once per distinct command: the README first, then the configs' comments."""
    cmds = [("README.md", c) for c in readme_commands((REPO / "README.md").read_text())]
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        cmds += [(str(path.relative_to(REPO)), c) for c in config_commands(path)]
    seen: set[str] = set()
    return [(w, c) for w, c in cmds if not (c in seen or seen.add(c))]


def rule_for(cmd: str):
    for pattern, kind, detail in RULES:
        if re.search(pattern, cmd):
            return kind, detail
    return None


COMMANDS = documented()


def test_extraction_sees_the_known_commands():
    cmds = [c for _, c in COMMANDS]
    assert any(c.startswith("deepspeed --num_gpus 8 --module t2i_train.train --config configs/t2i_512.yaml")
               for c in cmds)
    assert "sbatch slurm/imagenet.sbatch" in cmds and "t2i-convert pixeldit_t2i_1024.pth weights/pixeldit_t2i_1024" \
        in cmds
    assert not any(c.startswith("t2i_train/") for c in cmds)  # the layout block is text
    assert readme_commands("```\nfoo a \\\n  b   # note\n```\n```text\nbar\n```") == ["foo a b"]


def test_every_documented_command_is_registered():
    missing = [f"{where}: {cmd}" for where, cmd in COMMANDS if rule_for(cmd) is None]
    assert not missing, ("documented commands without a rule in tests/test_readme_commands.py RULES "
                         "(run them at toy scale, or skip with a reason):\n" + "\n".join(missing))


# ------------------------------------------------------------------------------------------ running

def env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
                MASTER_ADDR="127.0.0.1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def console_scripts() -> dict[str, str]:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    lines = [l.strip() for l in cp["options.entry_points"]["console_scripts"].splitlines() if l.strip()]
    return {name.strip(): target.strip().split(":")[0] for name, target in (l.split("=") for l in lines)}


def as_python(argv: list[str]) -> list[str]:
    """`t2i-x ...` → `python -m module ...` (the console scripts of this tree); `python` → this interpreter."""
    scripts = console_scripts()
    if argv[0] in scripts:
        return [PY, "-m", scripts[argv[0]], *argv[1:]]
    if argv[0] == "python":
        return [PY, *argv[1:]]
    return argv


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_launch(argv: list[str]) -> tuple[str, int, list[str]]:
    """(launcher, world size, trainer arguments) of a documented training command."""
    def opt(names, default):
        for i, a in enumerate(argv):
            for n in names:
                if a == n:
                    return int(argv[i + 1])
                if a.startswith(n + "="):
                    return int(a.split("=", 1)[1])
        return default

    if argv[0] == "deepspeed":
        world = opt(["--num_gpus"], 1) * opt(["--num_nodes"], 1)
        return "deepspeed", world, argv[argv.index("--module") + 2:]
    if argv[0] == "torchrun":
        world = opt(["--nproc_per_node", "--nproc-per-node"], 1) * opt(["--nnodes"], 1)
        return "torchrun", world, argv[argv.index("-m") + 2:]
    if argv[0] == "python":
        return "python", 1, argv[3:]
    return "python", 1, argv[1:]


def toy_overrides(cfg) -> list[str]:
    task = cfg.run.task
    out = ["run.max_steps=2", f"model.spec=pixeldit_tiny_{task}", "model.overrides={}", "model.init_from=null",
           "model.activation_checkpointing=false", "objective.repa_weight=0.0", "data.source=loader",
           f"data.loader.datasets=[toydata/{task}]", "data.loader.resolution=32", "data.loader.bucket_mode=fixed",
           "data.loader.bucket_table=null", "data.loader.num_workers=0", "data.loader.shuffle_buffer=16",
           "backend.micro_batch=2", "backend.grad_accum=1", "backend.global_batch=null", "backend.precision=fp32",
           "backend.deepspeed_config=null", "checkpoint.every=1000", "checkpoint.export_every=0",
           "logging.report_to=none", "logging.val_every=0", "logging.val_prompts=[]", "logging.tqdm=false"]
    if task == "t2i":
        out += ["text.encoder=hash:32", "text.max_length=16"]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory laid out like the repository root (configs/, slurm/), with synthetic toy data in toydata/."""
    from data_pipeline.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("readme")
    for name in ("configs", "slurm"):
        (root / name).symlink_to(REPO / name)
    for mode in ("t2i", "c2i"):
        write_synthetic(str(root / "toydata" / mode), 16, seed=0, size=32, mode=mode)
    return root


def resolve_as_written(cmd: str):
    """The documented training command's config at its launcher's world size (the global-batch check included)."""
    from t2i_train.config import check_global_batch, load_config
    from t2i_train.train import parse_args

    launcher, world, train_argv = parse_launch(shlex.split(cmd))
    args = parse_args(train_argv)
    cfg = load_config(REPO / args.config, args.overrides)
    check_global_batch(cfg, world)
    return launcher, world, args, cfg


def run_train(cmd: str, how: str, cwd: Path, output_dir: str | None = None) -> None:
    launcher, world, args, cfg = resolve_as_written(cmd)
    import tempfile

    output_dir = output_dir or tempfile.mkdtemp(prefix="runs_", dir=cwd)  # each command its own run directories
    toy = list(args.overrides) + toy_overrides(cfg) + [f"run.output_dir={output_dir}"]
    if how == "launch":
        n = str(min(world, 2))
        head = {"deepspeed": [str(BIN / "deepspeed"), "--num_gpus", n, "--master_port", str(free_port()), "--module"],
                "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", n, "--master_port", str(free_port()), "-m"]}
        full = head[launcher] + ["t2i_train.train", "--config", args.config, *toy]
    else:
        full = [PY, "-m", "t2i_train.train", "--config", args.config, *toy]
    r = subprocess.run(full, env=env(), cwd=cwd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{cmd}\n" + r.stdout[-2000:] + r.stderr[-4000:]
    assert "[t2i-train] finished at step 2" in r.stdout, r.stdout[-2000:]
    assert "all_gather_into_tensor` is deprecated" not in r.stderr


def run_sbatch(cmd: str) -> None:
    from t2i_train.config import check_global_batch, load_config

    script = (REPO / shlex.split(cmd)[1]).read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", script).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", script).group(1))
    config = re.search(r'CONFIG="\$\{CONFIG:-([^}]+)\}"', script).group(1)
    cfg = load_config(REPO / config)
    check_global_batch(cfg, nodes * gpus)
    launcher = re.search(r'LAUNCHER="\$\{LAUNCHER:-([^}]+)\}"', script).group(1)
    assert (launcher == "deepspeed") == (cfg.backend.name == "deepspeed"), (config, launcher, cfg.backend.name)


def run_as_written(cmd: str, extra: list[str], cwd: Path) -> None:
    argv = shlex.split(cmd)
    if argv[0] == "t2i-sample":
        prepare_checkpoint(argv[argv.index("--ckpt") + 1], cwd)
    r = subprocess.run(as_python(argv) + list(extra), env=env(), cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{cmd}\n" + r.stdout[-2000:] + r.stderr[-4000:]


def prepare_checkpoint(ckpt: str, cwd: Path) -> None:
    """The export a sampling command names, at toy scale: the demo run (2 steps) or a tiny ImageNet model."""
    if (cwd / ckpt).exists():
        return
    if ckpt.startswith("runs/demo_t2i_512"):
        run_train("python -m t2i_train.train --config configs/demo/t2i_tiny_512.yaml", "toy", cwd, "runs")
        return
    import torch

    from t2i_train.models import build_model
    from t2i_train.models.io import save_pretrained

    torch.manual_seed(0)
    save_pretrained(build_model("pixeldit_tiny_c2i", num_classes=1000), cwd / ckpt)


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command(where, cmd, workdir):
    rule = rule_for(cmd)
    if rule is None:
        pytest.fail(f"{where}: unregistered command {cmd!r}")
    kind, detail = rule
    if kind == "skip":
        pytest.skip(detail)
    elif kind == "train":
        run_train(cmd, detail, workdir)
    elif kind == "dry":
        resolve_as_written(cmd)
    elif kind == "sbatch":
        run_sbatch(cmd)
    else:
        run_as_written(cmd, detail, workdir)


def test_the_global_batch_error_is_one_line(workdir):
    """The README's old form (no accumulation for one node) fails as one line naming the fix, not a traceback."""
    r = subprocess.run([PY, "-m", "t2i_train.train", "--config", "configs/t2i_512.yaml"], env=env(), cwd=workdir,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "t2i-train: config error: backend.global_batch: 1024 != micro_batch 16 × grad_accum 1 × world size 1" \
        in r.stderr
