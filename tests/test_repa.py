import pytest
import torch

from t2i_train.diffusion import FlowObjective
from t2i_train.diffusion.repa import DINO_DIM, DinoV2Teacher, RepaProjector, repa_loss
from t2i_train.models import build_model


class FakeTeacher(torch.nn.Module):
    """Stands in for DINOv2: records the grid it was asked for, returns deterministic 768-d tokens."""

    def __init__(self):
        super().__init__()
        self.grids = []

    def forward(self, images, grid):
        self.grids.append(grid)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), grid).flatten(2).transpose(1, 2)
        return pooled.repeat(1, 1, DINO_DIM // 3)


def test_repa_loss_is_negative_mean_cosine():
    a = torch.randn(2, 5, 768)
    assert repa_loss(a, 3 * a).item() == pytest.approx(-1.0, abs=1e-5)
    assert repa_loss(a, -a).item() == pytest.approx(1.0, abs=1e-5)
    b = torch.randn(2, 5, 768)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert repa_loss(a, b).item() == pytest.approx(-cos.mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        repa_loss(a, b[:, :4])


def test_projector_layout_and_reference_keys():
    proj = RepaProjector(64, 2048)
    assert [type(m).__name__ for m in proj] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert proj[0].in_features == 64 and proj[2].out_features == 2048 and proj[4].out_features == 768
    ref = {f"_repa_projector.{k}": torch.full_like(v, 0.25) for k, v in proj.state_dict().items()}
    ref["core.other.weight"] = torch.zeros(1)
    assert RepaProjector(64, 2048).load_reference_state(ref)
    imnet = {f"proj.0.{k}": v for k, v in RepaProjector(64, 64).state_dict().items()}
    p2 = RepaProjector(64, 64)
    assert p2.load_reference_state(imnet) and torch.equal(p2[4].weight, imnet["proj.0.4.weight"])
    assert not RepaProjector(64, 64).load_reference_state({"x": torch.zeros(1)})


@pytest.mark.parametrize("hw", [(16, 16), (16, 32)])
def test_objective_with_repa_non_square(hw):
    torch.manual_seed(0)
    model = build_model("pixeldit_tiny_t2i", repa_block=1)
    teacher = FakeTeacher()
    obj = FlowObjective({"repa_weight": 0.5, "repa_block": 1, "repa_projector_dim": 32}, model.hidden_size, teacher=teacher)
    assert obj.projector[0].in_features == model.hidden_size and obj.projector[2].in_features == 32
    assert set(obj.state_dict()) == {f"projector.{i}.{n}" for i in (0, 2, 4) for n in ("weight", "bias")}
    x = torch.rand(2, 3, *hw) * 2 - 1
    emb, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.long)
    out = obj.loss(model, x, emb, mask, generator=torch.Generator().manual_seed(0))
    assert teacher.grids == [(hw[0] // 8, hw[1] // 8)]
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.5 * out["repa_loss"].item(), rel=1e-5)
    assert -1.0 <= out["repa_loss"].item() <= 1.0
    out["loss"].backward()
    assert obj.projector[0].weight.grad is not None and obj.projector[0].weight.grad.abs().sum() > 0


def test_zero_weight_builds_no_teacher():
    obj = FlowObjective({"repa_weight": 0.0})
    assert obj.teacher is None and obj.projector is None and len(list(obj.parameters())) == 0


@pytest.fixture(scope="module")
def random_teacher():
    return DinoV2Teacher(None)


def test_dinov2_teacher_grid_matches_patch_grid(random_teacher):
    teacher = random_teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.encoder.training
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    feats = teacher(x, (2, 3))  # 14·2 × 14·3 pixels → 2×3 tokens
    assert feats.shape == (1, 6, DINO_DIM)
    # the final norm is applied: per-token features are layer-normalised (weight 1, bias 0 at init)
    assert torch.allclose(feats.mean(-1), torch.zeros(1, 6), atol=1e-4)


def test_dinov2_teacher_loads_local_weights(tmp_path, random_teacher):
    from safetensors.torch import save_file

    teacher = random_teacher
    state = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    state["norm.bias"] = torch.full_like(state["norm.bias"], 0.5)
    save_file(state, str(tmp_path / "dino.safetensors"))
    loaded = DinoV2Teacher(str(tmp_path / "dino.safetensors"))
    feats = loaded(torch.zeros(1, 3, 16, 16), (1, 1))
    assert torch.allclose(feats.mean(-1), torch.full((1, 1), 0.5), atol=1e-4)
    loaded.to(torch.bfloat16)  # float32 images into a bf16 teacher
    assert loaded(torch.zeros(1, 3, 16, 16), (1, 1)).dtype == torch.bfloat16


def test_objective_reads_patch_size_through_wrappers():
    class Wrapper(torch.nn.Module):  # like DDP: attributes live on .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = build_model("pixeldit_tiny_c2i", repa_block=2)
    obj = FlowObjective({"repa_weight": 0.5, "repa_block": 2}, model.hidden_size, teacher=FakeTeacher())
    out = obj.loss(Wrapper(model), torch.zeros(1, 3, 16, 16), torch.tensor([3]))
    assert out["repa_loss"] is not None and obj.teacher.grids == [(2, 2)]
