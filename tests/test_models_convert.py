"""Official checkpoint conversion and our weight files: round trips, strictness, refusal of pickled code."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_train.convert import CheckpointError, convert_checkpoint, main as convert_main
from t2i_train.models import build_model
from t2i_train.models.io import load_pretrained, save_pretrained

TOL = 1e-4  # the fixture's own float32 rounding, see TOL in test_models_equivalence.py

FIXTURE = Path(__file__).parent / "fixtures" / "equivalence.safetensors"


@pytest.fixture(scope="module")
def fx():
    return load_file(str(FIXTURE))


def _official(fx, arch):
    p = f"{arch}.weights."
    return {k[len(p):]: v for k, v in fx.items() if k.startswith(p)}


def test_lightning_ckpt_takes_ema_denoiser(tmp_path, fx):
    ema = _official(fx, "c2i")
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    sd = {**{f"ema_denoiser.{k}": v for k, v in ema.items()}, **{f"denoiser.{k}": v for k, v in raw.items()},
          "diffusion_trainer.proj.0.weight": torch.randn(4, 4)}
    src = tmp_path / "imagenet256.ckpt"
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 3}, src)
    assert convert_main([str(src), str(tmp_path / "out")]) == 0
    model = load_pretrained(tmp_path / "out")
    assert model.config["arch"] == "c2i" and model.config["num_classes"] == 10
    with torch.no_grad():
        out = model(fx["c2i.case1.x"], fx["c2i.case1.t"], fx["c2i.case1.y"])
    assert (out - fx["c2i.case1.out"]).abs().max() <= TOL
    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["ignored_keys"] == len(raw) + 1
    # --no-ema takes the raw (all-zero) denoiser: the output layer is zero, so is the prediction
    convert_checkpoint(src, tmp_path / "raw", use_ema=False)
    m_raw = load_pretrained(tmp_path / "raw")
    assert m_raw(fx["c2i.case1.x"], fx["c2i.case1.t"], fx["c2i.case1.y"]).abs().max() == 0


def test_t2i_pth_core_and_repa_projector(tmp_path, fx):
    core = _official(fx, "t2i")
    proj = {"0.weight": torch.randn(8, 64), "0.bias": torch.randn(8), "2.weight": torch.randn(8, 8),
            "2.bias": torch.randn(8), "4.weight": torch.randn(768, 8), "4.bias": torch.randn(768)}
    sd = {**{f"core.{k}": v for k, v in core.items()}, **{f"_repa_projector.{k}": v for k, v in proj.items()},
          "pos_embed": torch.zeros(3)}
    src = tmp_path / "pixeldit_t2i.pth"
    torch.save({"state_dict": sd}, src)
    report = convert_checkpoint(src, tmp_path / "out")
    assert report["repa_projector"] and report["config"]["timestep_convention"] == "sana_flow"
    assert torch.equal(load_file(str(tmp_path / "out" / "repa_projector.safetensors"))["4.weight"], proj["4.weight"])
    model = load_pretrained(tmp_path / "out")
    x, t, txt = fx["t2i.case2.x"], fx["t2i.case2.t"], fx["t2i.case2.txt"]
    with torch.no_grad():
        out = model(x, t, txt)
    assert (out + fx["t2i.case2.out_nomask"]).abs().max() <= TOL


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_refuses_pickled_code(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, src)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights_only=True"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_strict_key_and_shape_errors_name_file_and_key(tmp_path, fx):
    core = _official(fx, "t2i")
    bad = dict(core)
    bad.pop("patch_blocks.1.attn.proj_y.bias")
    bad["patch_blocks.0.extra_thing.weight"] = torch.zeros(2)
    src = tmp_path / "bad.pth"
    torch.save({"state_dict": {f"core.{k}": v for k, v in bad.items()}}, src)
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, tmp_path / "o")
    msg = str(e.value)
    assert "bad.pth" in msg and "patch_blocks.0.extra_thing.weight" in msg and "patch_blocks.1.attn.txt_proj.bias" in msg
    wrong = dict(core)
    wrong["final_layer.linear.weight"] = torch.zeros(4, 8)
    torch.save({"state_dict": {f"core.{k}": v for k, v in wrong.items()}}, src)
    with pytest.raises(CheckpointError, match="final.linear.weight"):
        convert_checkpoint(src, tmp_path / "o")
    assert convert_main([str(src), str(tmp_path / "o2")]) == 2


def test_save_load_pretrained_round_trip_and_mismatch(tmp_path):
    m = build_model("pixeldit_tiny_c2i", repa_block=1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    save_pretrained(m, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["config.json", "model.safetensors"]
    m2 = load_pretrained(tmp_path / "w")
    x, t, y = torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([2])
    assert torch.equal(m(x, t, y), m2(x, t, y)) and m2.config == m.config
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    cfg["depth"] = 3
    (tmp_path / "w" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing keys \['patch_blocks\.2"):
        load_pretrained(tmp_path / "w")
