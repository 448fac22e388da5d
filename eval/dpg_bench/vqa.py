"""Visual question answering backends for DPG-Bench: `vqa.ask(image, questions) -> answers`.

* `mplug` — the official choice, mPLUG-large through modelscope (only when modelscope is installed).
* `transformers` — a transformers VQA model (BLIP VQA by default), from a local path or a hub id.
`auto` picks mplug when modelscope is importable, transformers otherwise. Answers are free text; the scorer
normalises them to yes/no.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Protocol, Sequence

from PIL import Image

MPLUG_MODEL = "damo/mplug_visual-question-answering_coco_large_en"
TRANSFORMERS_MODEL = "Salesforce/blip-vqa-base"
BACKENDS = ("auto", "mplug", "transformers")


class VQA(Protocol):
    name: str  # backend and model, recorded in the report

    def ask(self, image: Image.Image, questions: Sequence[str]) -> list[str]: ...


def _missing_weights(model: str, where: str) -> str:
    offline = " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (f"cannot load VQA model {model!r}{offline}: give a local directory with --vqa-model, or download "
            f"it first ({where})")


class MPlugVQA:
    def __init__(self, model: str = MPLUG_MODEL, device: str = "cpu"):
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks

        self.name = f"mplug:{model}"
        try:
            self.pipe = pipeline(Tasks.visual_question_answering, model=model, device="gpu" if device.startswith("cuda") else device)
        except Exception as e:  # modelscope raises many kinds; say what to get
            raise RuntimeError(f"{_missing_weights(model, 'modelscope download --model ' + model)}: {e}") from e

    def ask(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        return [self.pipe({"image": image, "question": q})["text"] for q in questions]


class TransformersVQA:
    def __init__(self, model: str = TRANSFORMERS_MODEL, device: str = "cpu", dtype: str = "float32",
                 max_new_tokens: int = 10):
        import torch
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor, BlipForQuestionAnswering

        self.name = f"transformers:{model}"
        self.device, self.max_new_tokens = torch.device(device), max_new_tokens
        torch_dtype = getattr(torch, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            try:
                self.model = BlipForQuestionAnswering.from_pretrained(model, dtype=torch_dtype)
            except (ValueError, TypeError):  # not a BLIP checkpoint: any generative VQA model transformers knows
                self.model = AutoModelForVisualQuestionAnswering.from_pretrained(model, dtype=torch_dtype)
        except OSError as e:
            raise RuntimeError(f"{_missing_weights(model, 'hf download ' + model)}: {e}") from e
        self.model.to(self.device).eval()
        self.dtype = torch_dtype

    def ask(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        import torch

        inputs = self.processor(images=[image] * len(questions), text=list(questions), return_tensors="pt",
                                padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(out, skip_special_tokens=True)


def build_vqa(backend: str = "auto", model: str | None = None, device: str = "cpu", dtype: str = "float32") -> VQA:
    if backend not in BACKENDS:
        raise ValueError(f"unknown VQA backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "mplug" if importlib.util.find_spec("modelscope") else "transformers"
    if backend == "mplug":
        if importlib.util.find_spec("modelscope") is None:
            raise RuntimeError("VQA backend 'mplug' needs modelscope (pip install modelscope); "
                               "or use --vqa transformers")
        return MPlugVQA(model or MPLUG_MODEL, device)
    return TransformersVQA(model or TRANSFORMERS_MODEL, device, dtype)
