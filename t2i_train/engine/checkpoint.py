"""Atomic, rotating training checkpoints in the backend's native format, plus per-rank extras.

Layout: run_dir/checkpoints/step_00001000/{<backend files>, extra_rank{r}.pt, meta.json} and a `latest` file
naming the newest complete one. A save writes into `.tmp-step_…`, renames it into place when every rank is done,
then replaces `latest` (write aside + os.replace), then deletes all but the newest `keep_last`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import dist as d


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "meta.json").is_file() else None

    def save(self, step: int, backend, extras: dict, meta: dict) -> Path:
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if d.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        backend.save(tmp)
        torch.save(extras, tmp / f"extra_rank{d.rank()}.pt")
        d.barrier()
        if d.is_main():
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": d.world_size(),
                                                       "backend": backend.name}, indent=2))
            if final.exists():  # re-saving a step after a roll-back
                old = self.root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(name + "\n")
            os.replace(pointer_tmp, self.root / "latest")
            self._prune(keep=final)
        d.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in done[: max(0, len(done) - self.keep_last)]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, backend) -> dict:
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != d.world_size() or meta["backend"] != backend.name:
            raise ValueError(f"{path}: saved by {meta['backend']} on {meta['world_size']} ranks; this run is "
                             f"{backend.name} on {d.world_size()} (full-state resume needs the same; use "
                             "model.init_from with an exported checkpoint to change them)")
        backend.load(path)
        return torch.load(path / f"extra_rank{d.rank()}.pt", map_location="cpu", weights_only=True)
