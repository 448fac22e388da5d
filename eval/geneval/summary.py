"""GenEval's summary: per-tag accuracy, overall = unweighted mean of the tags, % correct images and prompts.

Same numbers as the official `summary_scores.py`; in addition the summary says whether the prompt set was complete,
because a score over part of the 553 prompts is not comparable with published ones.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from eval.geneval.metadata import TAG_TITLES, TAGS


def summarize(results: Sequence[dict], *, expected_prompts: Optional[int], n_samples: int,
              missing_prompts: Sequence[int] = (), short_prompts: Optional[Dict[int, int]] = None) -> dict:
    """`results`: one dict per image with `prompt_index`, `tag`, `correct`."""
    short_prompts = dict(short_prompts or {})
    tags: Dict[str, dict] = {}
    for tag in TAGS:
        rows = [r for r in results if r["tag"] == tag]
        if rows:
            n_ok = sum(bool(r["correct"]) for r in rows)
            tags[tag] = {"score": n_ok / len(rows), "correct": n_ok, "images": len(rows)}
    by_prompt: Dict[int, bool] = {}
    for r in results:
        by_prompt[r["prompt_index"]] = by_prompt.get(r["prompt_index"], False) or bool(r["correct"])
    problems: List[str] = []
    if expected_prompts is None:
        problems.append("prompt set not checked (no --metadata)")
    if missing_prompts:
        problems.append(f"{len(missing_prompts)} of {expected_prompts} prompts have no images")
    if short_prompts:
        problems.append(f"{len(short_prompts)} prompts have fewer than {n_samples} images")
    absent = [t for t in TAGS if t not in tags]
    if absent:
        problems.append(f"no images for {', '.join(absent)}")
    return {
        "overall": sum(t["score"] for t in tags.values()) / len(tags) if tags else None,
        "tags": tags,
        "images": len(results),
        "prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results) if results else None,
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt) if by_prompt else None,
        "complete": not problems,
        "problems": problems,
        "expected_prompts": expected_prompts,
        "n_samples": n_samples,
        "missing_prompts": list(missing_prompts),
        "short_prompts": {str(k): v for k, v in sorted(short_prompts.items())},
    }


def format_table(summary: dict) -> str:
    lines = []
    if not summary["complete"]:
        lines += ["!" * 78, "INCOMPLETE PROMPT SET — not comparable with published GenEval scores:",
                  *(f"  - {p}" for p in summary["problems"]), "!" * 78]
    lines.append(f"GenEval: {summary['images']} images over {summary['prompts']} prompts")
    for tag, title in TAG_TITLES.items():
        t = summary["tags"].get(tag)
        lines.append(f"  {title:<22} " + (f"{t['score']:.4f}  ({t['correct']} / {t['images']})" if t else "—"))
    pct = (lambda v: "—" if v is None else f"{100 * v:.2f}%")
    overall = summary["overall"]
    lines += [f"  {'overall':<22} " + ("—" if overall is None else f"{overall:.4f}")
              + ("" if summary["complete"] else "  (INCOMPLETE)"),
              f"  {'% correct images':<22} {pct(summary['correct_images'])}",
              f"  {'% prompts any correct':<22} {pct(summary['correct_prompts'])}"]
    return "\n".join(lines)
