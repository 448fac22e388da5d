"""GenEval scoring of a folder in the official layout: detections → rules → results JSONL → summary.

The prompt set is checked first: every prompt of the metadata needs its folder (with the same metadata line) and
`n_samples` images; otherwise scoring is refused, or with `allow_incomplete` done and flagged in the table and JSON.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PIL import Image, ImageOps

from eval.geneval.detectors import ColorClassifier, Detector
from eval.geneval.metadata import load_metadata, read_prompt_metadata
from eval.geneval.rules import Rules, evaluate, select_objects
from eval.geneval.summary import format_table, summarize
from eval.runner import SETTINGS_NAME

_SAMPLE = re.compile(r"\d+\.png")


@dataclass
class PromptSet:
    """What a folder holds: prompt index → (metadata, image paths), and what it lacks against the prompt file."""

    prompts: Dict[int, tuple] = field(default_factory=dict)
    missing: List[int] = field(default_factory=list)
    short: Dict[int, int] = field(default_factory=dict)
    expected: Optional[int] = None

    @property
    def complete(self) -> bool:
        return self.expected is not None and not self.missing and not self.short


def scan_folder(images: Path, entries: Optional[Sequence[dict]], n_samples: int) -> PromptSet:
    if not images.is_dir():
        raise FileNotFoundError(f"GenEval image folder {images} not found")
    found = PromptSet(expected=len(entries) if entries is not None else None)
    for folder in sorted(p for p in images.iterdir() if p.is_dir() and p.name.isdigit()):
        index = int(folder.name)
        if not (folder / "metadata.jsonl").exists():
            continue  # generation stopped before this prompt was finished
        meta = read_prompt_metadata(folder)
        if entries is not None:
            if index >= len(entries):
                raise ValueError(f"{folder}: prompt index {index} is beyond the {len(entries)} prompts of the metadata")
            if meta != entries[index]:
                raise ValueError(f"{folder}/metadata.jsonl holds {meta['prompt']!r}, but prompt {index} of the "
                                 f"metadata is {entries[index]['prompt']!r}: images of another prompt file?")
        samples = sorted(p for p in (folder / "samples").glob("*.png") if _SAMPLE.fullmatch(p.name))
        if samples:
            found.prompts[index] = (meta, samples)
        if len(samples) < n_samples:
            found.short[index] = len(samples)
    if entries is not None:
        found.missing = [i for i in range(len(entries)) if i not in found.prompts]
    found.short = {i: n for i, n in found.short.items() if i in found.prompts}
    return found


def score_image(path: Path, metadata: dict, detector: Detector, colors: Optional[ColorClassifier],
                rules: Rules = Rules()) -> dict:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    objects = select_objects(detector.detect(image), metadata["tag"], rules)
    correct, reason = evaluate(image, objects, metadata, colors, rules)
    return {"tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct), "reason": reason,
            "metadata": json.dumps(metadata),
            "details": {k: [[*map(float, d.box), float(d.score)] for d in v] for k, v in objects.items()}}


def score_folder(images, detector: Detector, colors: Optional[ColorClassifier], *,
                 entries: Optional[Sequence[dict]] = None, n_samples: int = 4, allow_incomplete: bool = False,
                 rules: Rules = Rules(), progress: bool = True) -> tuple[list, dict]:
    """(per-image results, summary) for a folder in the official layout."""
    from tqdm import tqdm

    images = Path(images)
    found = scan_folder(images, entries, n_samples)
    if not found.complete and not allow_incomplete:
        what = ("the prompt set is unknown: pass --metadata" if found.expected is None else
                f"{len(found.missing)} of {found.expected} prompts have no images "
                f"(first: {found.missing[:5]}), {len(found.short)} have fewer than {n_samples}")
        raise SystemExit(f"{images}: incomplete GenEval folder — {what}; finish generation (it resumes), or pass "
                         "--allow-incomplete to score it anyway (flagged as not comparable)")
    todo = [(i, meta, p) for i, (meta, paths) in sorted(found.prompts.items()) for p in paths]
    results = []
    for index, meta, path in tqdm(todo, desc="GenEval scoring", unit="img", disable=not progress):
        results.append({"filename": str(path.relative_to(images)), "prompt_index": index,
                        **score_image(path, meta, detector, colors, rules)})
    summary = summarize(results, expected_prompts=found.expected, n_samples=n_samples,
                        missing_prompts=found.missing, short_prompts=found.short)
    summary["rules"] = asdict(rules)
    return results, summary


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(results: list, summary: dict, results_path: Path, summary_path: Path) -> None:
    _atomic_text(results_path, "".join(json.dumps(r) + "\n" for r in results))
    _atomic_text(summary_path, json.dumps(summary, indent=1) + "\n")


def _recorded_generation(images: Path) -> dict:
    path = images / SETTINGS_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def score_folder_from_args(args) -> int:
    from eval.geneval.backends import ClipColorClassifier
    from eval.geneval.detectors import build_detector

    images = Path(args.images)
    recorded = _recorded_generation(images) if images.is_dir() else {}
    metadata = args.metadata or (recorded.get("notes") or {}).get("metadata")
    entries = load_metadata(metadata) if metadata else None
    n_samples = args.n_samples or int(recorded.get("n_samples", 4))
    detector, colors = build_detector(args.detector, device=args.device, clip=args.clip)
    if colors is None:
        colors = ClipColorClassifier(args.clip, device=args.device)
    results, summary = score_folder(images, detector, colors, entries=entries, n_samples=n_samples,
                                    allow_incomplete=args.allow_incomplete, progress=not args.no_progress)
    summary.update(detector=args.detector, clip=args.clip if not args.detector.startswith("shapes") else None,
                   metadata=str(metadata) if metadata else None, images_dir=str(images),
                   generation=({k: recorded.get(k) for k in ("ckpt", "ckpt_sha256", "sampler", "height", "width",
                                                             "seed", "text_encoder")} if recorded else None))
    results_path = Path(args.results or images / "results.jsonl")
    summary_path = Path(args.summary or images / "summary.json")
    write_outputs(results, summary, results_path, summary_path)
    print(format_table(summary))
    print(f"results: {results_path}\nsummary: {summary_path}")
    return 0
