"""`t2i-sample`: generate images from a PixelDiT checkpoint (ours, or an official one converted by t2i-convert).

    t2i-sample --ckpt runs/t2i_512/export --prompts prompts.txt --out samples/ [--images-per-prompt 4]
    t2i-sample --ckpt imagenet256/export --classes 207,360,387 --out samples/
    torchrun --nproc-per-node 8 -m t2i_train.sample ...      # work split across ranks

Defaults follow the paper: ImageNet — FlowDPMSolver, 100 steps, CFG 2.75 on t ∈ (0.1, 0.9), shift 1 at 256²
(3 above); T2I — flow DPM-Solver++(2M), 25 steps, CFG 4.5 everywhere, shift 3 up to 768² and 4 above.
Times and the CFG interval are in our convention (t = 0 noise, t = 1 data); a reference T2I interval [a, b] on
σ is (1 − b, 1 − a) here. Image i (prompt-major, then copy) uses seed `--seed + i`, so the same seed gives the
same image whatever the batch size or number of ranks. Writes `NNNNN.png`, `grid.png` and `settings.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from .diffusion.samplers import SAMPLERS, SamplerConfig, make_noise, sample

PAPER_DEFAULTS = {
    "c2i": dict(sampler="flow_dpm_solver", steps=100, cfg=2.75, interval=(0.1, 0.9), resolution=256),
    "t2i": dict(sampler="dpm_solver_2m", steps=25, cfg=4.5, interval=(0.0, 1.0), resolution=512),
}


def default_shift(arch: str, height: int, width: int) -> float:
    """The training shift for the resolution: ImageNet 1.0 at 256² (3.0 above); T2I 3.0 up to 768², 4.0 above."""
    area = height * width
    if arch == "c2i":
        return 1.0 if area <= 256 * 256 else 3.0
    return 3.0 if area <= 768 * 768 else 4.0


def resolve_size(resolution: int, aspect_ratio: str | None, height: int | None, width: int | None,
                 multiple: int) -> tuple[int, int]:
    """Explicit height/width win; otherwise an aspect ratio 'W:H' at about `resolution`² pixels."""
    if height or width:
        h, w = height or width, width or height
    elif aspect_ratio:
        try:
            aw, ah = (float(v) for v in aspect_ratio.replace("x", ":").split(":"))
        except ValueError:
            raise SystemExit(f"--aspect-ratio must look like 16:9, got {aspect_ratio!r}")
        h, w = resolution * math.sqrt(ah / aw), resolution * math.sqrt(aw / ah)
    else:
        h = w = resolution
    h, w = (max(multiple, int(round(v / multiple)) * multiple) for v in (h, w))
    if (height and height % multiple) or (width and width % multiple):
        raise SystemExit(f"height/width must be multiples of the patch size {multiple}, got {height}x{width}")
    return h, w


def read_conditions(args, is_t2i: bool) -> list:
    items: list = []
    if args.prompts:
        path = Path(args.prompts)
        if not path.exists():
            raise SystemExit(f"--prompts file {path} not found")
        items += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    items += list(args.prompt or [])
    if args.classes:
        items += [c for c in args.classes.replace(",", " ").split() if c]
    if not items:
        raise SystemExit("nothing to sample: give --prompts FILE, --prompt TEXT or --classes 1,2,3")
    if not is_t2i:
        try:
            items = [int(c) for c in items]
        except ValueError as e:
            raise SystemExit(f"class-conditional model: conditions must be class indices ({e})")
    return items


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(arr: torch.Tensor, path: Path) -> None:
    from PIL import Image

    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr.numpy()).save(tmp)
    os.replace(tmp, path)


def make_grid(paths: list[Path], cols: int, out: Path) -> None:
    from PIL import Image

    ims = [Image.open(p) for p in paths]
    w, h = max(i.width for i in ims), max(i.height for i in ims)
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(ims):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    tmp = out.with_suffix(".tmp.png")
    grid.save(tmp)
    os.replace(tmp, out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t2i-sample", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ckpt", required=True, help="export directory (model.safetensors + config.json) or .safetensors")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--prompts", help="text file, one prompt (or class index) per line")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--classes", help="class indices, e.g. 207,360,387")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--aspect-ratio", help="W:H at about --resolution² pixels, e.g. 16:9")
    ap.add_argument("--resolution", type=int, help="side of the square of equal area (default 256 c2i / 512 t2i)")
    ap.add_argument("--sampler", choices=list(SAMPLERS) + ["flow_dpm-solver"])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float, help="guidance scale (1 = no guidance)")
    ap.add_argument("--interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"),
                    help="guidance only where T_MIN < t < T_MAX (t = 1 is data)")
    ap.add_argument("--shift", type=float, help="time shift (default: the training shift for the resolution)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negative-prompt", default="", help="T2I: the unconditional prompt (default empty)")
    ap.add_argument("--text-encoder", default="google/gemma-2-2b-it", help="T2I: Gemma-2 local path or hub id (or hash:DIM, the CPU demo's stand-in)")
    ap.add_argument("--no-chi", action="store_true", help="T2I: do not prepend the complex human instruction")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grid-cols", type=int, help="grid columns (default: images per prompt, or √n)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile the transformer blocks (auto: on CUDA only)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _dist_setup():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_pg = world > 1 and "MASTER_ADDR" in os.environ
    if use_pg and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return rank, world, local, use_pg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, local_rank, use_pg = _dist_setup()
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    from .models.io import load_pretrained
    from .models.wrapping import compile_wanted

    model = load_pretrained(args.ckpt, device=device)
    if compile_wanted(args.compile, device):
        model.compile_blocks()
    arch = "t2i" if model.is_t2i else "c2i"
    d = PAPER_DEFAULTS[arch]
    height, width = resolve_size(args.resolution or d["resolution"], args.aspect_ratio, args.height, args.width,
                                 model.patch_size)
    cfg = SamplerConfig(name=args.sampler or d["sampler"], steps=args.steps or d["steps"],
                        shift=args.shift if args.shift is not None else default_shift(arch, height, width),
                        cfg_scale=args.cfg if args.cfg is not None else d["cfg"],
                        cfg_interval=tuple(args.interval) if args.interval else d["interval"], dtype=args.dtype)
    conditions = read_conditions(args, model.is_t2i)
    ipp = args.images_per_prompt
    jobs = [(i * ipp + j, c) for i, c in enumerate(conditions) for j in range(ipp)]
    mine = jobs[rank::world]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    encoder = None
    if model.is_t2i:
        if args.text_encoder.startswith("hash"):
            # the CPU demo's stand-in encoder (t2i_train.engine.text_adapter), as in its training config
            from .engine.text_adapter import HashTextEncoder

            dim = int(args.text_encoder.split(":", 1)[1]) if ":" in args.text_encoder else model.config["txt_dim"]
            if dim != model.config["txt_dim"]:
                raise SystemExit(f"t2i-sample: --text-encoder {args.text_encoder} gives {dim}-d embeddings, "
                                 f"the model expects {model.config['txt_dim']}")
            encoder = HashTextEncoder(dim, int(model.config["txt_len"]))
        else:
            from .text.gemma import CHI_PROMPT, GemmaTextEncoder

            encoder = GemmaTextEncoder(args.text_encoder, max_length=int(model.config["txt_len"]),
                                       chi_prompt=None if args.no_chi else CHI_PROMPT, device=device,
                                       batch_size=args.batch_size)
        null_emb, null_mask = encoder.encode_null(args.negative_prompt)

    from tqdm import tqdm

    batches = [mine[k:k + args.batch_size] for k in range(0, len(mine), args.batch_size)]
    for batch in tqdm(batches, desc=f"sampling ({cfg.name}, {cfg.steps} steps)", disable=args.no_progress or rank != 0):
        idx = [i for i, _ in batch]
        noise = make_noise([args.seed + i for i in idx], (model.config["in_channels"], height, width), device)
        if model.is_t2i:
            cond, mask = encoder.encode([c for _, c in batch])
            cond, mask = cond.to(device), mask.to(device)
            uncond = null_emb.to(device).expand(len(batch), -1, -1)
            uncond_mask = null_mask.to(device).expand(len(batch), -1)
        else:
            cond = torch.tensor([c for _, c in batch], device=device, dtype=torch.long)
            mask = uncond_mask = None
            uncond = torch.full_like(cond, int(model.config["num_classes"]))
        images = sample(model, noise, cond, mask, uncond, uncond_mask, cfg)
        for i, arr in zip(idx, to_uint8(images)):
            save_png(arr, out / f"{i:05d}.png")

    if use_pg:
        torch.distributed.barrier()
    if rank == 0:
        files = [out / f"{i:05d}.png" for i, _ in jobs]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise SystemExit(f"missing outputs (a rank failed?): {missing[:5]}")
        cols = args.grid_cols or (ipp if ipp > 1 else math.ceil(math.sqrt(len(files))))
        make_grid(files[:256], cols, out / "grid.png")
        settings = {
            "ckpt": str(args.ckpt), "arch": arch, "model_config": model.config, "height": height, "width": width,
            "sampler": cfg.to_dict(), "seed": args.seed, "images_per_prompt": ipp, "world_size": world,
            "negative_prompt": args.negative_prompt if model.is_t2i else None,
            "text_encoder": args.text_encoder if model.is_t2i else None,
            "chi_prompt": (not args.no_chi) if model.is_t2i else None,
            "images": [{"file": f"{i:05d}.png", "seed": args.seed + i,
                        ("prompt" if model.is_t2i else "class"): c} for i, c in jobs],
        }
        tmp = out / "settings.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, out / "settings.json")
    if use_pg:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
