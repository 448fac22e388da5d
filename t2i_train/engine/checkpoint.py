"""Atomic, verified, rotating training checkpoints in the backend's native format, plus per-rank extras.

Layout: run_dir/checkpoints/step_00001000/{<backend files>, extra_rank{r}.pt, meta.json, manifest.json}, a
`latest` file naming the newest save and a `known_good` file naming the newest checkpoint that the following
training step accepted (the spike guard's roll-back target, never pruned).

A save writes into `.tmp-step_…`; after every rank is done, the files are fsynced, the manifest (size and sha256
of every file of every rank) is written last, the directory is renamed into place (then fsynced), `latest` is
replaced, and all but the newest `keep_last` (and `known_good`) are deleted. A directory without a manifest is an
unfinished save. Resume ignores `latest` as a source of truth: it takes the newest `step_*` whose manifest
verifies, and reports each newer one it skipped with the file that failed. Nothing is unpickled before that.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import dist as d
from .integrity import fsync_dir, fsync_tree, verify, write_manifest, write_text_durably

STEP_DIR = re.compile(r"step_(\d+)")


class ResumeError(RuntimeError):
    """Checkpoints exist but none can be resumed (or the one named by `checkpoint.resume` is damaged)."""


@dataclass
class ResumeChoice:
    path: Path | None  # the newest intact checkpoint, or None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, why) for each newer one passed over
    pointer_note: str | None = None  # what is wrong with the `latest` pointer, if anything
    set_aside: bool = False  # the skipped ones were moved to checkpoints/damaged/

    def warnings(self) -> list[str]:
        out = [f"skipped checkpoint {name}: {why}" for name, why in self.skipped]
        if self.skipped and self.set_aside:
            out.append(f"moved {', '.join(n for n, _ in self.skipped)} to {self.path.parent / 'damaged'}")
        if self.pointer_note:
            out.append(self.pointer_note)
        return out


def step_of(path: Path) -> int | None:
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, verify: str = "sha256"):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.verify_mode = verify

    # ------------------------------------------------------------------ finding
    def checkpoints(self) -> list[Path]:
        """Every `step_*` directory, newest (highest step) first."""
        found = [p for p in self.root.glob("step_*") if p.is_dir() and step_of(p) is not None] \
            if self.root.is_dir() else []
        return sorted(found, key=step_of, reverse=True)

    def find(self, upto: int | None = None) -> ResumeChoice:
        """Collective. The newest intact checkpoint (at or below step `upto`), and why newer ones were skipped."""
        names = d.broadcast_object([p.name for p in self.checkpoints()] if d.is_main() else None)
        choice = ResumeChoice(None)
        for name in names:
            path = self.root / name
            if upto is not None and step_of(path) > upto:
                continue
            reason = verify(path, self.verify_mode)
            if reason is None:
                choice.path = path
                break
            choice.skipped.append((name, reason))
        if d.is_main():
            choice.pointer_note = self._pointer_note(choice.path)
        return choice

    def resume_target(self, setting: str) -> ResumeChoice:
        """Collective. What `checkpoint.resume` (auto | never | a checkpoint directory) resumes from.

        auto never starts from scratch while `step_*` directories exist: if none of them is intact, it raises.
        """
        if setting == "never":
            return ResumeChoice(None)
        if setting != "auto":
            self.check(Path(setting))
            return ResumeChoice(Path(setting))
        choice = self.find()
        if choice.path is None and choice.skipped:
            raise ResumeError(f"{self.root}: no intact checkpoint ({'; '.join(choice.warnings())}); repair or move "
                              "them away, or pass checkpoint.resume=never to start from scratch")
        self._set_aside([name for name, _ in choice.skipped])
        choice.set_aside = bool(choice.skipped)
        return choice

    def _set_aside(self, names: list[str]) -> None:
        """Move damaged checkpoints newer than the resumed one to checkpoints/damaged/ (kept for inspection,
        out of rotation and never resumed)."""
        if d.is_main() and names:
            aside = self.root / "damaged"
            aside.mkdir(exist_ok=True)
            for name in names:
                target = aside / name
                shutil.rmtree(target, ignore_errors=True)
                (self.root / name).rename(target)
            fsync_dir(self.root)
        d.barrier()

    def latest(self) -> Path | None:
        return self.find().path

    def check(self, path: Path) -> None:
        """Collective. Raise ResumeError unless `path` is an intact checkpoint."""
        reason = verify(Path(path), self.verify_mode) if Path(path).is_dir() else "not a directory"
        if reason is not None:
            raise ResumeError(f"checkpoint.resume: {path}: {reason}")

    def _pointer_note(self, chosen: Path | None) -> str | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return "the `latest` pointer is missing" if chosen is not None else None
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            return f"{pointer}: not text (damaged); ignored"
        if not name:
            return f"{pointer}: empty; ignored"
        if not STEP_DIR.fullmatch(name):
            return f"{pointer}: does not name a checkpoint ({name[:40]!r}); ignored"
        if not (self.root / name).is_dir():
            return f"{pointer}: names {name}, which does not exist; ignored"
        if chosen is None or name != chosen.name:
            return f"{pointer}: names {name}, which is not the newest intact checkpoint; ignored"
        return None

    def known_good(self) -> Path | None:
        pointer = self.root / "known_good"
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        path = self.root / name
        return path if STEP_DIR.fullmatch(name) and path.is_dir() else None

    # ------------------------------------------------------------------ saving
    def save(self, step: int, backend, extras: dict, meta: dict) -> Path:
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if d.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        backend.save(tmp)
        torch.save(extras, tmp / f"extra_rank{d.rank()}.pt")
        if d.is_main():
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": d.world_size(),
                                                       "backend": backend.name}, indent=2))
        d.barrier()
        if d.local_rank() == 0:  # one rank per node flushes what that node wrote
            fsync_tree(tmp)
        write_manifest(tmp, step, hash_files=self.verify_mode == "sha256")  # the last file: marks it complete
        if d.is_main():
            if final.exists():  # re-saving a step after a roll-back
                old = self.root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
            fsync_dir(self.root)
            write_text_durably(self.root / "latest", name + "\n")
            self._prune(keep=final)
        d.barrier()
        return final

    def mark_good(self, path: Path) -> None:
        """The step after `path` was accepted: it is the new roll-back target; older ones may be pruned."""
        if d.is_main():
            write_text_durably(self.root / "known_good", path.name + "\n")
            self._prune(keep=path)

    def discard_newer(self, path: Path) -> list[str]:
        """After a roll-back to `path`: delete checkpoints of the abandoned timeline (newer steps)."""
        gone = []
        if d.is_main():
            for p in self.checkpoints():
                if step_of(p) > step_of(path):
                    shutil.rmtree(p, ignore_errors=True)
                    gone.append(p.name)
            write_text_durably(self.root / "latest", path.name + "\n")
        d.barrier()
        return gone

    def _prune(self, keep: Path) -> None:
        pinned = {keep, self.known_good()}
        for p in self.checkpoints()[self.keep_last:]:
            if p not in pinned:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, backend) -> dict:
        """Load a checkpoint that `find` or `check` verified (nothing here unpickles code)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise ResumeError(f"{path / 'meta.json'}: unreadable ({e})") from e
        if meta["world_size"] != d.world_size() or meta["backend"] != backend.name:
            raise ValueError(f"{path}: saved by {meta['backend']} on {meta['world_size']} ranks; this run is "
                             f"{backend.name} on {d.world_size()} (full-state resume needs the same; use "
                             "model.init_from with an exported checkpoint to change them)")
        backend.load(path)
        return torch.load(path / f"extra_rank{d.rank()}.pt", map_location="cpu", weights_only=True)
