"""GenEval's models: Mask2Former instance segmentation and CLIP colour naming through transformers; mmdet optional.

The official evaluator runs mmdet's Mask2Former (Swin-S, COCO) and open_clip's ViT-L/14 (OpenAI weights). Here the
same architectures load through transformers from a hub id or a local directory, so no mmdet/mmcv build is needed;
`MMDetDetector` keeps the official detector available where mmdet 2.x is installed.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from eval.geneval.detectors import Detection

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-large-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# COCO names as transformers / detectron2 spell them → as GenEval's prompts spell them
COCO_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
                "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier"}
# the official colour prompts (three templates, averaged)
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
MASK_BACKGROUND = "#999"


def _device(device) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _from_pretrained(loader, name: str, what: str, how: str):
    """`loader(name)`, turning a missing model into one line that says which and how to get it."""
    looks_local = os.path.sep in name and (name.startswith((".", os.path.sep, "~")) or os.path.exists(name))
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"{what} {name!r} not found (a local directory); {how}")
    try:
        return loader(os.path.expanduser(name))
    except OSError as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise OSError(f"cannot load {what} {name!r}{offline}: {str(e).splitlines()[0]} — {how}") from None


def _mask_box(mask: np.ndarray) -> tuple:
    """(x1, y1, x2, y2) of a mask, ends exclusive (mmdet's mask2bbox)."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


class Mask2FormerDetector:
    """COCO instance segmentation with transformers' Mask2Former: every query's (class, score, mask, box)."""

    def __init__(self, name: str = DEFAULT_MASK2FORMER, device=None):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        how = (f"download it once with `hf download {DEFAULT_MASK2FORMER} --local-dir DIR` and pass "
               "--detector mask2former:DIR, or pass another Mask2Former COCO instance model")
        self.device = _device(device)
        self.processor = _from_pretrained(AutoImageProcessor.from_pretrained, name, "GenEval detector", how)
        model = _from_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, name, "GenEval detector", how)
        self.model = model.to(self.device).eval()
        labels = self.model.config.id2label
        self.names = {int(i): COCO_ALIASES.get(n, n) for i, n in labels.items()}
        self.classes = [self.names[i] for i in sorted(self.names)]

    @torch.no_grad()
    def detect(self, image: Image.Image) -> List[Detection]:
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)], return_binary_maps=True)[0]
        if not result["segments_info"]:
            return []
        masks = result["segmentation"].bool().cpu().numpy()
        dets = [Detection(label=self.names[s["label_id"]], score=float(s["score"]), box=_mask_box(m), mask=m)
                for s, m in zip(result["segments_info"], masks)]
        return sorted(dets, key=lambda d: -d.score)


class ClipColorClassifier:
    """Zero-shot colour of each detection, as GenEval does it: the object's mask pasted on grey (#999), cropped to
    its box, against the three templates' normalised mean text embedding per colour (logits 100·cos)."""

    def __init__(self, name: str = DEFAULT_CLIP, device=None, batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        how = (f"download it once with `hf download {DEFAULT_CLIP} --local-dir DIR` and pass --clip DIR")
        self.device = _device(device)
        self.processor = _from_pretrained(CLIPProcessor.from_pretrained, name, "GenEval CLIP model", how)
        self.model = _from_pretrained(CLIPModel.from_pretrained, name, "GenEval CLIP model", how).to(self.device).eval()
        self.batch_size = batch_size
        self._text: dict = {}

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def text_classifier(self, obj: str, colors: Sequence[str]) -> torch.Tensor:
        """[D, len(colors)] unit columns: per colour, the normalised mean of the normalised template embeddings."""
        key = (obj, tuple(colors))
        if key not in self._text:
            cols = []
            for c in colors:
                texts = [t.format(c=c, obj=obj) for t in COLOR_TEMPLATES]
                tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = torch.nn.functional.normalize(self._features(self.model.get_text_features(**tokens)), dim=-1)
                cols.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
            self._text[key] = torch.stack(cols, dim=1)
        return self._text[key]

    @staticmethod
    def masked_crop(image: Image.Image, det: Detection, background: str = MASK_BACKGROUND) -> Image.Image:
        image = image.convert("RGB")
        if det.mask is not None:
            blank = Image.new("RGB", image.size, color=background)
            image = Image.composite(image, blank, Image.fromarray(np.asarray(det.mask, dtype=bool)))
        return image.crop(tuple(det.box[:4]))

    @torch.no_grad()
    def classify(self, image: Image.Image, detections: Sequence[Detection], colors: Sequence[str]) -> List[str]:
        if not detections:
            return []
        classifier = self.text_classifier(detections[0].label, colors)
        out: List[str] = []
        for k in range(0, len(detections), self.batch_size):
            crops = [self.masked_crop(image, d) for d in detections[k:k + self.batch_size]]
            pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
            feats = torch.nn.functional.normalize(self._features(self.model.get_image_features(pixel_values=pixels)),
                                                  dim=-1)
            out += [colors[i] for i in (100.0 * feats @ classifier).argmax(1).tolist()]
        return out


class MMDetDetector:
    """The official detector (mmdet 2.x `init_detector` / `inference_detector`) where mmdet is installed.

    Not exercised by our tests (mmdet is not installed here); it feeds the same rules with the same class order
    (GenEval's object_names.txt = COCO order).
    """

    def __init__(self, config: str, checkpoint: str, device=None):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError:
            raise ImportError("--detector mmdet needs mmdet 2.x and mmcv-full (GenEval's environment); "
                              "the default --detector mask2former needs only transformers") from None
        from eval.geneval.metadata import OBJECT_NAMES

        for f in (config, checkpoint):
            if not os.path.exists(f):
                raise FileNotFoundError(f"mmdet file {f} not found (GenEval's evaluation/download_models.sh fetches "
                                        "the Mask2Former Swin-S COCO checkpoint; the config ships with mmdet)")
        self.classes = list(OBJECT_NAMES)
        self._infer = inference_detector
        self.model = init_detector(config, checkpoint, device=str(_device(device)))

    def detect(self, image: Image.Image) -> List[Detection]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        result = self._infer(self.model, bgr)
        bbox, segm = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        dets = [Detection(label=name, score=float(row[4]), box=tuple(float(v) for v in row[:4]),
                          mask=None if segm is None else np.asarray(segm[i][j], dtype=bool))
                for i, name in enumerate(self.classes) for j, row in enumerate(bbox[i])]
        return sorted(dets, key=lambda d: -d.score)
