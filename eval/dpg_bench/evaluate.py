"""Score a folder of DPG-Bench tiles (`<item_id>.png`, 2×2) with a VQA model; write and print the report.

VQA answers are appended to `dpg_answers.jsonl` as they come (per image, per crop, per question, with the
VQA model's name), so an interrupted run resumes and both modes can be reported from one set of answers.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .questions import Question, read_questions
from .scoring import ImageScore, benchmark_score, category_scores, normalize_answer, score_image, split_tile
from .vqa import VQA

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
ANSWERS_FILE = "dpg_answers.jsonl"


def list_images(image_dir: Path) -> dict[str, Path]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"DPG-Bench image folder {image_dir} not found")
    return {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def _load_answers(path: Path, vqa_name: str) -> dict[str, list[dict[str, str]]]:
    cached = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec["vqa"] == vqa_name:
                    cached[rec["item"]] = rec["answers"]
    return cached


def ask_image(vqa: VQA, image_path: Path, questions: list[Question]) -> list[dict[str, str]]:
    """Per crop, {question text: raw answer}."""
    with Image.open(image_path) as im:
        crops = split_tile(im.convert("RGB"))
    texts = [q.text for q in questions]
    return [dict(zip(texts, vqa.ask(crop, texts))) for crop in crops]


def collect_answers(vqa: VQA, images: dict[str, Path], questions: dict[str, list[Question]], answers_path: Path,
                    progress: bool = True) -> dict[str, list[dict[str, str]]]:
    cached = _load_answers(answers_path, vqa.name)
    todo = [k for k in images if k not in cached or any(q.text not in crop for crop in cached[k] for q in questions[k])]
    with open(answers_path, "a") as f:
        for item in tqdm(todo, desc=f"DPG-Bench VQA ({vqa.name})", disable=not progress):
            cached[item] = ask_image(vqa, images[item], questions[item])
            f.write(json.dumps({"item": item, "vqa": vqa.name, "answers": cached[item]}) + "\n")
            f.flush()
    return cached


def evaluate(image_dir: str | Path, csv_path: str | Path, vqa: VQA, *, official_compat: bool = False,
             allow_incomplete: bool = False, progress: bool = True) -> dict:
    image_dir = Path(image_dir)
    questions = read_questions(csv_path, official_compat=official_compat)
    images = list_images(image_dir)
    unknown = sorted(set(images) - set(questions))
    if unknown:
        raise ValueError(f"{image_dir}: {len(unknown)} image(s) name no item of {csv_path}, e.g. "
                         f"{images[unknown[0]].name}; images must be named <item_id>.png")
    missing = sorted(set(questions) - set(images))
    if missing and not allow_incomplete:
        raise ValueError(f"{image_dir}: {len(missing)} of {len(questions)} DPG-Bench items have no image (e.g. "
                         f"{missing[0]}.png); a score on a partial set is not comparable — generate them, or pass "
                         f"--allow-incomplete to score anyway (the report is flagged)")
    answers = collect_answers(vqa, images, questions, image_dir / ANSWERS_FILE, progress)

    scored: list[ImageScore] = []
    failed: list[str] = []
    for item in images:
        qs = questions[item]
        per_crop = [{q.qid: normalize_answer(crop[q.text]) for q in qs} for crop in answers[item]]
        try:
            scored.append(score_image(item, per_crop, qs))
        except KeyError:  # official-compat only: a dependency on the dropped first row; the official skips the image
            failed.append(item)
    broad, detailed = category_scores(scored, questions, official_compat=official_compat)
    return {
        "benchmark": "DPG-Bench",
        "mode": "official-compat" if official_compat else "default",
        "score": benchmark_score(scored),
        "num_images": len(scored),
        "num_items": len(questions),
        "complete": not missing and not failed,
        "missing_images": missing,
        "failed_images": failed,
        "category_broad": broad,
        "category_detailed": detailed,
        "per_image": {im.item_id: im.score * 100 for im in scored},
        "vqa": vqa.name,
        "csv": str(csv_path),
        "images": str(image_dir),
    }


def format_report(report: dict) -> str:
    mode = report["mode"]
    lines = [f"DPG-Bench ({mode} mode; VQA {report['vqa']}) on {report['num_images']} of {report['num_items']} items"]
    if not report["complete"]:
        lines.append(f"  WARNING: incomplete — {len(report['missing_images'])} missing, "
                     f"{len(report['failed_images'])} failed images; not comparable with published scores")
    lines += [f"  {'category':<28}{'score':>8}"]
    lines += [f"  {k:<28}{v:8.2f}" for k, v in report["category_broad"].items()]
    lines += [f"    {k:<26}{v:8.2f}" for k, v in report["category_detailed"].items()]
    lines.append(f"  {'DPG-Bench score':<28}{report['score']:8.2f}")
    return "\n".join(lines)
