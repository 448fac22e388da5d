"""GenEval generation: `n_samples` images per prompt of `evaluation_metadata.jsonl`, in the official layout.

Image k of prompt i uses seed `seed + i * n_samples + k`, so any subset, batch size or rank count gives the
same pictures.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from eval.runner import Generator, Job, file_sha256, run_jobs
from eval.geneval.metadata import prompt_dir, sample_path, write_prompt_metadata
from t2i_train.diffusion.samplers import SamplerConfig
from t2i_train.engine import dist


def geneval_jobs(entries: Sequence[dict], indices: Sequence[int], out: Path, n_samples: int, seed: int) -> list[Job]:
    return [Job(cond=entries[i]["prompt"], seed=seed + i * n_samples + k, path=sample_path(out, i, k))
            for i in indices for k in range(n_samples)]


def write_grids(out: Path, indices: Sequence[int], n_samples: int) -> None:
    from t2i_train.sample import make_grid

    cols = 2 if n_samples == 4 else n_samples
    for i in indices:
        grid = prompt_dir(out, i) / "grid.png"
        if not grid.exists():
            make_grid([sample_path(out, i, k) for k in range(n_samples)], cols, grid)


def generate_geneval(gen: Generator, entries: Sequence[dict], metadata_path: Union[str, os.PathLike],
                     out: Union[str, os.PathLike], cfg: SamplerConfig, height: int, width: int, *,
                     n_samples: int = 4, seed: int = 0, indices: Sequence[int] | None = None, batch_size: int = 8,
                     overwrite: bool = False, grid: bool = False, progress: bool = True) -> dict:
    """Generate (resumably) the images of the prompts `indices` (default all); returns the recorded settings."""
    out = Path(out)
    indices = list(range(len(entries))) if indices is None else list(indices)
    extra = {"benchmark": "geneval", "metadata_sha256": file_sha256(metadata_path),
             "num_prompts": len(entries), "n_samples": int(n_samples), "seed": int(seed)}
    settings = run_jobs(gen, geneval_jobs(entries, indices, out, n_samples, seed), cfg, height, width,
                        out_dir=out, batch_size=batch_size, overwrite=overwrite, extra_settings=extra,
                        notes={"metadata": str(Path(metadata_path).resolve())},
                        progress=progress)
    if dist.rank() == 0:
        for i in indices:
            write_prompt_metadata(out, i, entries[i])
        if grid:
            write_grids(out, indices, n_samples)
    dist.barrier()
    return settings
