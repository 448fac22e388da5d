"""`runs/demo/report.md` for the CPU demo: held-out GenEval scores (trained vs untrained), grids, loss curves,
speed per stage and the exact commands. Reads only what the steps wrote (run directories, GenEval summaries)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from eval.geneval.metadata import TAG_TITLES

STAGES = ("demo_shapes_stage1", "demo_shapes_stage2")
DEMO_ENV = "OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline"
MODELS = {"untrained": "demo_shapes_step0", "trained": "demo_shapes_stage2"}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (did the stage run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def score_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one row per GenEval category, one column per model."""
    names = list(summaries)
    rows = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for tag, title in TAG_TITLES.items():
        cells = []
        for n in names:
            t = summaries[n]["tags"].get(tag)
            cells.append(f"{t['score']:.2f} ({t['correct']}/{t['images']})" if t else "—")
        if any(c != "—" for c in cells):
            rows.append(f"| {title} | " + " | ".join(cells) + " |")
    rows.append("| **overall** | " + " | ".join(f"**{summaries[n]['overall']:.3f}**" for n in names) + " |")
    return "\n".join(rows)


def flow_loss(rows: list[dict], repa_weight: float) -> list[float]:
    """The velocity MSE alone: the logged loss is MSE + λ·REPA (a negative cosine)."""
    return [r["loss"] - repa_weight * r.get("repa_loss", 0.0) for r in rows]


def plot_losses(metrics: dict[str, list[dict]], repa_weights: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    offset = 0
    for name, rows in metrics.items():
        steps = [offset + r["step"] for r in rows]
        ax.plot(steps, flow_loss(rows, repa_weights[name]), ".-", label=f"{name} flow MSE")
        repa = [(offset + r["step"], r["repa_loss"]) for r in rows if "repa_loss" in r]
        if repa:
            ax.plot(*zip(*repa), ".--", alpha=0.6, label=f"{name} REPA (−cos)")
        offset = steps[-1] if steps else offset
    ax.set_xlabel("step (stage 2 continues stage 1's count)")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=0.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def stage_seconds(run_dir: Path) -> float | None:
    """Wall time of a finished stage: from its resolved config (written at start) to its EMA export."""
    start, end = run_dir / "config.yaml", run_dir / "export" / "ema" / "model.safetensors"
    return end.stat().st_mtime - start.stat().st_mtime if start.is_file() and end.is_file() else None


def stage_speed(rows: list[dict]) -> float:
    """Mean samples/s over the logged windows (the first window includes start-up)."""
    rates = [r["samples_per_s"] for r in rows[1:] or rows]
    return sum(rates) / len(rates) if rates else float("nan")


def write_report(work: Path, out: Path, steps: list[dict], *, quick: bool, total_seconds: float) -> tuple[Path, str]:
    runs = work / "runs"
    summaries = {label: json.loads((out / "geneval" / model / "summary.json").read_text())
                 for label, model in MODELS.items()}
    table = score_table(summaries)
    metrics = {name: read_metrics(runs / name) for name in STAGES}
    configs = {name: _run_config(runs / name) for name in STAGES}
    repa = {name: float(configs[name]["objective"]["repa_weight"]) for name in STAGES}
    plot_losses({"stage 1": metrics[STAGES[0]], "stage 2": metrics[STAGES[1]]},
                {"stage 1": repa[STAGES[0]], "stage 2": repa[STAGES[1]]}, out / "loss.png")

    grids = []
    for name in STAGES:
        for png in sorted((runs / name / "val").glob("step_*.png")):
            dst = out / f"{name}_{png.name}"
            shutil.copyfile(png, dst)
            grids.append((name, png.stem, dst.name))
    for label, model in MODELS.items():
        grid = out / "geneval" / model / "00004" / "grid.png"
        if grid.is_file():
            shutil.copyfile(grid, out / f"geneval_{label}_colors.png")

    val_prompts = [str(p) for p in configs[STAGES[0]]["logging"]["val_prompts"]]
    lines = [f"# PixelDiT CPU demo report{' (quick mode: a smoke test, not the tuned demo)' if quick else ''}", "",
             "Held-out GenEval (`python -m eval geneval score --detector shapes`): prompts whose attribute "
             "combinations never occur in a training caption (colour×shape, count×shape, shape pairs, "
             "shape×relation×shape; single-object prompts have nothing to combine). *untrained* = stage 1's "
             "config at step 0, sampled and scored the same way.", "", table, "",
             "## Training", "", "| stage | steps | wall time (launch to export) | samples/s (2 ranks) | flow MSE first → last |",
             "|---|---:|---:|---:|---|"]
    for name in STAGES:
        rows = metrics[name]
        t = stage_seconds(runs / name)
        mse = flow_loss(rows, repa[name])
        lines.append(f"| {name} | {rows[-1]['step']} | {_fmt_s(t)} | {stage_speed(rows):.1f} | "
                     f"{mse[0]:.4f} → {mse[-1]:.4f} |")
    lines += ["", f"Whole demo: {_fmt_s(total_seconds)} wall (steps already done on an earlier run are not "
                  "counted).", "", "![losses](loss.png)", "", "## Validation grids (EMA weights)", "",
              "Prompts, row by row: " + "; ".join(f"{i + 1}. *{p}*" for i, p in enumerate(val_prompts)), ""]
    for name, step, file in grids:
        lines += [f"**{name} {step}**", "", f"![{name} {step}]({file})", ""]
    if (out / "geneval_trained_colors.png").is_file():
        lines += ["## Held-out GenEval samples (the 'colors' prompt 4)", "",
                  "untrained ![untrained](geneval_untrained_colors.png) trained ![trained](geneval_trained_colors.png)",
                  ""]
    lines += ["## Commands (run from the work directory, in this order)", "",
              f"Environment of every step: `{DEMO_ENV}`, with the repository root on `PYTHONPATH`.", "", "```"]
    lines += [f"{s['cmd']}" + ("" if s["seconds"] is None else f"    # {s['seconds']:.0f} s") for s in steps]
    lines += ["```", ""]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report, table


def _run_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _fmt_s(seconds) -> str:
    if seconds is None:
        return "(skipped)"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
