"""Caption choice between sources (the reference's clip-score rule) and the text-dropout hook.

A sample's ``json`` holds ``captions`` ({source: text}, the main one under ``prompt``) and ``scores``
({source: clip score}). Rule (reference ``weighted_sample_clipscore``): sources whose score is at least
``clip_thr`` are candidates, drawn with weight ``score ** (1 / max(temperature, 0.01))``; if none passes the
threshold the best-scored source is used; without any score, ``caption_proportion`` weights the available
sources (default: the main caption).
"""
from __future__ import annotations

import random
from typing import Dict, List, Mapping, Optional, Tuple

MAIN_SOURCE = "prompt"


def choose_caption(captions: Mapping[str, str], scores: Optional[Mapping[str, float]], rng: random.Random,
                   clip_thr: float = 0.0, clip_thr_temperature: float = 1.0,
                   caption_proportion: Optional[Mapping[str, float]] = None) -> Tuple[str, str]:
    """Return ``(source, caption)``; caption is "" when the sample has none."""
    available = {k: v for k, v in captions.items() if isinstance(v, str) and v.strip()}
    if not available:
        return MAIN_SOURCE, ""
    scored = [(k, float(s)) for k, s in (scores or {}).items() if k in available and s is not None]
    if scored:
        passing = [(k, s) for k, s in scored if s >= clip_thr]
        if not passing:
            best = max(scored, key=lambda kv: kv[1])[0]
            return best, available[best]
        power = 1.0 / max(clip_thr_temperature, 0.01)
        # Normalise by the max first so large powers (temperature 0.1 -> ^10) cannot overflow.
        top = max(s for _, s in passing)
        weights = [(s / top) ** power if top > 0 else 1.0 for _, s in passing]
        source = rng.choices([k for k, _ in passing], weights=weights, k=1)[0]
        return source, available[source]
    proportion = {k: float(w) for k, w in (caption_proportion or {}).items() if k in available and w > 0}
    if proportion:
        source = rng.choices(list(proportion), weights=list(proportion.values()), k=1)[0]
        return source, available[source]
    source = MAIN_SOURCE if MAIN_SOURCE in available else sorted(available)[0]
    return source, available[source]


def caption_dropout(captions: List[str], p: float, rng: random.Random) -> List[str]:
    """Replace each caption by "" with probability ``p`` (classifier-free guidance training).

    The trainer and the loader share this hook; one draw of ``rng.random()`` per caption.
    """
    if p <= 0:
        return list(captions)
    return ["" if rng.random() < p else c for c in captions]


def captions_from_json(meta: Dict, txt: Optional[str]) -> Dict[str, str]:
    caps = dict(meta.get("captions") or {})
    if txt and MAIN_SOURCE not in caps:
        caps[MAIN_SOURCE] = txt
    return caps
