"""The generation runner: per-image seeds, resumption, the settings JSON and its guard, run_info.json, ranks."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.runner import SETTINGS_NAME, Job, load_generator, run_jobs
from eval_fixtures import save_tiny_t2i

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_t2i(tmp_path_factory.mktemp("t2i") / "export")


@pytest.fixture(scope="module")
def gen(ckpt):
    return load_generator(ckpt, device="cpu", text_encoder="hash:32")


def fast_cfg(gen, **kw):
    return gen.sampler_config(16, 16, steps=2, **kw)


def test_generator_images_do_not_depend_on_the_batch(gen):
    cfg = fast_cfg(gen)
    prompts, seeds = ["a red cat", "two dogs", "a blue bench"], [7, 8, 9]
    together = gen.generate(prompts, seeds, cfg, 16, 16)
    alone = torch.cat([gen.generate([p], [s], cfg, 16, 16) for p, s in zip(prompts, seeds)])
    assert together.shape == (3, 16, 16, 3) and together.dtype == torch.uint8
    assert (together.int() - alone.int()).abs().max() <= 1
    assert (together[0].int() - gen.generate(["a red cat"], [70], cfg, 16, 16)[0].int()).abs().max() > 10


def test_load_generator_reads_run_info_and_needs_a_text_encoder(tmp_path):
    bare = save_tiny_t2i(tmp_path / "bare")
    with pytest.raises(ValueError, match="pass --text-encoder"):
        load_generator(bare, device="cpu")
    info = {"text": {"encoder": "hash:32", "max_length": 16}, "resolution": [32, 48],
            "sampler": {"name": "euler", "steps": 3, "cfg_scale": 2.0}}
    withinfo = save_tiny_t2i(tmp_path / "info", run_info=info)
    g = load_generator(withinfo, device="cpu")
    assert g.text_encoder_name == "hash:32" and g.default_size() == (32, 48)
    cfg = g.sampler_config(32, 48, steps=5)
    assert (cfg.name, cfg.steps, cfg.cfg_scale, cfg.shift, cfg.dtype) == ("euler", 5, 2.0, 3.0, "float32")
    assert g.sha256 == hashlib.sha256((withinfo / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="gives 8-d embeddings, the model expects 32"):
        load_generator(withinfo, device="cpu", text_encoder="hash:8")
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        load_generator(tmp_path / "nowhere", device="cpu")


def test_run_jobs_records_settings_resumes_and_refuses_other_settings(gen, tmp_path):
    out = tmp_path / "out"
    jobs = [Job(cond=p, seed=10 + i, path=out / "sub" / f"{i}.png") for i, p in enumerate(["a cat", "a dog", "a cow"])]
    cfg = fast_cfg(gen)
    run_jobs(gen, jobs, cfg, 16, 16, out_dir=out, batch_size=2, progress=False, extra_settings={"benchmark": "t"})
    settings = json.loads((out / SETTINGS_NAME).read_text())
    assert settings["ckpt_sha256"] == gen.sha256 and settings["text_encoder"] == "hash:32"
    assert settings["sampler"]["steps"] == 2 and settings["sampler"]["cfg_scale"] == 4.5
    assert settings["sampler"]["shift"] == 3.0 and settings["sampler"]["cfg_interval"] == [0.0, 1.0]
    assert (settings["height"], settings["width"], settings["dtype"]) == (16, 16, "float32")
    assert settings["images"] == {"sub/0.png": 10, "sub/1.png": 11, "sub/2.png": 12}
    first = np.asarray(Image.open(jobs[0].path))
    assert first.shape == (16, 16, 3)
    assert np.array_equal(first, gen.generate(["a cat"], [10], cfg, 16, 16)[0].numpy())

    # resumption: an existing file is kept, a missing one is made again
    jobs[0].path.write_bytes(b"kept")
    jobs[2].path.unlink()
    run_jobs(gen, jobs, cfg, 16, 16, out_dir=out, batch_size=2, progress=False, extra_settings={"benchmark": "t"})
    assert jobs[0].path.read_bytes() == b"kept" and jobs[2].path.exists()

    # other settings: refused, nothing touched; --overwrite starts again
    with pytest.raises(SystemExit, match=r"other settings \(sampler"):
        run_jobs(gen, jobs, fast_cfg(gen, cfg_scale=2.0), 16, 16, out_dir=out, progress=False,
                 extra_settings={"benchmark": "t"})
    with pytest.raises(SystemExit, match="sub/1.png was made with seed 11, now it would be 99"):
        run_jobs(gen, [Job("a dog", 99, jobs[1].path)], cfg, 16, 16, out_dir=out, progress=False,
                 extra_settings={"benchmark": "t"})
    assert jobs[0].path.read_bytes() == b"kept"
    run_jobs(gen, jobs, fast_cfg(gen, cfg_scale=2.0), 16, 16, out_dir=out, progress=False, overwrite=True,
             extra_settings={"benchmark": "t"})
    assert jobs[0].path.read_bytes() != b"kept"
    assert json.loads((out / SETTINGS_NAME).read_text())["sampler"]["cfg_scale"] == 2.0


def test_class_conditional_generation(tmp_path):
    from t2i_train.models import build_model
    from t2i_train.models.io import save_pretrained

    torch.manual_seed(0)
    save_pretrained(build_model("pixeldit_tiny_c2i"), tmp_path / "c2i")
    g = load_generator(tmp_path / "c2i", device="cpu")
    n = int(g.model.config["num_classes"])
    cfg = g.sampler_config(16, 16, steps=2)
    assert (cfg.name, cfg.cfg_scale, cfg.cfg_interval) == ("flow_dpm_solver", 2.75, (0.1, 0.9))
    assert g.generate([0, n - 1], [1, 2], cfg, 16, 16).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match=f"out of range for a {n}-class model"):
        g.generate([n], [1], cfg, 16, 16)


def _geneval_generate(args, nproc=1):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--standalone", "-m", "eval"] if nproc > 1 else [sys.executable, "-m", "eval"])
    return subprocess.run(launcher + ["geneval", "generate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_ranks_make_the_same_images_as_one_process(ckpt, tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                                        "prompt": f"a photo of a {c}"}) + "\n" for c in ("cat", "dog", "cow")))
    common = ["--ckpt", ckpt, "--text-encoder", "hash:32", "--metadata", meta, "--n-samples", 2,
              "--height", 16, "--steps", 2, "--batch-size", 2, "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _geneval_generate(common + ["--out", one])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _geneval_generate(common + ["--out", two], nproc=2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(files) == 6 and files == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    for f in files:
        a, b = (np.asarray(Image.open(d / f)).astype(int) for d in (one, two))
        assert np.abs(a - b).max() <= 1, f
    s1, s2 = (json.loads((d / SETTINGS_NAME).read_text()) for d in (one, two))
    assert s2["world_size"] == 2 and s1["images"] == s2["images"]
