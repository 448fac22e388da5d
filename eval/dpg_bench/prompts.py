"""The DPG-Bench prompt folder: one `<item_id>.txt` per prompt (1,065 of them in the ELLA release)."""
from __future__ import annotations

from pathlib import Path

PROMPTS_SOURCE = "the ELLA repository's dpg_bench/prompts/ folder (https://github.com/TencentQQGYLab/ELLA)"
NUM_PROMPTS = 1065


def read_prompts(folder: str | Path) -> dict[str, str]:
    """{item_id (the file stem): prompt text}, sorted by item id. Raises with the folder named when unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DPG-Bench prompt folder {folder} not found: it is {PROMPTS_SOURCE}")
    prompts = {}
    for path in sorted(folder.glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8").split())
        if not text:
            raise ValueError(f"DPG-Bench prompt file {path} is empty")
        prompts[path.stem] = text
    if not prompts:
        raise ValueError(f"DPG-Bench prompt folder {folder} holds no .txt prompt files: it is {PROMPTS_SOURCE}")
    return prompts
