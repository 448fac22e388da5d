"""`t2i-sample`: generate images from a PixelDiT checkpoint (ours, or an official one converted by t2i-convert).

    t2i-sample --ckpt runs/demo_t2i_512/export/ema --prompt "a red circle" --out samples/ [--images-per-prompt 4]
    t2i-sample --ckpt weights/pixeldit_xl_256 --classes 207,360,387 --out samples/
    torchrun --nproc-per-node 8 -m t2i_train.sample ...      # work split across ranks

A run's export (`runs/<name>/export/ema`, or `runs/<name>/export`) carries `run_info.json`: its text encoder,
training resolution and validation sampler are the defaults here; options given on the command line win.
Without it (converted official weights), or with `--preset`, the defaults follow the model card and the
paper: ImageNet 256² — FlowDPMSolver, 100 steps, CFG 2.75 on t ∈ (0.1, 0.9), shift 1 (the epoch-320
checkpoint; `--preset imagenet256_epoch80|160`: CFG 3.25 on (0.1, 1.0)); ImageNet 512² — CFG 3.5 on
(0.1, 1.0), shift 2.0; T2I — flow DPM-Solver++(2M), 25 steps, CFG 4.5 everywhere, shift 3 up to 768² and
4 above, Gemma-2 (google/gemma-2-2b-it). A preset's values apply unless given explicitly.
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
from .text.gemma import DEFAULT_GEMMA

# ImageNet: the model card's gFID settings per checkpoint; T2I: the paper's Table 8. shift None = by resolution
_C2I = dict(sampler="flow_dpm_solver", steps=100)
SAMPLING_PRESETS = {
    "imagenet256_epoch80": dict(_C2I, cfg=3.25, interval=(0.1, 1.0), shift=1.0, resolution=256),
    "imagenet256_epoch160": dict(_C2I, cfg=3.25, interval=(0.1, 1.0), shift=1.0, resolution=256),
    "imagenet256_epoch320": dict(_C2I, cfg=2.75, interval=(0.1, 0.9), shift=1.0, resolution=256),
    "imagenet512": dict(_C2I, cfg=3.5, interval=(0.1, 1.0), shift=2.0, resolution=512),
    "t2i": dict(sampler="dpm_solver_2m", steps=25, cfg=4.5, interval=(0.0, 1.0), shift=None, resolution=512),
}


def default_preset(arch: str, resolution: int | None) -> str:
    if arch == "t2i":
        return "t2i"
    return "imagenet512" if (resolution or 256) > 256 else "imagenet256_epoch320"


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


class SampleError(ValueError):
    """Bad input to t2i-sample; reported as one line."""


def locate_checkpoint(path: str) -> Path:
    """An export directory, a .safetensors file, or a run's `export/` directory (its `ema/` inside)."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").exists() and (p / "ema" / "model.safetensors").exists():
        return p / "ema"
    if not p.exists():
        raise SampleError(f"--ckpt {p}: not found (expected an export directory such as runs/<name>/export/ema, "
                          "or the output of t2i-convert)")
    return p


def read_conditions(args, is_t2i: bool) -> list:
    items: list = []
    if args.prompts:
        path = Path(args.prompts)
        if not path.exists():
            raise SampleError(f"--prompts file {path} not found")
        items += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    items += list(args.prompt or [])
    if args.classes:
        items += [c for c in args.classes.replace(",", " ").split() if c]
    if not items:
        raise SampleError("nothing to sample: give --prompts FILE, --prompt TEXT or --classes 1,2,3")
    if not is_t2i:
        try:
            items = [int(c) for c in items]
        except ValueError as e:
            raise SampleError(f"class-conditional model: conditions must be class indices ({e})") from None
    elif args.classes:
        raise SampleError("--classes: this is a text-to-image model; give --prompt TEXT or --prompts FILE")
    return items


def check_classes(classes: list[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SampleError(f"class {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")


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
    ap = argparse.ArgumentParser(prog="t2i-sample", description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=HelpFormatter)
    info = "default: the export's run_info.json, else"
    ap.add_argument("--ckpt", required=True, help="export directory (model.safetensors + config.json) or .safetensors")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--prompts", help="text file, one prompt (or class index) per line")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--classes", help="class indices, e.g. 207,360,387")
    ap.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt or class")
    ap.add_argument("--height", type=int, help="image height (with --width; wins over --resolution)")
    ap.add_argument("--width", type=int, help="image width")
    ap.add_argument("--aspect-ratio", help="W:H at about --resolution² pixels, e.g. 16:9")
    ap.add_argument("--resolution", type=int,
                    help=f"side of the square of equal area ({info} 256 c2i / 512 t2i)")
    ap.add_argument("--sampler", choices=list(SAMPLERS) + ["flow_dpm-solver"],
                    help=f"{info} flow_dpm_solver (c2i) / dpm_solver_2m (t2i)")
    ap.add_argument("--steps", type=int, help=f"denoising steps ({info} 100 c2i / 25 t2i)")
    ap.add_argument("--cfg", type=float, help=f"guidance scale, 1 = no guidance ({info} 2.75 c2i / 4.5 t2i)")
    ap.add_argument("--preset", choices=sorted(SAMPLING_PRESETS),
                    help="model-card sampling settings (default: the export's run_info.json, else imagenet256_epoch320 at 256², imagenet512 above, t2i)")
    ap.add_argument("--interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"),
                    help=f"guidance only where T_MIN < t < T_MAX, t = 1 is data ({info} 0.1 0.9 c2i / 0 1 t2i)")
    ap.add_argument("--shift", type=float,
                    help="time shift (default: the export's training shift at its resolution, else by resolution)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    ap.add_argument("--negative-prompt", default="", help="T2I: the unconditional prompt")
    ap.add_argument("--text-encoder", default=None,
                    help=f"T2I: Gemma-2 local directory or hub id, or hash:DIM, the CPU demo's stand-in "
                         f"({info} {DEFAULT_GEMMA})")
    ap.add_argument("--no-chi", action="store_true", help="T2I: do not prepend the complex human instruction (default: the one in run_info.json, else the reference's)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model forward dtype")
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward")
    ap.add_argument("--grid-cols", type=int, help="grid columns (default: images per prompt, or √n)")
    ap.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile the transformer blocks (auto: on CUDA only)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""

    def _get_help_string(self, action):  # a None default is explained in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def _dist_setup():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_pg = world > 1 and "MASTER_ADDR" in os.environ
    if use_pg and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return rank, world, local, use_pg


def sampling_settings(args, model, run_info: dict) -> tuple[int, int, SamplerConfig]:
    """Image size and sampler: the command line, else the export's run_info.json, else the paper's defaults."""
    arch = "t2i" if model.is_t2i else "c2i"
    trained = {} if args.preset else (run_info.get("sampler") or {})
    trained_hw = run_info.get("resolution")
    if trained_hw and not (args.resolution or args.height or args.width or args.aspect_ratio):
        height, width = (int(v) for v in trained_hw)
        shift = trained.get("shift")
        d = SAMPLING_PRESETS[args.preset or default_preset(arch, max(height, width))]
    else:
        side = args.resolution or (round(math.sqrt(trained_hw[0] * trained_hw[1])) if trained_hw else None)
        d = SAMPLING_PRESETS[args.preset or default_preset(arch, side or args.height or args.width)]
        height, width = resolve_size(side or d["resolution"], args.aspect_ratio, args.height, args.width,
                                     model.patch_size)
        shift = None
    if args.shift is not None:
        shift = args.shift
    elif shift is None:
        shift = d["shift"] if d["shift"] is not None else default_shift(arch, height, width)
    cfg = SamplerConfig(name=args.sampler or trained.get("name", d["sampler"]),
                        steps=args.steps or trained.get("steps", d["steps"]),
                        shift=shift,
                        cfg_scale=args.cfg if args.cfg is not None else trained.get("cfg_scale", d["cfg"]),
                        cfg_interval=tuple(args.interval or trained.get("cfg_interval", d["interval"])),
                        dtype=args.dtype)
    return height, width, cfg


def text_encoder_for(args, model, run_info: dict, device):
    """--text-encoder, else the one the export was trained with, else Gemma-2 from the hub."""
    from .engine.run_info import run_info_chi
    from .text.encoders import load_text_encoder

    text = run_info.get("text") or {}
    name = args.text_encoder or text.get("encoder") or DEFAULT_GEMMA
    return load_text_encoder(name, max_length=int(text.get("max_length") or model.config["txt_len"]),
                             expected_dim=int(model.config["txt_dim"]),
                             chi_prompt=None if args.no_chi else run_info_chi(text), device=device,
                             batch_size=args.batch_size)


class StepProgress:
    """Calls the model and advances a progress bar by one denoising step per call."""

    def __init__(self, model, bar):
        self.model, self.bar = model, bar

    def __call__(self, *inputs):
        out = self.model(*inputs)
        self.bar.update(1)
        return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SampleError as e:
        print(f"t2i-sample: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    rank, world, local_rank, use_pg = _dist_setup()
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    from .models.io import load_pretrained, load_run_info
    from .models.wrapping import compile_wanted

    ckpt = locate_checkpoint(args.ckpt)
    try:
        model = load_pretrained(ckpt, device=device)
        run_info = load_run_info(ckpt)
    except (OSError, ValueError) as e:
        raise SampleError(f"--ckpt {ckpt}: {e}") from None
    if compile_wanted(args.compile, device):
        model.compile_blocks()
    arch = "t2i" if model.is_t2i else "c2i"
    height, width, cfg = sampling_settings(args, model, run_info)
    conditions = read_conditions(args, model.is_t2i)
    if not model.is_t2i:
        check_classes(conditions, int(model.config["num_classes"]))
    ipp = args.images_per_prompt
    jobs = [(i * ipp + j, c) for i, c in enumerate(conditions) for j in range(ipp)]
    mine = jobs[rank::world]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    encoder = None
    if model.is_t2i:
        try:
            encoder = text_encoder_for(args, model, run_info, device)
        except (OSError, ValueError) as e:
            raise SampleError(str(e)) from None
        null_emb, null_mask = encoder.encode_null(args.negative_prompt)

    from tqdm import tqdm

    batches = [mine[k:k + args.batch_size] for k in range(0, len(mine), args.batch_size)]
    bar = tqdm(total=len(batches) * cfg.steps, unit="step", disable=args.no_progress or rank != 0,
               desc=f"sampling {len(mine)} images {height}x{width} ({cfg.name}, {cfg.steps} steps)")
    denoiser = StepProgress(model, bar)
    for batch in batches:
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
        images = sample(denoiser, noise, cond, mask, uncond, uncond_mask, cfg)
        for i, arr in zip(idx, to_uint8(images)):
            save_png(arr, out / f"{i:05d}.png")
    bar.close()

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
            "text_encoder": (args.text_encoder or (run_info.get("text") or {}).get("encoder") or DEFAULT_GEMMA)
            if model.is_t2i else None,
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
