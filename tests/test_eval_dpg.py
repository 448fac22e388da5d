"""DPG-Bench scoring: the official CSV format, the dependency rule and both aggregation modes, by hand."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from eval.dpg_bench.evaluate import evaluate, format_report
from eval.dpg_bench.prompts import NUM_PROMPTS, read_prompts
from eval.dpg_bench.questions import COLUMNS, Question, read_questions
from eval.dpg_bench.scoring import apply_dependencies, normalize_answer, split_tile

# item, qid, dependency, tuple, question
ROWS = [
    ("a", 1, "0", "entity - whole (cat)", "Is there a cat?"),
    ("a", 2, "1", "attribute - color (cat, black)", "Is the cat black?"),
    ("a", 3, "0", "entity - whole (dog)", "Is there a dog?"),
    ("b", 1, "0", "entity - whole (car)", "Is there a car?"),
    ("b", 2, "1", "attribute - color (car, red)", "Is the car red?"),
    ("b", 3, "1,4", "relation - spatial (car, tree, left of)", "Is the car left of the tree?"),
    ("b", 4, "0", "entity - whole (tree)", "Is there a tree?"),
    ("c", 1, "0", "global - (oil painting)", "Is this an oil painting?"),
    ("c", 2, "0", 'other - text (sign, "hi")', 'Does the sign say "hi"?'),
]
# (item, crop) -> answer per qid in order; crops top-left, top-right, bottom-left, bottom-right
ANSWERS = {
    "a": ["Yes. yes no", "no yes Yes", "yes yes yes", "yes no yes"],
    "b": ["no yes yes yes", "yes yes yes yes", "yes yes yes no", "no yes yes yes"],
    "c": ["yes yes", "yes no", "no no", "yes yes"],
}
ITEMS = list(ANSWERS)


def write_csv(path: Path, rows=ROWS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for item, qid, dep, tup, question in rows:
            broad, detailed = tup.split("(")[0].split("-")
            w.writerow([item, f"prompt {item}", "", qid, dep, broad.strip(), detailed.strip(), tup, question])
    return path


def crop_code(item: str, crop: int) -> int:
    return 20 * ITEMS.index(item) + 5 * crop + 10


class ScriptedVQA:
    """Answers per (image, question), recognising the crop by its flat grey level."""

    name = "scripted"

    def __init__(self):
        self.by_code = {}
        for item, crops in ANSWERS.items():
            texts = [r[4] for r in ROWS if r[0] == item]
            for k, line in enumerate(crops):
                words = [w.strip(".") for w in line.split()]
                self.by_code[crop_code(item, k)] = dict(zip(texts, words))
        self.calls = 0

    def ask(self, image, questions):
        self.calls += 1
        return [self.by_code[image.getpixel((0, 0))[0]][q] for q in questions]


def write_tiles(folder: Path, size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for item in ITEMS:
        tile = Image.new("RGB", (2 * size, 2 * size))
        for k, (x, y) in enumerate([(0, 0), (size, 0), (0, size), (size, size)]):
            tile.paste(Image.new("RGB", (size, size), (crop_code(item, k),) * 3), (x, y))
        tile.save(folder / f"{item}.png")
    return folder


def test_split_tile_order():
    tile = write_tiles(Path(__import__("tempfile").mkdtemp())) / "b.png"
    crops = split_tile(Image.open(tile).convert("RGB"))
    assert [c.size for c in crops] == [(8, 8)] * 4
    assert [c.getpixel((3, 3))[0] for c in crops] == [crop_code("b", k) for k in range(4)]


def test_normalize_answer():
    assert [normalize_answer(a) for a in ["Yes.", "yes, it is", " NO ", "no.", "two", "Yesterday"]] == \
        ["yes", "yes", "no", "no", "two", "yesterday"]


def test_dependency_rule_propagates_in_csv_order():
    qs = [Question(1, "", (0,), "entity - whole (x)"), Question(2, "", (1,), "attribute - color (x, red)"),
          Question(3, "", (2,), "attribute - size (x, big)"), Question(4, "", (0,), "entity - whole (y)"),
          Question(5, "", (3, 4), "relation - spatial (x, y, on)")]
    assert apply_dependencies({1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, qs) == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0}
    assert apply_dependencies({1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0}, qs) == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    assert apply_dependencies({1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}, qs) == {1: 1, 2: 0, 3: 0, 4: 1, 5: 0}


def test_read_questions_modes(tmp_path):
    path = write_csv(tmp_path / "dpg_bench.csv")
    default = read_questions(path)
    assert list(default) == ["a", "b", "c"] and [q.qid for q in default["b"]] == [1, 2, 3, 4]
    assert default["b"][2].parents == (1, 4)
    assert default["b"][2].category == "relation - spatial" and default["b"][2].broad_category == "relation"
    compat = read_questions(path, official_compat=True)
    assert [q.qid for q in compat["a"]] == [2, 3]  # the official loop skips the first data row


def test_csv_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dpg_bench.csv from the ELLA repository"):
        read_questions(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("item_id,text\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv: missing column"):
        read_questions(tmp_path / "bad.csv")
    rows = list(ROWS)
    rows[1] = ("a", 2, "7", "attribute - color (cat, black)", "Is the cat black?")
    with pytest.raises(ValueError, match="item 'a' question 2 depends on unknown question"):
        read_questions(write_csv(tmp_path / "dep.csv", rows))


def mean(xs):
    return sum(xs) / len(xs)


def test_scores_default_mode(tmp_path):
    csv_path, images = write_csv(tmp_path / "dpg.csv"), write_tiles(tmp_path / "images")
    vqa = ScriptedVQA()
    report = evaluate(images, csv_path, vqa, progress=False)
    # per crop after the dependency rule (hand-applied):
    a = mean([2 / 3, 1 / 3, 3 / 3, 2 / 3])  # crop 1: "no" to the cat zeroes its colour
    b = mean([1 / 4, 4 / 4, 2 / 4, 1 / 4])  # crops 0 and 3: no car → colour and relation 0; crop 2: no tree
    c = mean([1, 1 / 2, 0, 1])
    assert report["mode"] == "default" and report["complete"]
    assert report["per_image"] == pytest.approx({"a": 100 * a, "b": 100 * b, "c": 100 * c})
    assert report["score"] == pytest.approx(100 * mean([a, b, c]))
    assert report["category_detailed"] == pytest.approx({
        "entity - whole": 100 * (3 + 3 + 2 + 3) / 16, "attribute - color": 100 * (2 + 2) / 8,
        "relation - spatial": 100 * 1 / 4, "global -": 100 * 3 / 4, "other - text": 100 * 2 / 4})
    assert report["category_broad"] == pytest.approx({
        "entity": 100 * 11 / 16, "attribute": 50.0, "relation": 25.0, "global": 75.0, "other": 50.0})
    assert "default mode" in format_report(report)
    # answers are cached: the compat report asks nothing again
    calls = vqa.calls
    assert calls == 3 * 4 and len((images / "dpg_answers.jsonl").read_text().splitlines()) == 3
    compat = evaluate(images, csv_path, vqa, official_compat=True, progress=False)
    assert vqa.calls == calls
    # a regenerated tile is asked again, the others are not
    Image.open(images / "c.png").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(images / "c.png")
    evaluate(images, csv_path, vqa, progress=False)
    assert vqa.calls == calls + 4
    assert compat["mode"] == "official-compat" and "official-compat mode" in format_report(compat)


def test_scores_official_compat_mode(tmp_path):
    csv_path, images = write_csv(tmp_path / "dpg.csv"), write_tiles(tmp_path / "images")
    report = evaluate(images, csv_path, ScriptedVQA(), official_compat=True, progress=False)
    # first row dropped: item a's colour question depends on a missing question → the image fails, as officially
    assert report["failed_images"] == ["a"] and not report["complete"]
    b, c = mean([1 / 4, 4 / 4, 2 / 4, 1 / 4]), mean([1, 1 / 2, 0, 1])
    assert report["score"] == pytest.approx(100 * mean([b, c]))
    # categories from the last crop's raw answers only: b = (no, yes, yes, yes), c = (yes, yes)
    assert report["category_detailed"] == pytest.approx({
        "entity - whole": 50.0, "attribute - color": 100.0, "relation - spatial": 100.0, "global -": 100.0,
        "other - text": 100.0})
    assert report["category_broad"]["entity"] == pytest.approx(50.0)


def test_incomplete_image_set_is_refused_or_flagged(tmp_path):
    csv_path, images = write_csv(tmp_path / "dpg.csv"), write_tiles(tmp_path / "images")
    (images / "c.png").unlink()
    with pytest.raises(ValueError, match="1 of 3 DPG-Bench items have no image"):
        evaluate(images, csv_path, ScriptedVQA(), progress=False)
    report = evaluate(images, csv_path, ScriptedVQA(), allow_incomplete=True, progress=False)
    assert report["missing_images"] == ["c"] and not report["complete"] and report["num_images"] == 2
    assert "WARNING: incomplete" in format_report(report)
    Image.new("RGB", (4, 4)).save(images / "zzz.png")
    with pytest.raises(ValueError, match="zzz.png"):
        evaluate(images, csv_path, ScriptedVQA(), allow_incomplete=True, progress=False)


def shared_dir() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "benchmarks").is_dir():
            return parent / "shared"
    return None


@pytest.mark.skipif(shared_dir() is None or not (shared_dir() / "benchmarks/dpg_bench/prompts").is_dir(),
                    reason="the DPG-Bench prompt folder (shared/benchmarks/dpg_bench/prompts) is not here")
def test_real_prompt_folder_parses():
    prompts = read_prompts(shared_dir() / "benchmarks/dpg_bench/prompts")
    assert len(prompts) == NUM_PROMPTS == 1065
    assert all(p.strip() for p in prompts.values())
    sources = {k.rstrip("0123456789") for k in prompts}
    assert {"", "partiprompts", "COCOval", "whoops"} <= sources


def test_missing_prompt_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ELLA repository's dpg_bench/prompts"):
        read_prompts(tmp_path / "nope")


def _score_on_rank(rank: int, world: int, port: int, images: str, csv_path: str, out: str) -> None:
    import os

    import torch

    from t2i_train.engine import dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_distributed(torch.device("cpu"))
    vqa = ScriptedVQA()
    report = evaluate(Path(images), Path(csv_path), vqa, progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"report": report, "calls": vqa.calls}))
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.shutdown()


def test_scoring_split_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    from t2i_train.engine.dist import _free_port

    csv_path, images = write_csv(tmp_path / "dpg.csv"), write_tiles(tmp_path / "images")
    mp.spawn(_score_on_rank, args=(2, _free_port(), str(images), str(csv_path), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["calls"] for r in results] == [2 * 4, 1 * 4]  # items a, c on rank 0; b on rank 1; 4 crops each
    single = evaluate(images, csv_path, ScriptedVQA(), progress=False)  # asks nothing: answers are all cached
    assert results[0]["report"] == results[1]["report"] == json.loads(json.dumps(single))
    assert sorted(p.name for p in images.glob("dpg_answers*.jsonl")) == ["dpg_answers.rank0.jsonl",
                                                                          "dpg_answers.rank1.jsonl"]
