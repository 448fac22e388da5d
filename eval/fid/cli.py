"""`t2i-eval fid generate|score`: ImageNet FID / sFID / IS / precision / recall by the ADM protocol.

    t2i-eval fid generate --ckpt imagenet256/export --out fid/ours [--preset 256-ep320] [--num 50000]
    torchrun --nproc-per-node 8 -m eval fid generate ...                     # split across ranks
    t2i-eval fid score VIRTUAL_imagenet256_labeled.npz fid/ours/samples_50000x256x256x3.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth [--also-torch-fidelity] [--also-clean-fid]

Reference batches: ADM's (https://github.com/openai/guided-diffusion/tree/main/evaluations), e.g.
VIRTUAL_imagenet256_labeled.npz and VIRTUAL_imagenet512.npz.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .inception import WEIGHTS_NAME, WEIGHTS_URL
from .presets import DEFAULT_FOR_RESOLUTION, PRESETS, sampler_overrides


def _generate(args) -> int:
    import dataclasses

    from eval.runner import generator_from_args
    from t2i_train.engine import dist

    from .generate import generate

    gen, cfg, h, w = generator_from_args(args)
    if args.preset and not (args.height or args.width):
        h = w = PRESETS[args.preset]["resolution"]
    preset = args.preset or DEFAULT_FOR_RESOLUTION.get(h)  # None at other sizes: the runner's defaults
    if preset:  # the preset's sampler, then the explicit flags on top
        flags = dict(name=args.sampler, steps=args.steps, cfg_scale=args.cfg, shift=args.shift,
                     cfg_interval=tuple(args.interval) if args.interval else None)
        cfg = dataclasses.replace(cfg, **{**sampler_overrides(preset),
                                          **{k: v for k, v in flags.items() if v is not None}})
    out = generate(gen, args.out, cfg, h, w, num=args.num, seed=args.seed, batch_size=args.batch_size,
                   overwrite=args.overwrite, preset=preset, progress=not args.no_progress)
    if dist.rank() == 0:
        print(f"ImageNet FID batch: {out} ({args.num} samples {h}x{w}, preset {preset}, {cfg.name} "
              f"{cfg.steps} steps, cfg {cfg.cfg_scale} on {cfg.cfg_interval}, shift {cfg.shift})")
    dist.shutdown()
    return 0


def _score(args) -> int:
    import torch

    from data_pipeline.shard_index import write_json_atomic

    from .evaluate import evaluate, format_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate(args.ref, args.sample, args.inception_weights, device=device, batch_size=args.batch_size,
                      also_clean_fid=args.also_clean_fid, also_torch_fidelity=args.also_torch_fidelity,
                      save_activations=args.save_activations, progress=not args.no_progress)
    out = args.report or args.sample.with_name(args.sample.stem + "_fid.json")
    write_json_atomic(str(out), report)
    print(format_report(report))
    print(f"report: {out}")
    return 0


def add_parser(subparsers) -> None:
    fid = subparsers.add_parser("fid", help="ImageNet FID / sFID / IS / precision / recall (ADM protocol)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = fid.add_subparsers(dest="action", metavar="ACTION", required=True)

    from eval.runner import add_generation_args

    gen = sub.add_parser("generate", help="class-balanced samples packed into an ADM .npz batch")
    gen.add_argument("--out", required=True, type=Path, help="output folder")
    gen.add_argument("--num", type=int, default=50_000, help="number of samples; image k has class k mod num_classes (default: %(default)s)")
    gen.add_argument("--preset", choices=sorted(PRESETS),
                     help="the paper's sampler settings for a checkpoint (default: 256-ep320 at 256², 512 at 512²); "
                          "--sampler/--steps/--cfg/--interval/--shift override its fields")
    add_generation_args(gen)
    gen.set_defaults(func=_generate)

    score = sub.add_parser("score", help="ADM evaluator numbers for a sample batch against a reference batch")
    score.add_argument("ref", type=Path, help="ADM reference batch .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    score.add_argument("sample", type=Path, help="sample batch .npz (arr_0 uint8 [N, H, W, 3])")
    score.add_argument("--inception-weights", required=True, type=Path,
                       help=f"local {WEIGHTS_NAME} (torch-fidelity's TF-exact Inception; from {WEIGHTS_URL})")
    score.add_argument("--batch-size", type=int, default=64, help="Inception batch size (default: %(default)s)")
    score.add_argument("--device", help="default: cuda when available, else cpu")
    score.add_argument("--also-torch-fidelity", action="store_true", help="also print torch-fidelity's FID")
    score.add_argument("--also-clean-fid", action="store_true",
                       help="also print clean-fid's FID (needs clean-fid installed and its Inception weights)")
    score.add_argument("--save-activations", type=Path, help="folder for the Inception activations (.npz)")
    score.add_argument("--report", type=Path, help="report JSON (default: SAMPLE_fid.json beside the batch)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(func=_score)
