"""`t2i-eval`: one subcommand per benchmark, each with `generate` (checkpoint → images) and `score` (images → numbers).

    t2i-eval geneval generate --ckpt runs/t2i_512/export/ema --out geneval/ours
    t2i-eval geneval score geneval/ours
    torchrun --nproc-per-node 8 -m eval geneval generate ...     # generation split across ranks

Generation and scoring are separate, so images made by any other tool can be scored.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# benchmark packages; each exposes `add_parser(subparsers)` whose parser sets `func(args) -> int`
BENCHMARKS = ("eval.geneval.cli", "eval.dpg_bench.cli", "eval.fid.cli")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for module in BENCHMARKS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue  # that benchmark is not in this tree
            raise
        mod.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
