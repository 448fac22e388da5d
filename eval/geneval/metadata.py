"""GenEval's prompt file and the official image layout.

`evaluation_metadata.jsonl` (553 lines) holds one prompt per line: `tag` (one of TAGS), `prompt`, `include`
(objects that must be there: `class`, `count`, optional `color`, optional `position` = [relation, index of the
include it is relative to]) and optional `exclude` (`class`, `count`: fewer than `count` allowed). Images live at
`<out>/<i:05d>/samples/<k:04d>.png` with the prompt's metadata line in `<out>/<i:05d>/metadata.jsonl`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TAG_TITLES = {"single_object": "single object", "two_object": "two objects", "counting": "counting",
              "colors": "colors", "position": "position", "color_attr": "color attribution"}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
# the 80 COCO classes in COCO order, spelled as GenEval's prompts and object_names.txt spell them
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
METADATA_NAME = "evaluation_metadata.jsonl"
METADATA_SOURCE = "https://github.com/djghosh13/geneval (prompts/evaluation_metadata.jsonl)"
PROMPT_METADATA_NAME = "metadata.jsonl"


def _check_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for key in ("tag", "prompt", "include"):
        if key not in entry:
            raise ValueError(f"{where}: missing key {key!r}")
    if entry["tag"] not in TAGS:
        raise ValueError(f"{where}: unknown tag {entry['tag']!r} (GenEval's tags: {', '.join(TAGS)})")
    for kind in ("include", "exclude"):
        for req in entry.get(kind, []):
            if not isinstance(req, dict) or "class" not in req or not isinstance(req.get("count"), int):
                raise ValueError(f"{where}: each {kind} needs 'class' and an integer 'count', got {req!r}")
            if req.get("color") is not None and req["color"] not in COLORS:
                raise ValueError(f"{where}: unknown color {req['color']!r} (one of {', '.join(COLORS)})")
            pos = req.get("position")
            if pos is not None and (len(pos) != 2 or pos[0] not in RELATIONS or not isinstance(pos[1], int)):
                raise ValueError(f"{where}: position must be [relation, include index] with a relation in "
                                 f"{RELATIONS}, got {pos!r}")
    return entry


def load_metadata(path: Union[str, os.PathLike]) -> list[dict]:
    """The prompts of `evaluation_metadata.jsonl`, checked; line i is prompt i."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval prompt file {path} not found; it is {METADATA_NAME} from {METADATA_SOURCE}")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        entries.append(_check_entry(entry, f"{path}:{n}"))
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return entries


def prompt_dir(out: Union[str, os.PathLike], index: int) -> Path:
    return Path(out) / f"{index:05d}"


def sample_path(out: Union[str, os.PathLike], index: int, k: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{k:04d}.png"


def write_prompt_metadata(out: Union[str, os.PathLike], index: int, entry: dict) -> Path:
    """`<out>/<index>/metadata.jsonl`: the prompt's line, as the official evaluator reads it (written atomically)."""
    path = prompt_dir(out, index) / PROMPT_METADATA_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text(json.dumps(entry) + "\n")
    os.replace(tmp, path)
    return path


def read_prompt_metadata(folder: Union[str, os.PathLike]) -> dict:
    path = Path(folder) / PROMPT_METADATA_NAME
    try:
        return _check_entry(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a GenEval prompt folder") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
