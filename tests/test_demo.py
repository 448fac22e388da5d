"""The README's main job, `python -m t2i_train.demo --quick`, end to end in a scratch directory: shards through the
builder CLI, tiny Gemma-2/DINOv2, both stages under the deepspeed launcher, GenEval scores, the report."""
import json
import subprocess
import sys

import yaml
from PIL import Image

from data_pipeline.shard_index import read_index


def test_quick_demo_writes_scores_grids_and_report(tmp_path):
    r = subprocess.run([sys.executable, "-m", "t2i_train.demo", "--quick", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    runs, data, out = tmp_path / "runs", tmp_path / "data" / "demo", tmp_path / "runs" / "demo"
    # data went through the shard builder; the held-out prompts are GenEval metadata
    assert read_index(str(data / "shapes32"))["total"] == 256
    assert (data / "shapes32" / "build_stats.json").is_file()
    meta = [json.loads(x) for x in (data / "heldout" / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert {m["tag"] for m in meta} == {"single_object", "colors", "counting", "two_object", "color_attr", "position"}
    # the real code paths: a local Gemma-2 directory, a local timm DINOv2, deepspeed ZeRO-2 on 2 ranks
    cfg1 = yaml.safe_load((runs / "demo_shapes_stage1" / "config.yaml").read_text())
    assert cfg1["text"]["encoder"].endswith("gemma2-tiny") and cfg1["objective"]["repa_weight"] > 0
    assert cfg1["backend"]["name"] == "deepspeed" and cfg1["backend"]["zero_stage"] == 2
    assert json.loads((data / "encoders" / "gemma2-tiny" / "config.json").read_text())["model_type"] == "gemma2"
    start = [json.loads(x) for x in (runs / "demo_shapes_stage2" / "events.jsonl").read_text().splitlines()][0]
    assert start["world_size"] == 2 and start["init_from"].endswith("demo_shapes_stage1/export/ema")
    assert "RANDOM-INITIALISED" in r.stdout
    # validation grids during and after each stage
    for stage in ("demo_shapes_stage1", "demo_shapes_stage2"):
        assert len(list((runs / stage / "val").glob("step_*.png"))) >= 2, stage
    # GenEval summaries for the trained and the untrained model, every held-out prompt scored
    for model in ("demo_shapes_step0", "demo_shapes_stage2"):
        summary = json.loads((out / "geneval" / model / "summary.json").read_text())
        assert summary["prompts"] == len(meta) and 0.0 <= summary["overall"] <= 1.0
    # the report: table, loss plot, grids, commands; the console ends with the table and the path
    report = (out / "report.md").read_text()
    assert "| **overall** |" in report and "deepspeed --num_gpus 2" in report and "build_shards" in report
    assert "torchrun --nproc-per-node 2" in report  # GenEval generation split across both cores
    for png in ["loss.png"] + [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert Image.open(out / png).size[0] > 0, png
    assert r.stdout.rstrip().endswith(f"Report: {out / 'report.md'}")
    assert "| **overall** |" in r.stdout
