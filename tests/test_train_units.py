"""In-process checks of the trainer's adapters (no launcher): text conditions, seeding, export."""
from __future__ import annotations

import torch

from t2i_train.config import load_config
from t2i_train.train import Trainer, derive_seed


def _trainer(tmp_path, *extra):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=u", "run.max_steps=2", "backend.precision=fp32",
                             "backend.micro_batch=2", "data.source=fixed", "data.fixed_image_size=16",
                             "logging.tqdm=false", "objective.cond_drop_prob=0.5", *extra])
    return Trainer(cfg)


def test_cached_text_embeddings_are_padded_to_the_model_length(tmp_path):
    tr = _trainer(tmp_path)
    batch = {"image": torch.zeros(2, 3, 16, 16), "text_emb": torch.randn(2, 5, 32),
             "text_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    images, cond, mask = tr._condition(batch, tr._generator(0, 0))
    assert cond.shape == (2, 16, 32) and mask.shape == (2, 16)
    assert int(mask[:, 5:].sum()) == 0 and torch.all(cond[:, 5:] == 0)


def test_hash_text_encoder_and_class_conditions(tmp_path):
    tr = _trainer(tmp_path, "text.encoder=hash:32", "objective.cond_drop_prob=0")
    _, cond, mask = tr._condition({"image": torch.zeros(2, 3, 16, 16), "caption": ["a red circle", "dog"]},
                                  tr._generator(0, 0))
    assert cond.shape == (2, 16, 32) and mask.sum(1).tolist() == [4, 2]
    tc = _trainer(tmp_path / "c", "model.spec=pixeldit_tiny_c2i", "objective.cond_drop_prob=0.999")
    _, cls, m = tc._condition({"image": torch.zeros(2, 3, 16, 16), "label": torch.tensor([1, 2])},
                              tc._generator(0, 0))
    assert m is None and cls.tolist() == [10, 10]  # dropped to the null class


def test_objective_randomness_depends_on_step_and_shard_only(tmp_path):
    tr = _trainer(tmp_path)
    a = torch.randn(3, generator=tr._generator(5, 1))
    b = torch.randn(3, generator=tr._generator(5, 1))
    c = torch.randn(3, generator=tr._generator(5, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert derive_seed(0, 0, 5, 1) != derive_seed(0, 1, 5, 1)  # a roll-back changes the noise


def test_export_writes_a_loadable_model(tmp_path):
    from t2i_train.models.io import load_pretrained

    tr = _trainer(tmp_path)
    out = tr.export()
    m = load_pretrained(out)
    ref = tr.backend.raw.model.state_dict()
    assert all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)
