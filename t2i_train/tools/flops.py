"""Count the FLOPs of one PixelDiT forward pass on the `meta` device (no memory, no weights).

    python -m t2i_train.tools.flops --preset pixeldit_xl --height 1024 --width 1024
    python -m t2i_train.tools.flops --config configs/t2i_1024.yaml --text-tokens 300   # at the config's resolution

Counting is torch.utils.flop_counter.FlopCounterMode: matrix products and attention, a multiply-add = 2
FLOPs; element-wise work is not counted (the convention of the paper's Table 16). The count is that of the
nominal architecture: the pixel blocks' shift fold (an exact rewrite that skips work, models.blocks.PiTBlock)
is switched off while counting, so MFU is never inflated by it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models import build_model, model_config

DEFAULT_SIDE = 256


def count_forward_flops(model, height: int, width: int, batch: int = 1, text_tokens: int | None = None,
                        backward: bool = False, nominal: bool = True) -> int:
    """FLOPs of one forward (or forward+backward) of `model` at the given size, on the model's device.

    nominal=True counts the architecture as the paper does (PixelDiT.nominal_flops: the pixel blocks' shift
    fold off); nominal=False counts what the model executes, which can be fewer FLOPs."""
    device = next(model.parameters()).device
    x = torch.zeros(batch, model.in_channels, height, width, device=device)
    t = torch.full((batch,), 0.5, device=device)
    mask = None
    if model.is_t2i:
        n = text_tokens or model.config["txt_len"]
        cond = torch.zeros(batch, n, model.config["txt_dim"], device=device)
        mask = torch.ones(batch, n, dtype=torch.bool, device=device) if model.config["use_text_mask"] else None
    else:
        cond = torch.zeros(batch, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    nominal_ctx = model.nominal_flops() if nominal else contextlib.nullcontext()
    with counter, nominal_ctx:
        if backward:
            model(x, t, cond, mask).float().sum().backward()
        else:
            with torch.no_grad():
                model(x, t, cond, mask)
    return counter.get_total_flops()


def _load_run(path: str) -> tuple[dict, int]:
    """The model a run YAML trains, resolved like the trainer does (`extends:`, spec + overrides), and the
    side of its training images (the loader's resolution, or the fixed source's image size)."""
    from ..config import load_config
    from ..engine.run_info import training_resolutions

    cfg = load_config(path, [])
    (side, _), _ = training_resolutions(cfg)
    return model_config(cfg.model.spec, **dict(cfg.model.overrides)), side


def main(argv=None):
    ap = argparse.ArgumentParser(prog="t2i-flops", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset name, e.g. pixeldit_xl, pixeldit_t2i")
    src.add_argument("--config", help="a run YAML; its model: section is used")
    ap.add_argument("--height", type=int, default=None,
                    help=f"default: the config's training resolution, or {DEFAULT_SIDE} for --preset")
    ap.add_argument("--width", type=int, default=None, help="default: same as --height")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=None, help="T2I text length (default: the model's)")
    ap.add_argument("--backward", action="store_true", help="count forward + backward")
    ap.add_argument("--json", action="store_true", help="print a JSON line")
    args = ap.parse_args(argv)
    spec, side = (args.preset, DEFAULT_SIDE) if args.preset else _load_run(args.config)
    height = args.height or side
    width = args.width or height
    with torch.device("meta"):
        model = build_model(model_config(spec))
    params = sum(p.numel() for p in model.parameters())
    flops = count_forward_flops(model, height, width, args.batch, args.text_tokens, args.backward)
    result = {"model": args.preset or args.config, "height": height, "width": width, "batch": args.batch,
              "params_M": round(params / 1e6, 2), "gflops": round(flops / 1e9, 2),
              "pass": "forward+backward" if args.backward else "forward"}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']}: {result['params_M']}M parameters, {height}x{width}, batch {args.batch}: "
              f"{result['gflops']} GFLOPs ({result['pass']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
