"""Validated per-sample fields (json sidecar, caption text, class label), shared by the loader and the builder.

Each parser returns clean Python values or raises :class:`BadSample` with the skip reason (``bad_json``,
``bad_caption``, ``bad_label``) and a detail naming the field, so one bad sample is counted and skipped and
never stops a build or a training run.
"""
from __future__ import annotations

import json
import math
from typing import Dict, Optional


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_json_meta(blob: bytes) -> Dict:
    """A sample's json: an object whose ``captions`` map source -> text and ``scores`` map source -> number."""
    try:
        meta = json.loads(blob.decode("utf-8") if isinstance(blob, (bytes, bytearray)) else blob)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample("bad_json", f"not UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"json is a {type(meta).__name__}, not an object")
    captions = meta.get("captions")
    if captions is not None:
        if not isinstance(captions, dict):
            raise BadSample("bad_json", f"'captions' is a {type(captions).__name__}, not an object")
        bad = [k for k, v in captions.items() if v is not None and not isinstance(v, str)]
        if bad:
            raise BadSample("bad_json", f"'captions.{bad[0]}' is not a string")
    scores = meta.get("scores")
    if scores is not None:
        if not isinstance(scores, dict):
            raise BadSample("bad_json", f"'scores' is a {type(scores).__name__}, not an object")
        for k, v in scores.items():
            if v is not None and not is_number(v):
                raise BadSample("bad_json", f"'scores.{k}' = {v!r} is not a finite number")
    if "label" in meta and meta["label"] is not None:
        meta["label"] = parse_label(meta["label"], "bad_json")
    return meta


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_label(value, reason: str = "bad_label") -> int:
    """A class index from an int, an integral float or the text of a ``.cls`` member."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample(reason, "class label is not UTF-8") from None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise BadSample(reason, f"class label {value[:40]!r} is not an integer") from None
    if is_number(value) and float(value).is_integer() and value >= 0:
        return int(value)
    raise BadSample(reason, f"class label {value!r} is not a non-negative integer")


def decode_caption(blob: Optional[bytes]) -> Optional[str]:
    """A ``.txt`` member or sidecar as stripped text; not UTF-8 is ``bad_caption`` (never replacement chars)."""
    if blob is None:
        return None
    try:
        return blob.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample("bad_caption", f"caption is not UTF-8 ({e})") from None
