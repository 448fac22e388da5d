"""The generation runner every benchmark shares: checkpoint + conditions + sampler settings + seeds → image files.

    gen = load_generator("runs/t2i_512/export/ema", device=device)          # text encoder from run_info.json
    jobs = [Job(cond="a photo of a cat", seed=0, path=out / "00000.png"), ...]
    run_jobs(gen, jobs, gen.sampler_config(512, 512), 512, 512, out_dir=out)

* Image k of a benchmark has its own seed, so an image does not depend on the batch size or the number of ranks.
* Under `torchrun` / `deepspeed` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the jobs are split across
  ranks (gloo on CPU, nccl on GPU); alone, one process does them all.
* Resumable: outputs that exist are skipped; each file is written aside and renamed.
* `out_dir/generation.json` records the exact settings (checkpoint path and sha256, sampler, steps, CFG scale and
  interval, shift, resolution, dtype, text encoder, and the seed of every image). A folder whose recorded
  settings differ is refused (`overwrite=True` deletes its images and starts again), so a benchmark folder never
  mixes images of two settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from t2i_train.diffusion.samplers import SAMPLERS, SamplerConfig, make_noise, sample
from t2i_train.engine import dist
from t2i_train.models.io import RUN_INFO_NAME, load_run_info
from t2i_train.sample import SAMPLING_PRESETS, default_preset, default_shift, save_png, to_uint8

SETTINGS_NAME = "generation.json"
# settings that may change between two runs writing into the same folder without changing any image
_VOLATILE = ("images", "world_size", "batch_size", "notes")

Condition = Union[str, int]


@dataclass
class Job:
    """One image to make: a prompt (T2I) or class index (ImageNet), its seed, and the file it goes to."""

    cond: Condition
    seed: int
    path: Path


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights_file(ckpt: Path) -> Path:
    from t2i_train.models.io import WEIGHTS_NAME

    return ckpt / WEIGHTS_NAME if ckpt.is_dir() else ckpt


class Generator:
    """A loaded denoiser with its condition encoder: `generate(conds, seeds, cfg, h, w) -> uint8 [B, H, W, 3]`."""

    def __init__(self, model, *, ckpt: str, sha256: str, device: torch.device, dtype: str,
                 text_encoder=None, text_encoder_name: Optional[str] = None, run_info: Optional[dict] = None):
        self.model, self.ckpt, self.sha256 = model, ckpt, sha256
        self.device, self.dtype = device, dtype
        self.text_encoder, self.text_encoder_name = text_encoder, text_encoder_name
        self.run_info = run_info or {}
        self.is_t2i = bool(model.is_t2i)
        if self.is_t2i:
            self.null_emb, self.null_mask = (x.to(device) for x in text_encoder.encode_null(""))

    @property
    def arch(self) -> str:
        return "t2i" if self.is_t2i else "c2i"

    def default_size(self) -> tuple[int, int]:
        """The run's resolution from run_info.json, else the paper's (512² T2I, 256² ImageNet)."""
        res = self.run_info.get("resolution")
        if res:
            return (int(res), int(res)) if isinstance(res, (int, float)) else (int(res[0]), int(res[1]))
        side = SAMPLING_PRESETS[default_preset(self.arch, None)]["resolution"]
        return side, side

    def sampler_config(self, height: int, width: int, **overrides) -> SamplerConfig:
        """The model card's defaults for the architecture and size, then run_info.json's sampler, then `overrides` (None = keep)."""
        d = SAMPLING_PRESETS[default_preset(self.arch, max(height, width))]
        base = dict(name=d["sampler"], steps=d["steps"], cfg_scale=d["cfg"], cfg_interval=d["interval"],
                    shift=d["shift"] if d["shift"] is not None else default_shift(self.arch, height, width))
        fields = {f.name for f in dataclasses.fields(SamplerConfig)}
        base.update({k: v for k, v in (self.run_info.get("sampler") or {}).items() if k in fields})
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["dtype"] = self.dtype
        return SamplerConfig(**base)

    def _conditions(self, conds: Sequence[Condition]):
        n = len(conds)
        if self.is_t2i:
            cond, mask = self.text_encoder.encode([str(c) for c in conds])
            return (cond.to(self.device), mask.to(self.device),
                    self.null_emb.expand(n, -1, -1), self.null_mask.expand(n, -1))
        num_classes = int(self.model.config["num_classes"])
        labels = [int(c) for c in conds]
        bad = [c for c in labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"class indices {bad[:5]} out of range for a {num_classes}-class model ({self.ckpt})")
        cond = torch.tensor(labels, device=self.device, dtype=torch.long)
        return cond, None, torch.full_like(cond, num_classes), None

    @torch.no_grad()
    def generate(self, conds: Sequence[Condition], seeds: Sequence[int], cfg: SamplerConfig,
                 height: int, width: int) -> torch.Tensor:
        if len(conds) != len(seeds):
            raise ValueError(f"{len(conds)} conditions but {len(seeds)} seeds")
        p = self.model.patch_size
        if height % p or width % p:
            raise ValueError(f"height/width must be multiples of the patch size {p}, got {height}x{width}")
        cfg = dataclasses.replace(cfg, dtype=self.dtype)
        noise = make_noise(list(seeds), (self.model.config["in_channels"], height, width), self.device)
        cond, mask, uncond, uncond_mask = self._conditions(conds)
        return to_uint8(sample(self.model, noise, cond, mask, uncond, uncond_mask, cfg))

    def settings(self) -> dict:
        return {"ckpt": str(self.ckpt), "ckpt_sha256": self.sha256, "arch": self.arch, "dtype": self.dtype,
                "text_encoder": self.text_encoder_name if self.is_t2i else None}


def load_generator(ckpt: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None,
                   dtype: Optional[str] = None, text_encoder: Optional[str] = None) -> Generator:
    """Load exported weights (the `save_pretrained` layout) and, for T2I, the text encoder and CFG null condition.

    text_encoder: a Gemma-2 local path or hub id, or `hash:DIM`; default: what `run_info.json` beside the export
    records. dtype: "bfloat16" (autocast, default on CUDA) or "float32" (default on CPU).
    """
    from t2i_train.models.io import load_pretrained
    from t2i_train.engine.run_info import run_info_chi
    from t2i_train.text.encoders import load_text_encoder

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} not found (an export directory with model.safetensors and "
                                "config.json, e.g. runs/<run>/export/ema, or the output of t2i-convert)")
    device = torch.device(device) if device is not None else dist.pick_device("auto")
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    run_info = load_run_info(ckpt)
    model = load_pretrained(ckpt, device=device)
    encoder = name = None
    if model.is_t2i:
        text_info = run_info.get("text") or {}
        name = text_encoder or text_info.get("encoder")
        if not name:
            raise ValueError(f"{ckpt}: no {RUN_INFO_NAME} names the text encoder; pass --text-encoder "
                             "(a Gemma-2 local path or hub id, e.g. google/gemma-2-2b-it, or hash:DIM)")
        txt_len = int(model.config["txt_len"])
        # the instruction the run trained with (run_info.json), not a fixed default
        encoder = load_text_encoder(name, max_length=min(int(text_info.get("max_length", txt_len)), txt_len),
                                    expected_dim=int(model.config["txt_dim"]), chi_prompt=run_info_chi(text_info),
                                    device=device)
    return Generator(model, ckpt=str(ckpt), sha256=file_sha256(_weights_file(ckpt)), device=device, dtype=dtype,
                     text_encoder=encoder, text_encoder_name=name, run_info=run_info)


def add_generation_args(ap, *, default_batch_size: int = 8) -> None:
    """The checkpoint and sampler flags every `t2i-eval <benchmark> generate` takes (None = the defaults)."""
    g = ap.add_argument_group("checkpoint and sampler")
    g.add_argument("--ckpt", required=True, help="export directory (model.safetensors + config.json) or .safetensors")
    g.add_argument("--text-encoder", help="T2I: Gemma-2 local path or hub id, or hash:DIM "
                                          "(default: what run_info.json beside the export records)")
    g.add_argument("--sampler", choices=list(SAMPLERS) + ["flow_dpm-solver"],
                   help="default: the paper's (dpm_solver_2m T2I, flow_dpm_solver ImageNet) or run_info.json's")
    g.add_argument("--steps", type=int, help="default: 25 T2I, 100 ImageNet")
    g.add_argument("--cfg", type=float, help="guidance scale (default 4.5 T2I, 2.75 ImageNet; 1 = none)")
    g.add_argument("--interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"),
                   help="guidance only where T_MIN < t < T_MAX, t = 1 data (default 0 1 T2I, 0.1 0.9 ImageNet)")
    g.add_argument("--shift", type=float, help="time shift (default: the training shift for the resolution)")
    g.add_argument("--height", type=int, help="default: run_info.json's resolution, else 512 T2I / 256 ImageNet")
    g.add_argument("--width", type=int, help="default: --height, else as --height")
    g.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=default_batch_size, help="per rank (default: %(default)s)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    g.add_argument("--overwrite", action="store_true",
                   help="delete images made with other settings in --out and start again")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def generator_from_args(args) -> tuple[Generator, SamplerConfig, int, int]:
    """Set up the process group, load the checkpoint and resolve size and sampler from parsed generation args."""
    device = torch.device(args.device) if args.device else dist.pick_device("auto")
    dist.init_distributed(device)
    gen = load_generator(args.ckpt, device=device, dtype=args.dtype, text_encoder=args.text_encoder)
    h, w = gen.default_size()
    if args.height or args.width:
        h, w = args.height or args.width, args.width or args.height
    cfg = gen.sampler_config(h, w, name=args.sampler, steps=args.steps, cfg_scale=args.cfg, shift=args.shift,
                             cfg_interval=tuple(args.interval) if args.interval else None)
    return gen, cfg, h, w


def _check_settings(out_dir: Path, settings: dict, overwrite: bool) -> Optional[str]:
    """None when `out_dir` may take images made with `settings`; else the reason it may not."""
    path = out_dir / SETTINGS_NAME
    if overwrite or not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"{path} is not valid JSON ({e}); pass --overwrite to start again"
    diff = sorted(k for k in set(old) | set(settings) if k not in _VOLATILE and old.get(k) != settings.get(k))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
        return (f"{out_dir} holds images made with other settings ({shown}); use another --out, "
                "or --overwrite to delete them and start again")
    old_seeds, new_seeds = old.get("images") or {}, settings.get("images") or {}
    clash = [f for f in new_seeds if f in old_seeds and old_seeds[f] != new_seeds[f]]
    if clash:
        return (f"{out_dir}: {clash[0]} was made with seed {old_seeds[clash[0]]}, now it would be "
                f"{new_seeds[clash[0]]}; use another --out, or --overwrite to start again")
    return None


def _start_folder(out_dir: Path, settings: dict, overwrite: bool) -> None:
    """Rank 0: delete the old images on overwrite, then record the settings (merged with the images already there)."""
    path = out_dir / SETTINGS_NAME
    images = dict(settings.get("images") or {})
    if path.exists():
        old = json.loads(path.read_text())
        if overwrite:
            for rel in old.get("images") or {}:
                (out_dir / rel).unlink(missing_ok=True)
        else:
            images = {**(old.get("images") or {}), **images}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**settings, "images": dict(sorted(images.items()))}, indent=1))
    os.replace(tmp, path)


def run_jobs(gen: Generator, jobs: Sequence[Job], cfg: SamplerConfig, height: int, width: int, *,
             out_dir: Union[str, os.PathLike], batch_size: int = 8, overwrite: bool = False,
             extra_settings: Optional[dict] = None, notes: Optional[dict] = None, progress: bool = True,
             save: Callable[[torch.Tensor, Path], None] = save_png) -> dict:
    """Make every job's image that is not there yet; returns the settings written to `out_dir/generation.json`.

    `extra_settings` join the recorded settings (a folder made with other values is refused); `notes` are recorded
    under "notes" but may differ between runs (e.g. where an input file was read from).

    Jobs are split across ranks by position (rank r takes jobs r, r + W, ...), then each rank skips the files that
    exist. Call it on every rank; it returns once all ranks are done and every output exists.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    cfg = dataclasses.replace(cfg, dtype=gen.dtype)
    rank, world = dist.rank(), dist.world_size()
    settings = {**gen.settings(), "sampler": cfg.to_dict(), "height": int(height), "width": int(width),
                **(extra_settings or {}), "world_size": world, "batch_size": int(batch_size), "notes": notes or {},
                "images": {str(j.path.relative_to(out_dir)): int(j.seed) for j in jobs}}
    error = _check_settings(out_dir, settings, overwrite) if rank == 0 else None
    error = dist.broadcast_object(error)
    if error:
        raise SystemExit(error)
    if rank == 0:
        _start_folder(out_dir, settings, overwrite)
    dist.barrier()

    todo = [j for j in list(jobs)[rank::world] if not j.path.exists()]
    bar = tqdm(total=len(todo), desc=f"generating ({cfg.name}, {cfg.steps} steps, {world} rank(s))", unit="img",
               disable=not progress or rank != 0)
    for k in range(0, len(todo), batch_size):
        batch = todo[k:k + batch_size]
        images = gen.generate([j.cond for j in batch], [j.seed for j in batch], cfg, height, width)
        for job, arr in zip(batch, images):
            job.path.parent.mkdir(parents=True, exist_ok=True)
            save(arr, job.path)
        bar.update(len(batch))
    bar.close()
    dist.barrier()
    missing = [str(j.path) for j in jobs if not j.path.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} outputs missing after generation (did a rank fail?): {missing[:3]}")
    return settings
