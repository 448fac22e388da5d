"""Procedural demo data: coloured shapes with GenEval-style captions and exact ground truth.

Every image is drawn without anti-aliasing and saved losslessly (PNG by default), so the ground truth in the
sample's ``json`` is exact: ``objects`` (shape, colour, rgb, box ``[x0, y0, x1, y1]`` in pixels, exclusive
end), ``counts`` per shape, the GenEval ``tag`` and ``include`` list, and ``background``. Captions follow
GenEval's phrasing ("a photo of a red circle", "a photo of three triangles", "a photo of a red circle and a
blue square", "a photo of a green square left of a yellow circle"). ``mode="c2i"`` makes one-shape images
whose ``label`` is the shape class. Written through the shard builder like any other source.

With a ``Holdout`` (``--holdout``) no training caption uses a held-out combination — certain colour×shape pairs,
count×shape pairs, shape pairs and shape×relation×shape triples — and ``--eval-metadata FILE`` writes exactly
those combinations as GenEval prompts (``evaluation_metadata.jsonl``), so a score on them measures
generalisation to unseen combinations of seen words. ``--source`` writes a folder of ``<key>.png`` +
``<key>.json`` for ``t2i-build-shards DIR --kind folder`` (the path any user data takes) instead of shards.

CLI: ``python -m data_pipeline.synthetic --out DIR --num N [--size 64 | --sizes 48x48,64x32] [--mode t2i|c2i]
[--object-size PX] [--grid PX] [--backgrounds grey,...] [--seed 0] [--source] [--holdout]
[--eval-metadata FILE --eval-per-tag K]``
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw
from tqdm import tqdm

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


def _place(rng: random.Random, w: int, h: int, n: int, side: int, region=None, taken=(), gap=2, grid=1):
    """``n`` non-overlapping square boxes of ``side`` px inside ``region`` (x0, y0, x1, y1), their corners on
    multiples of ``grid`` px."""
    rx0, ry0, rx1, ry1 = region or (0, 0, w, h)
    # grid 1 keeps randint: the exact draws of every layout made before grids existed
    xs = range(rx0, rx1 - side + 1) if grid == 1 else [x for x in range(rx0, rx1 - side + 1) if x % grid == 0]
    ys = range(ry0, ry1 - side + 1) if grid == 1 else [y for y in range(ry0, ry1 - side + 1) if y % grid == 0]
    boxes = []
    for _ in range(2000):
        if len(boxes) == n:
            return boxes
        if not xs or not ys:
            break
        if grid == 1:
            x0, y0 = rng.randint(rx0, rx1 - side), rng.randint(ry0, ry1 - side)
        else:
            x0, y0 = rng.choice(xs), rng.choice(ys)
        box = (x0, y0, x0 + side, y0 + side)
        if all(not _overlaps(box, b, gap) for b in list(taken) + boxes):
            boxes.append(box)
    return None


@dataclass(frozen=True)
class Layout:
    """How scenes are laid out. The defaults vary everything; the CPU demo fixes what its tiny model should not
    have to learn in minutes (object size, sub-patch offsets, background) so that what it learns is the words.

    object_size: every object's side in px (None: 0.3–0.45 of the short side, a little less for counted and
    placed ones); grid: object boxes start on multiples of this many px (the model's patch size aligns each
    shape with the patch grid); backgrounds: the background palette names to draw from (None: all)."""
    object_size: Optional[int] = None
    grid: int = 1
    backgrounds: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.object_size is not None and self.object_size < 4:
            raise ValueError(f"object_size must be at least 4 px, got {self.object_size}")
        if self.grid < 1:
            raise ValueError(f"grid must be at least 1 px, got {self.grid}")
        unknown = sorted(set(self.backgrounds or ()) - set(BACKGROUNDS))
        if unknown or self.backgrounds == ():
            raise ValueError(f"unknown background(s) {unknown or '(none given)'}; known: {sorted(BACKGROUNDS)}")


def make_scene(rng: random.Random, width: int, height: int, tag: str, mode: str = "t2i",
               layout: Layout = Layout()) -> Dict:
    """A scene description (objects with boxes) and its caption(s); no pixels yet."""
    short = min(width, height)
    fixed = layout.object_size
    if fixed is not None and fixed > short:
        raise ValueError(f"object_size {fixed} px does not fit a {width}x{height} image")
    grid = layout.grid

    def place(n, side, region=None, taken=()):
        return _place(rng, width, height, n, side, region=region, taken=taken, grid=grid)

    for _ in range(100):
        # by default objects span 0.3–0.45 of the short side (10–14 px at 32²), counted and placed ones a
        # little less (n of them must fit); `layout.object_size` fixes every side instead
        side = fixed or rng.randint(max(6, round(0.3 * short)), max(7, round(0.45 * short)))
        bg = rng.choice(sorted(layout.backgrounds or BACKGROUNDS))
        if tag in ("single_object", "colors"):
            shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
            boxes = place(1, side)
            objs = [(shape, color, boxes[0])] if boxes else None
            if tag == "single_object":
                prompt = f"a photo of {article(shape)} {shape}"
                include = [{"class": shape, "count": 1}]
            else:
                prompt = f"a photo of {article(color)} {color} {shape}"
                include = [{"class": shape, "count": 1, "color": color}]
        elif tag == "counting":
            shape, n = rng.choice(SHAPES), rng.randint(2, 4)
            if fixed is None:
                side = max(6, min(side, int(short * (0.4 if n == 2 else 0.36))))  # n of them still fit
            boxes = place(n, side)
            objs = [(shape, rng.choice(sorted(COLORS)), b) for b in boxes] if boxes else None
            prompt = f"a photo of {NUMBERS[n]} {plural(shape)}"
            include = [{"class": shape, "count": n}]
        elif tag in ("two_object", "color_attr"):
            s1, s2 = rng.sample(SHAPES, 2)
            c1, c2 = rng.sample(sorted(COLORS), 2)
            boxes = place(2, side)
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
            if fixed is None:
                side = max(6, min(side, short // 2 - 3))  # each fits in its half with a gap
            halves = {"left of": ((0, 0, width // 2, height), (width // 2, 0, width, height)),
                      "above": ((0, 0, width, height // 2), (0, height // 2, width, height))}
            flip = rel in ("right of", "below")
            first, second = halves["left of" if rel in ("left of", "right of") else "above"]
            if flip:
                first, second = second, first
            b1 = place(1, side, region=first)
            b2 = place(1, side, region=second, taken=b1 or ())
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


class Holdout:
    """Attribute combinations kept out of every training caption, and the GenEval prompts that test them.

    colour k (in sorted order) × shape k mod 4 (10 of 40 pairs); count n × shape n + 1 mod 4 (3 of 12);
    the shape pairs {circle, triangle} and {square, diamond} (2 of 6); for relation r the ordered shape pairs
    (r, r + 1) and (r + 2, r + 3) mod 4 (8 of 48 triples). Single-object prompts have nothing to combine.
    """

    def __init__(self):
        colours = sorted(COLORS)
        self.colour_shape = {(c, SHAPES[k % len(SHAPES)]) for k, c in enumerate(colours)}
        self.count_shape = {(n, SHAPES[(n + 1) % len(SHAPES)]) for n in (2, 3, 4)}
        self.shape_pairs = {frozenset(("circle", "triangle")), frozenset(("square", "diamond"))}
        self.relations = {(SHAPES[(r + a) % 4], rel, SHAPES[(r + a + 1) % 4])
                          for r, rel in enumerate(RELATIONS) for a in (0, 2)}

    def covers(self, tag: str, include: Sequence[Dict]) -> bool:
        """True if a caption with this GenEval ``include`` list uses a held-out combination."""
        if any((o.get("color"), o["class"]) in self.colour_shape for o in include):
            return True
        if tag == "counting":
            return (include[0]["count"], include[0]["class"]) in self.count_shape
        if tag in ("two_object", "color_attr"):
            return frozenset(o["class"] for o in include) in self.shape_pairs
        if tag == "position":
            return (include[1]["class"], include[1]["position"][0], include[0]["class"]) in self.relations
        return False

    def prompts(self, per_tag: int, seed: int = 0) -> List[Dict]:
        """Up to ``per_tag`` GenEval metadata entries per tag, drawn from the held-out combinations only."""
        rng = random.Random(f"holdout-{seed}")
        colours = sorted(COLORS)
        seen_pairs = sorted({(c, s) for c in colours for s in SHAPES} - self.colour_shape)
        out = []
        for shape in SHAPES[:per_tag]:
            out.append(_entry("single_object", [{"class": shape, "count": 1}], f"a photo of {article(shape)} {shape}"))
        for c, shape in rng.sample(sorted(self.colour_shape), min(per_tag, len(self.colour_shape))):
            out.append(_entry("colors", [{"class": shape, "count": 1, "color": c}],
                              f"a photo of {article(c)} {c} {shape}"))
        counts = sorted(self.count_shape)
        for k in range(min(per_tag, len(counts))):
            n, shape = counts[k % len(counts)]
            out.append(_entry("counting", [{"class": shape, "count": n}], f"a photo of {NUMBERS[n]} {plural(shape)}",
                              exclude=[{"class": shape, "count": n + 1}]))
        pairs = sorted(tuple(sorted(p)) for p in self.shape_pairs)
        for k in range(min(per_tag, 2 * len(pairs))):
            s1, s2 = pairs[k % len(pairs)][:: 1 if k < len(pairs) else -1]
            out.append(_entry("two_object", [{"class": s1, "count": 1}, {"class": s2, "count": 1}],
                              f"a photo of {article(s1)} {s1} and {article(s2)} {s2}"))
        for k in range(per_tag):
            (c1, s1), (c2, s2) = rng.sample(sorted(self.colour_shape), 2)
            while s1 == s2:
                (c1, s1), (c2, s2) = rng.sample(sorted(self.colour_shape), 2)
            out.append(_entry("color_attr", [{"class": s1, "count": 1, "color": c1},
                                             {"class": s2, "count": 1, "color": c2}],
                              f"a photo of {article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}"))
        for s1, rel, s2 in rng.sample(sorted(self.relations), min(per_tag, len(self.relations))):
            c1, c2 = _two_colours(rng, seen_pairs, s1, s2)
            out.append(_entry("position", [{"class": s2, "count": 1, "color": c2},
                                           {"class": s1, "count": 1, "color": c1, "position": [rel, 0]}],
                              f"a photo of {article(c1)} {c1} {s1} {rel} {article(c2)} {c2} {s2}"))
        return out


def _two_colours(rng: random.Random, seen_pairs, s1: str, s2: str) -> Tuple[str, str]:
    """Two different colours that the training captions do pair with s1 and s2 (the relation is what is new)."""
    while True:
        c1 = rng.choice([c for c, s in seen_pairs if s == s1])
        c2 = rng.choice([c for c, s in seen_pairs if s == s2])
        if c1 != c2:
            return c1, c2


def _entry(tag: str, include: List[Dict], prompt: str, exclude: Optional[List[Dict]] = None) -> Dict:
    e = {"tag": tag, "include": include, "prompt": prompt}
    if exclude:
        e["exclude"] = exclude
    return e


def write_eval_metadata(path: str, holdout: Holdout, per_tag: int, seed: int = 0) -> List[Dict]:
    """GenEval's ``evaluation_metadata.jsonl``: one held-out prompt per line."""
    entries = holdout.prompts(per_tag, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    return entries


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    """``"48x48,64x32"`` → ``[(48, 48), (64, 32)]`` (width x height)."""
    out = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"image size {part!r} is not WIDTHxHEIGHT (e.g. 64x32)") from None
        if w < 16 or h < 16:
            raise ValueError(f"image size {part!r}: both sides must be at least 16 px")
        out.append((w, h))
    return out


def synthetic_records(num: int, seed: int = 0, size: int = 64, mode: str = "t2i", aspect: str = "varied",
                      tags: Optional[Sequence[str]] = None, image_format: str = "png",
                      holdout: Optional[Holdout] = None, layout: Layout = Layout(),
                      sizes: Optional[Sequence[Tuple[int, int]]] = None):
    """``num`` samples. Image sizes: ``sizes`` (width, height) drawn uniformly when given (exact bucket sizes
    need no resize in the loader), else about ``size``² at an aspect ratio from ``ASPECTS`` (``aspect="varied"``)
    or square."""
    tags = list(tags or (("single_object",) if mode == "c2i" else TAGS))
    for i in range(num):
        rng = random.Random(f"synthetic-{seed}-{i}")
        if sizes:
            width, height = rng.choice(list(sizes))
        else:
            aw, ah = rng.choice(ASPECTS) if aspect == "varied" else (1, 1)
            scale = size / math.sqrt(aw * ah)
            width, height = max(16, round(aw * scale)), max(16, round(ah * scale))
        tag = tags[i % len(tags)]
        scene = make_scene(rng, width, height, tag, mode, layout)
        while holdout is not None and holdout.covers(tag, scene["include"]):
            scene = make_scene(rng, width, height, tag, mode, layout)
        buf = io.BytesIO()
        render(scene, width, height).save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
        extra = {k: v for k, v in scene.items() if k not in ("prompt", "detailed", "label")}
        yield {"key": f"synth_{seed}_{i:07d}", "image": buf.getvalue(),
               "captions": {"prompt": scene["prompt"], "detailed": scene["detailed"]}, "scores": {},
               "label": scene.get("label"), "extra": extra, "origin": f"synthetic:{i}"}


def write_synthetic(out_dir: str, num: int, seed: int = 0, size: int = 64, mode: str = "t2i",
                    aspect: str = "varied", samples_per_shard: int = 100, tags=None, image_format: str = "png",
                    workers: int = 0, progress: bool = False, holdout: Optional[Holdout] = None,
                    layout: Layout = Layout(), sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Dict:
    """Write ``num`` synthetic samples as shards in ``out_dir`` (through the shard builder); returns its stats."""
    classes = list(SHAPES) if mode == "c2i" else None
    records = synthetic_records(num, seed, size, mode, aspect, tags, image_format, holdout, layout, sizes)
    return build_shards(records, out_dir,
                        name="synthetic", samples_per_shard=samples_per_shard, opts=BuildOptions(),
                        workers=workers, classes=classes, progress=progress,
                        dataset_name=f"synthetic-{mode}")


def write_source_folder(out_dir: str, records) -> int:
    """``<key>.png`` + ``<key>.json`` (captions, scores, ground truth) per record: a source for ``t2i-build-shards``."""
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for r in records:
        ext = "png" if r["image"][:4] == b"\x89PNG" else "jpg"
        with open(os.path.join(out_dir, f"{r['key']}.{ext}"), "wb") as f:
            f.write(r["image"])
        meta = {"captions": r["captions"], "scores": r["scores"], **r["extra"]}
        if r.get("label") is not None:
            meta["label"] = r["label"]
        with open(os.path.join(out_dir, f"{r['key']}.json"), "w") as f:
            json.dump(meta, f)
        n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--size", type=int, default=64, help="about sqrt(width*height) of each image")
    p.add_argument("--mode", choices=["t2i", "c2i"], default="t2i")
    p.add_argument("--aspect", choices=["varied", "square"], default="varied")
    p.add_argument("--sizes", default=None, help="exact image sizes WxH,WxH,... drawn uniformly (overrides --size "
                   "and --aspect; e.g. a bucket table's sizes, so the loader needs no resize)")
    p.add_argument("--object-size", type=int, default=None,
                   help="every object's side in px (default: 0.3-0.45 of the image's short side)")
    p.add_argument("--grid", type=int, default=1, help="object boxes start on multiples of this many px "
                   "(the model's patch size aligns shapes with its patches)")
    p.add_argument("--backgrounds", default=None, help=f"comma list of background names out of "
                   f"{','.join(sorted(BACKGROUNDS))} (default: all)")
    p.add_argument("--tags", default=None, help=f"comma list out of {','.join(TAGS)}")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", action="store_true",
                   help="write an image folder with json sidecars for t2i-build-shards instead of shards")
    p.add_argument("--holdout", action="store_true", help="keep the held-out combinations out of every caption")
    p.add_argument("--eval-metadata", default=None, help="also write the held-out GenEval prompts to this .jsonl")
    p.add_argument("--eval-per-tag", type=int, default=8, help="held-out prompts per GenEval tag")
    a = p.parse_args(argv)
    try:
        layout = Layout(a.object_size, a.grid, tuple(a.backgrounds.split(",")) if a.backgrounds else None)
        sizes = parse_sizes(a.sizes) if a.sizes else None
    except ValueError as e:
        p.error(str(e))
    holdout = Holdout() if a.holdout or a.eval_metadata else None
    if a.eval_metadata:
        entries = write_eval_metadata(a.eval_metadata, holdout, a.eval_per_tag, a.seed)
        print(f"{len(entries)} held-out prompts -> {a.eval_metadata}")
        if a.num == 0:
            return 0
    if a.source:
        records = synthetic_records(a.num, a.seed, a.size, a.mode, a.aspect,
                                    a.tags.split(",") if a.tags else None, a.format, holdout if a.holdout else None,
                                    layout, sizes)
        n = write_source_folder(a.out, tqdm(records, total=a.num, desc="synthetic", disable=a.num < 500))
        print(f"{n} images + json sidecars -> {a.out}  (next: t2i-build-shards {a.out} --kind folder --out DIR)")
        return 0
    stats = write_synthetic(a.out, a.num, a.seed, a.size, a.mode, a.aspect, a.samples_per_shard,
                            a.tags.split(",") if a.tags else None, a.format, progress=True,
                            holdout=holdout if a.holdout else None, layout=layout, sizes=sizes)
    print(json.dumps(stats, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
