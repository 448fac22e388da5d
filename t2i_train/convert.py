"""Convert officially released PixelDiT checkpoints to our format (model.safetensors + config.json).

Sources:
- ImageNet class-conditional: the Lightning `.ckpt` (keys `ema_denoiser.*`, `denoiser.*`,
  `diffusion_trainer.*`); the EMA denoiser is taken unless `--no-ema`.
- Text-to-image: the `.pth` with a `state_dict` (keys `core.*` for the denoiser, `_repa_projector.*`).

Keys are renamed onto our modules strictly: every denoiser key must map and every model parameter must be
filled. Documented non-denoiser keys are set aside: the T2I REPA projector is written to
`repa_projector.safetensors`; the Lightning non-EMA copy and trainer state are ignored; a legacy `pos_embed`
entry (not a parameter of the released models) is dropped. The model configuration is inferred from tensor
shapes; what shapes cannot tell (text RoPE, mask use, timestep convention) follows the release.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import PixelDiT, resolve_config
from .models.io import save_state

# Official name (regex, applied after the container prefix is removed) -> our name.
_RENAMES: list[tuple[str, str]] = [
    (r"^s_embedder\.proj\.", "patch_embed."),
    (r"^pixel_embedder\.proj\.", "pixel_embed.proj."),
    (r"^t_embedder\.mlp\.", "t_embed.mlp."),
    (r"^y_embedder\.embedding_table\.", "class_embed."),
    (r"^y_embedder\.proj\.", "text_proj."),
    (r"^y_embedder\.norm\.", "text_norm."),
    (r"^y_pos_embedding$", "text_pos"),
    (r"^final_layer\.", "final."),
    # patch blocks, c2i (DiT)
    (r"^(patch_blocks\.\d+)\.adaLN_modulation\.0\.", r"\1.modulation."),
    (r"^(patch_blocks\.\d+)\.mlp\.w1\.", r"\1.mlp.gate."),
    (r"^(patch_blocks\.\d+)\.mlp\.w3\.", r"\1.mlp.up."),
    (r"^(patch_blocks\.\d+)\.mlp\.w2\.", r"\1.mlp.down."),
    # patch blocks, t2i (MM-DiT)
    (r"^(patch_blocks\.\d+)\.norm_x(\d)\.", r"\1.img_norm\2."),
    (r"^(patch_blocks\.\d+)\.norm_y(\d)\.", r"\1.txt_norm\2."),
    (r"^(patch_blocks\.\d+)\.attn\.qkv_x\.", r"\1.attn.img_qkv."),
    (r"^(patch_blocks\.\d+)\.attn\.qkv_y\.", r"\1.attn.txt_qkv."),
    (r"^(patch_blocks\.\d+)\.attn\.([qk])_norm_x\.", r"\1.attn.img_\2_norm."),
    (r"^(patch_blocks\.\d+)\.attn\.([qk])_norm_y\.", r"\1.attn.txt_\2_norm."),
    (r"^(patch_blocks\.\d+)\.attn\.proj_x\.", r"\1.attn.img_proj."),
    (r"^(patch_blocks\.\d+)\.attn\.proj_y\.", r"\1.attn.txt_proj."),
    (r"^(patch_blocks\.\d+)\.mlp_x\.w1\.", r"\1.img_mlp.gate."),
    (r"^(patch_blocks\.\d+)\.mlp_x\.w3\.", r"\1.img_mlp.up."),
    (r"^(patch_blocks\.\d+)\.mlp_x\.w2\.", r"\1.img_mlp.down."),
    (r"^(patch_blocks\.\d+)\.mlp_y\.w1\.", r"\1.txt_mlp.gate."),
    (r"^(patch_blocks\.\d+)\.mlp_y\.w3\.", r"\1.txt_mlp.up."),
    (r"^(patch_blocks\.\d+)\.mlp_y\.w2\.", r"\1.txt_mlp.down."),
    (r"^(patch_blocks\.\d+)\.adaLN_modulation_img\.0\.", r"\1.img_modulation."),
    (r"^(patch_blocks\.\d+)\.adaLN_modulation_txt\.0\.", r"\1.txt_modulation."),
    # pixel blocks (PiT)
    (r"^(pixel_blocks\.\d+)\.adaLN_modulation\.0\.", r"\1.modulation."),
    (r"^(pixel_blocks\.\d+)\.compress_to_attn\.", r"\1.compact."),
    (r"^(pixel_blocks\.\d+)\.expand_from_attn\.", r"\1.expand."),
]
# Names that keep their spelling: norms, attention and MLP internals of both block kinds.
_UNCHANGED = re.compile(r"^(patch_blocks|pixel_blocks)\.\d+\.(norm[12]|attn\.(qkv|q_norm|k_norm|proj)|mlp\.fc[12])\.")
_DROPPED = {"pos_embed"}


class CheckpointError(ValueError):
    pass


def official_to_ours(name: str) -> str | None:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    if _UNCHANGED.match(name):
        return name
    return None


def infer_config(sd: dict[str, torch.Tensor], source: str) -> dict:
    """Model configuration from the shapes of an official denoiser state dict."""
    def get(key):
        if key not in sd:
            raise CheckpointError(f"{source}: key {key!r} missing; this is not a PixelDiT denoiser")
        return sd[key]

    t2i = "y_pos_embedding" in sd
    w = get("s_embedder.proj.weight")
    hidden, patch_in = w.shape
    pixel_dim, in_ch = get("pixel_embedder.proj.weight").shape
    patch = int(round((patch_in / in_ch) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("patch_blocks."))
    pixel_depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("pixel_blocks."))
    q_norm = "attn.q_norm_x.weight" if t2i else "attn.q_norm.weight"
    head_dim = get(f"patch_blocks.0.{q_norm}").shape[0]
    pix_attn = get("pixel_blocks.0.compress_to_attn.weight").shape[0]
    pix_head_dim = get("pixel_blocks.0.attn.q_norm.weight").shape[0]
    cfg = dict(arch="t2i" if t2i else "c2i", in_channels=in_ch, patch_size=patch, hidden_size=hidden,
               num_heads=hidden // head_dim, depth=depth, pixel_depth=pixel_depth, pixel_dim=pixel_dim,
               pixel_attn_dim=pix_attn, pixel_attn_heads=pix_attn // pix_head_dim)
    if t2i:
        txt_len = get("y_pos_embedding").shape[1]
        cfg.update(txt_dim=get("y_embedder.proj.weight").shape[1], txt_len=txt_len,
                   text_rope=True, use_text_mask=False, timestep_convention="sana_flow")
    else:
        cfg.update(num_classes=get("y_embedder.embedding_table.weight").shape[0] - 1)
    return cfg


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code or an unknown class: refuse
        raise CheckpointError(
            f"{path}: refusing to load: it cannot be read with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}). Only plain tensors and containers are accepted; re-save the "
            "state dict alone if the file carries pickled objects.") from e


def split_official(obj: dict, source: str, use_ema: bool = True):
    """Return (denoiser state dict in official names, extras to keep, list of ignored keys)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: 'state_dict' is not a dict")
    keys = list(sd)
    extras, ignored = {}, []
    if any(k.startswith("ema_denoiser.") for k in keys) or any(k.startswith("denoiser.") for k in keys):
        prefix = "ema_denoiser." if use_ema else "denoiser."
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{source}: no '{prefix}*' keys (EMA requested: {use_ema})")
        den = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        ignored = [k for k in keys if not k.startswith(prefix)]
    elif any(k.startswith("core.") for k in keys):
        den = {k[len("core."):]: v for k, v in sd.items() if k.startswith("core.")}
        extras["repa_projector"] = {k[len("_repa_projector."):]: v for k, v in sd.items()
                                    if k.startswith("_repa_projector.")}
        ignored = [k for k in keys if not (k.startswith("core.") or k.startswith("_repa_projector."))]
    else:
        den = dict(sd)
    for k in list(den):
        if k in _DROPPED:
            den.pop(k)
            ignored.append(k)
    den = {k.replace("_orig_mod.", ""): v for k, v in den.items()}  # torch.compile wrappers
    return den, extras, ignored


def convert_state_dict(official: dict[str, torch.Tensor], source: str = "<state dict>",
                       config_overrides: dict | None = None):
    cfg = infer_config(official, source)
    cfg.update(config_overrides or {})
    cfg = resolve_config(cfg)
    ours, unmapped = {}, []
    for k, v in official.items():
        new = official_to_ours(k)
        if new is None:
            unmapped.append(k)
        else:
            ours[new] = v
    with torch.device("meta"):
        model = PixelDiT(**cfg)
    expected = model.state_dict()
    unexpected = unmapped + sorted(set(ours) - set(expected))
    missing = sorted(set(expected) - set(ours))
    if unexpected or missing:
        raise CheckpointError(f"{source}: does not fit a PixelDiT {cfg['arch']} model: unexpected keys "
                              f"{unexpected[:10]}, missing keys {missing[:10]}")
    for k, ref in expected.items():
        if tuple(ours[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(ours[k].shape)}, expected "
                                  f"{tuple(ref.shape)} for config {cfg}")
    return {k: ours[k].float() if ours[k].is_floating_point() else ours[k] for k in expected}, cfg


def convert_checkpoint(src: str | Path, out_dir: str | Path, use_ema: bool = True,
                       config_overrides: dict | None = None) -> dict:
    obj = read_checkpoint(src)
    den, extras, ignored = split_official(obj, str(src), use_ema)
    state, cfg = convert_state_dict(den, str(src), config_overrides)
    out = Path(out_dir)
    save_state(state, cfg, out, metadata={"source": Path(src).name})
    if extras.get("repa_projector"):
        save_file({k: v.float().contiguous() for k, v in extras["repa_projector"].items()},
                  str(out / "repa_projector.safetensors"))
    report = {"source": str(src), "out": str(out), "config": cfg, "tensors": len(state),
              "parameters": int(sum(v.numel() for v in state.values())), "ignored_keys": len(ignored),
              "repa_projector": bool(extras.get("repa_projector"))}
    (out / "conversion.json").write_text(json.dumps(report, indent=2))
    return report


def _parse_overrides(items):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="t2i-convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Convert an official PixelDiT checkpoint (ImageNet Lightning .ckpt or T2I .pth) into "
                    "model.safetensors + config.json, loadable by t2i-sample and init_from.")
    ap.add_argument("checkpoint", help="official .ckpt / .pth (or a .safetensors state dict)")
    ap.add_argument("out_dir", help="output directory")
    ap.add_argument("--no-ema", action="store_true", help="ImageNet .ckpt: take the raw denoiser, not the EMA")
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                    help="override inferred model config values, e.g. use_text_mask=false")
    args = ap.parse_args(argv)
    try:
        report = convert_checkpoint(args.checkpoint, args.out_dir, use_ema=not args.no_ema,
                                    config_overrides=_parse_overrides(args.set))
    except (CheckpointError, FileNotFoundError) as e:
        print(f"t2i-convert: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
