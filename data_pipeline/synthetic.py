"""Procedural demo data: coloured shapes with GenEval-style captions and exact ground truth.

Every image is drawn without anti-aliasing and saved losslessly (PNG by default), so the ground truth in the
sample's ``json`` is exact: ``objects`` (shape, colour, rgb, box ``[x0, y0, x1, y1]`` in pixels, exclusive
end), ``counts`` per shape, the GenEval ``tag`` and ``include`` list, and ``background``. Captions follow
GenEval's phrasing ("a photo of a red circle", "a photo of three triangles", "a photo of a red circle and a
blue square", "a photo of a green square left of a yellow circle"). ``mode="c2i"`` makes one-shape images
whose ``label`` is the shape class. Written through the shard builder like any other source.

CLI: ``python -m data_pipeline.synthetic --out DIR --num N [--size 64] [--mode t2i|c2i] [--seed 0]``
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from typing import Dict, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from data_pipeline.build_shards import BuildOptions, build_shards

SHAPES = ("circle", "square", "triangle", "diamond")
# GenEval's colour set.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (250, 220, 20), "green": (30, 160, 50),
    "blue": (30, 70, 220), "purple": (130, 40, 170), "pink": (255, 130, 190), "brown": (120, 70, 30),
    "black": (10, 10, 10), "white": (245, 245, 245),
}
# Muted mid-tone backgrounds: every object colour (black and white included) stands out on them.
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "grey": (128, 128, 128), "slate": (112, 128, 144), "sand": (170, 150, 120), "sage": (130, 150, 125),
    "mauve": (150, 125, 140),
}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "colors", "counting", "two_object", "color_attr", "position")
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], rgb) -> None:
    x0, y0, x1, y1 = box  # exclusive end; PIL boxes are inclusive, hence the -1
    if shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=rgb)
    elif shape == "diamond":
        cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _overlaps(a, b, gap):
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: random.Random, w: int, h: int, n: int, side: int, region=None, taken=(), gap=2):
    """``n`` non-overlapping square boxes of ``side`` px inside ``region`` (x0, y0, x1, y1)."""
    rx0, ry0, rx1, ry1 = region or (0, 0, w, h)
    boxes = []
    for _ in range(2000):
        if len(boxes) == n:
            return boxes
        if rx1 - rx0 < side or ry1 - ry0 < side:
            break
        x0, y0 = rng.randint(rx0, rx1 - side), rng.randint(ry0, ry1 - side)
        box = (x0, y0, x0 + side, y0 + side)
        if all(not _overlaps(box, b, gap) for b in list(taken) + boxes):
            boxes.append(box)
    return None


def make_scene(rng: random.Random, width: int, height: int, tag: str, mode: str = "t2i") -> Dict:
    """A scene description (objects with boxes) and its caption(s); no pixels yet."""
    short = min(width, height)
    for _ in range(100):
        side = rng.randint(max(6, short // 6), max(7, short // 3))
        bg = rng.choice(sorted(BACKGROUNDS))
        if tag in ("single_object", "colors"):
            shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
            boxes = _place(rng, width, height, 1, side)
            objs = [(shape, color, boxes[0])] if boxes else None
            if tag == "single_object":
                prompt = f"a photo of {article(shape)} {shape}"
                include = [{"class": shape, "count": 1}]
            else:
                prompt = f"a photo of {article(color)} {color} {shape}"
                include = [{"class": shape, "count": 1, "color": color}]
        elif tag == "counting":
            shape, n = rng.choice(SHAPES), rng.randint(2, 4)
            side = max(6, min(side, short // 4))
            boxes = _place(rng, width, height, n, side)
            objs = [(shape, rng.choice(sorted(COLORS)), b) for b in boxes] if boxes else None
            prompt = f"a photo of {NUMBERS[n]} {plural(shape)}"
            include = [{"class": shape, "count": n}]
        elif tag in ("two_object", "color_attr"):
            s1, s2 = rng.sample(SHAPES, 2)
            c1, c2 = rng.sample(sorted(COLORS), 2)
            boxes = _place(rng, width, height, 2, side)
            objs = [(s1, c1, boxes[0]), (s2, c2, boxes[1])] if boxes else None
            if tag == "two_object":
                prompt = f"a photo of {article(s1)} {s1} and {article(s2)} {s2}"
                include = [{"class": s1, "count": 1}, {"class": s2, "count": 1}]
            else:
                prompt = f"a photo of {article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}"
                include = [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]
        elif tag == "position":
            s1, s2 = rng.sample(SHAPES, 2)
            c1, c2 = rng.sample(sorted(COLORS), 2)
            rel = rng.choice(RELATIONS)
            side = max(6, min(side, short // 3 - 2))
            halves = {"left of": ((0, 0, width // 2, height), (width // 2, 0, width, height)),
                      "above": ((0, 0, width, height // 2), (0, height // 2, width, height))}
            flip = rel in ("right of", "below")
            first, second = halves["left of" if rel in ("left of", "right of") else "above"]
            if flip:
                first, second = second, first
            b1 = _place(rng, width, height, 1, side, region=first)
            b2 = _place(rng, width, height, 1, side, region=second, taken=b1 or ())
            objs = [(s1, c1, b1[0]), (s2, c2, b2[0])] if b1 and b2 else None
            prompt = f"a photo of {article(c1)} {c1} {s1} {rel} {article(c2)} {c2} {s2}"
            include = [{"class": s2, "count": 1, "color": c2},
                       {"class": s1, "count": 1, "color": c1, "position": [rel, 0]}]
        else:
            raise ValueError(f"unknown tag {tag!r}; known: {TAGS}")
        if objs:
            break
    else:
        raise RuntimeError(f"could not place objects for {tag} in {width}x{height}")
    objects = [{"shape": s, "color": c, "rgb": list(COLORS[c]), "box": list(b)} for s, c, b in objs]
    counts: Dict[str, int] = {}
    for o in objects:
        counts[o["shape"]] = counts.get(o["shape"], 0) + 1
    where = ", ".join(f"{o['color']} {o['shape']} at ({(o['box'][0] + o['box'][2]) // 2}, "
                      f"{(o['box'][1] + o['box'][3]) // 2})" for o in objects)
    scene = {"tag": tag, "prompt": prompt, "include": include, "objects": objects, "counts": counts,
             "background": bg, "background_rgb": list(BACKGROUNDS[bg]),
             "detailed": f"{prompt[len('a photo of '):]} on a plain {bg} background: {where}"}
    if mode == "c2i":
        scene["label"] = SHAPES.index(objects[0]["shape"])
    return scene


def render(scene: Dict, width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), tuple(scene["background_rgb"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        draw_shape(draw, o["shape"], o["box"], tuple(o["rgb"]))
    return img


def synthetic_records(num: int, seed: int = 0, size: int = 64, mode: str = "t2i", aspect: str = "varied",
                      tags: Optional[Sequence[str]] = None, image_format: str = "png"):
    tags = list(tags or (("single_object",) if mode == "c2i" else TAGS))
    for i in range(num):
        rng = random.Random(f"synthetic-{seed}-{i}")
        aw, ah = rng.choice(ASPECTS) if aspect == "varied" else (1, 1)
        scale = size / math.sqrt(aw * ah)
        width, height = max(16, round(aw * scale)), max(16, round(ah * scale))
        tag = tags[i % len(tags)]
        scene = make_scene(rng, width, height, tag, mode)
        buf = io.BytesIO()
        render(scene, width, height).save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
        extra = {k: v for k, v in scene.items() if k not in ("prompt", "detailed", "label")}
        yield {"key": f"synth_{seed}_{i:07d}", "image": buf.getvalue(),
               "captions": {"prompt": scene["prompt"], "detailed": scene["detailed"]}, "scores": {},
               "label": scene.get("label"), "extra": extra, "origin": f"synthetic:{i}"}


def write_synthetic(out_dir: str, num: int, seed: int = 0, size: int = 64, mode: str = "t2i",
                    aspect: str = "varied", samples_per_shard: int = 100, tags=None, image_format: str = "png",
                    workers: int = 0, progress: bool = False) -> Dict:
    """Write ``num`` synthetic samples as shards in ``out_dir`` (through the shard builder); returns its stats."""
    classes = list(SHAPES) if mode == "c2i" else None
    return build_shards(synthetic_records(num, seed, size, mode, aspect, tags, image_format), out_dir,
                        name="synthetic", samples_per_shard=samples_per_shard, opts=BuildOptions(),
                        workers=workers, classes=classes, progress=progress,
                        dataset_name=f"synthetic-{mode}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--size", type=int, default=64, help="about sqrt(width*height) of each image")
    p.add_argument("--mode", choices=["t2i", "c2i"], default="t2i")
    p.add_argument("--aspect", choices=["varied", "square"], default="varied")
    p.add_argument("--tags", default=None, help=f"comma list out of {','.join(TAGS)}")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stats = write_synthetic(a.out, a.num, a.seed, a.size, a.mode, a.aspect, a.samples_per_shard,
                            a.tags.split(",") if a.tags else None, a.format, progress=True)
    print(json.dumps(stats, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
