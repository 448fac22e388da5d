"""`t2i-eval dpg generate|score`.

    t2i-eval dpg generate --ckpt runs/t2i_512/export/ema --prompts ELLA/dpg_bench/prompts --out dpg/ours
    t2i-eval dpg score dpg/ours --csv ELLA/dpg_bench/dpg_bench.csv [--official-compat] [--vqa transformers]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .prompts import PROMPTS_SOURCE, read_prompts
from .questions import CSV_SOURCE
from .vqa import BACKENDS, MPLUG_MODEL, TRANSFORMERS_MODEL


def _generate(args) -> int:
    from eval.runner import generator_from_args
    from t2i_train.engine import dist

    from .generate import generate

    prompts = read_prompts(args.prompts)
    if args.limit:
        prompts = dict(sorted(prompts.items())[:args.limit])
    gen, cfg, h, w = generator_from_args(args)
    tiles = generate(gen, prompts, args.out, cfg, h, w, seed=args.seed, batch_size=args.batch_size,
                     overwrite=args.overwrite, progress=not args.no_progress)
    if dist.rank() == 0:
        print(f"DPG-Bench: {len(tiles)} tiles of 2x2 {h}x{w} images in {args.out}")
    dist.shutdown()
    return 0


def _score(args) -> int:
    import torch

    from data_pipeline.shard_index import write_json_atomic

    from .evaluate import evaluate, format_report
    from .vqa import build_vqa

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vqa = build_vqa(args.vqa, args.vqa_model, device=device, dtype=args.vqa_dtype)
    report = evaluate(args.images, args.csv, vqa, official_compat=args.official_compat,
                      allow_incomplete=args.allow_incomplete, progress=not args.no_progress)
    out = args.report or Path(args.images) / ("dpg_report_official_compat.json" if args.official_compat
                                              else "dpg_report.json")
    write_json_atomic(str(out), report)
    print(format_report(report))
    print(f"report: {out}")
    return 0


def add_parser(subparsers) -> None:
    dpg = subparsers.add_parser("dpg", help="DPG-Bench (dense prompts, VQA-scored)", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = dpg.add_subparsers(dest="action", metavar="ACTION", required=True)

    from eval.runner import add_generation_args

    gen = sub.add_parser("generate", help="4 images per prompt, tiled 2x2 into OUT/<item_id>.png")
    gen.add_argument("--prompts", required=True, type=Path, help=f"the prompt folder: {PROMPTS_SOURCE}")
    gen.add_argument("--out", required=True, type=Path, help="output folder")
    gen.add_argument("--limit", type=int, help="only the first N prompts (sorted by item id): a smoke test")
    add_generation_args(gen)
    gen.set_defaults(func=_generate)

    score = sub.add_parser("score", help="VQA-score a folder of 2x2 tiles")
    score.add_argument("images", type=Path, help="folder of <item_id>.png 2x2 tiles")
    score.add_argument("--csv", required=True, type=Path, help=f"the question CSV: {CSV_SOURCE}")
    score.add_argument("--official-compat", action="store_true",
                       help="reproduce the official script's quirks (first CSV row skipped; categories from the "
                            "last crop's raw answers) to compare with published numbers")
    score.add_argument("--vqa", choices=BACKENDS, default="auto",
                       help="auto = mplug when modelscope is installed, else transformers (default: %(default)s)")
    score.add_argument("--vqa-model", help=f"model id or local path (default: {MPLUG_MODEL} for mplug, "
                                           f"{TRANSFORMERS_MODEL} for transformers)")
    score.add_argument("--vqa-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="transformers backend weights dtype (default: %(default)s)")
    score.add_argument("--device", help="default: cuda when available, else cpu")
    score.add_argument("--allow-incomplete", action="store_true",
                       help="score even when some items have no image (the report is flagged)")
    score.add_argument("--report", type=Path, help="report JSON (default: IMAGES/dpg_report[_official_compat].json)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(func=_score)
