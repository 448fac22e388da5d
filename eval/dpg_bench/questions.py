"""DPG-Bench's question CSV: the questions asked of each image, their dependencies and categories.

The file is `dpg_bench.csv` from the ELLA repository (one row per question; columns below). Categories come
from the `tuple` column as the official script derives them (`"entity - whole (cat)"` → detailed category
`entity - whole`, broad category `entity`), so that category names match published tables.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

CSV_SOURCE = ("dpg_bench.csv from the ELLA repository's dpg_bench/ folder "
              "(https://github.com/TencentQQGYLab/ELLA/tree/main/dpg_bench)")
COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
           "tuple", "question_natural_language")


@dataclass(frozen=True)
class Question:
    qid: int
    text: str
    parents: tuple[int, ...]  # proposition ids this question depends on; 0 = none
    tuple: str

    @property
    def category(self) -> str:
        """Detailed (level-2) category, e.g. `attribute - color`."""
        return self.tuple.split("(")[0].strip()

    @property
    def broad_category(self) -> str:
        """Broad (level-1) category, e.g. `attribute`."""
        return self.category.split("-")[0].strip()


def _parse_ids(value: str, where: str, column: str) -> list[int]:
    try:
        return [int(v.strip()) for v in str(value).split(",")]
    except ValueError:
        raise ValueError(f"{where}: column {column!r} must hold integers (comma-separated), got {value!r}") from None


def read_questions(csv_path: str | Path, *, official_compat: bool = False) -> dict[str, list[Question]]:
    """{item_id: its questions in CSV order}.

    official_compat reproduces the official script's reading: the first data row is skipped (it loses the
    first item's first question), and a row whose item differs from the previous row's starts that item afresh.
    Otherwise a dependency on a question the item does not have is an error naming the item.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"DPG-Bench question CSV {csv_path} not found: it is {CSV_SOURCE}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected the columns of {CSV_SOURCE}")
        rows = list(reader)
    items: dict[str, list[Question]] = {}
    previous = None
    for i, row in enumerate(rows):
        if official_compat and i == 0:
            continue
        where = f"{csv_path} row {i + 2}"
        item = row["item_id"].strip()
        (qid,) = _parse_ids(row["proposition_id"], where, "proposition_id")[:1]
        question = Question(qid, row["question_natural_language"].strip(),
                            tuple(_parse_ids(row["dependency"], where, "dependency")), row["tuple"].strip())
        if official_compat and item != previous:
            items[item] = []
        items.setdefault(item, []).append(question)
        previous = item
    if not official_compat:
        for item, questions in items.items():
            qids = {q.qid for q in questions}
            for q in questions:
                unknown = [p for p in q.parents if p != 0 and p not in qids]
                if unknown:
                    raise ValueError(f"{csv_path}: item {item!r} question {q.qid} depends on unknown "
                                     f"question(s) {unknown}")
    return items
