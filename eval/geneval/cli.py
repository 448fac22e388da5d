"""`t2i-eval geneval generate|score`."""
from __future__ import annotations

import argparse

from eval.geneval.metadata import METADATA_NAME, METADATA_SOURCE

_METADATA_HELP = f"GenEval's {METADATA_NAME} (from {METADATA_SOURCE})"


def _parse_range(text: str) -> slice:
    try:
        a, _, b = text.partition(":")
        return slice(int(a) if a else None, int(b) if b else None) if _ else slice(int(a), int(a) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompts must look like 0:100, 10: or 7, got {text!r}") from None


def cmd_generate(args) -> int:
    from eval.geneval.generate import generate_geneval
    from eval.geneval.metadata import load_metadata
    from eval.runner import generator_from_args
    from t2i_train.engine import dist

    entries = load_metadata(args.metadata)
    gen, cfg, h, w = generator_from_args(args)
    indices = list(range(len(entries)))[args.prompts] if args.prompts else None
    generate_geneval(gen, entries, args.metadata, args.out, cfg, h, w, n_samples=args.n_samples, seed=args.seed,
                     indices=indices, batch_size=args.batch_size, overwrite=args.overwrite, grid=args.grid,
                     progress=not args.no_progress)
    if dist.rank() == 0:
        print(f"GenEval images in {args.out} ({cfg.name}, {cfg.steps} steps, cfg {cfg.cfg_scale}, {h}x{w})")
    dist.shutdown()
    return 0


def cmd_score(args) -> int:
    from eval.geneval.score import score_folder_from_args

    return score_folder_from_args(args)


def add_parser(subparsers) -> None:
    from eval.runner import add_generation_args

    p = subparsers.add_parser("geneval", help="GenEval: object, count, colour and position compositionality",
                              description="GenEval (Ghosh et al. 2023): generate images for its 553 prompts, "
                                          "or score a folder in its layout.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    g = sub.add_parser("generate", help="checkpoint → <out>/<00000>/samples/0000.png …")
    g.add_argument("--metadata", required=True, help=_METADATA_HELP)
    g.add_argument("--out", required=True, help="output folder (the official layout)")
    g.add_argument("--n-samples", type=int, default=4, help="images per prompt (default: %(default)s)")
    g.add_argument("--prompts", type=_parse_range, help="only these prompt indices, Python slice style (0:10)")
    g.add_argument("--grid", action="store_true", help="also write <out>/<00000>/grid.png")
    add_generation_args(g, default_batch_size=4)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", help="images in the official layout → results.jsonl + summary")
    s.add_argument("images", help="folder in the official layout (<images>/<00000>/samples/*.png)")
    s.add_argument("--metadata", help=_METADATA_HELP + " — the full prompt set the folder must cover "
                                      "(default: the one recorded in <images>/generation.json, if any)")
    s.add_argument("--n-samples", type=int, help="images expected per prompt (default: generation.json's, else 4)")
    s.add_argument("--allow-incomplete", action="store_true",
                   help="score a folder that misses prompts or images (flagged in the table and the JSON)")
    s.add_argument("--results", help="per-image results JSONL (default: <images>/results.jsonl)")
    s.add_argument("--summary", help="summary JSON (default: <images>/summary.json)")
    s.add_argument("--detector", default="mask2former",
                   help="object detector: mask2former[:HUB_ID_OR_PATH] (transformers), mmdet:CONFIG,CKPT, "
                        "or shapes (the demo's synthetic shapes) (default: %(default)s)")
    s.add_argument("--clip", default="openai/clip-vit-large-patch14",
                   help="CLIP model for colours, hub id or local path (default: %(default)s)")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)
