"""The shapes benchmark: every attribute of a scene is known, so images and captions are scored exactly.

Text -> image: prompt accuracy and per-attribute accuracy from the rule-based reader (`detector.py`), split by
the number of objects, and layout diversity (`diversity.py`). Image -> text: attribute accuracy of generated
captions parsed back into scenes, exact match with the canonical caption, and the relation-direction probe.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from mmdiff.data.shapes import LeftFirstPolicy, parse_caption, scene_from_attributes
from mmdiff.data.shards import iterate_records

from ...caption_metrics import nll_references, trained_caption_policy
from ...records import EvalRecords
from .. import Benchmark
from .captions import caption_metrics, relation_direction
from .detector import ATTRIBUTES, score_image
from .diversity import diversity_report


def record_scene(prompt: str, attrs: dict[str, Any] | None) -> dict[str, Any] | None:
    """The normalised scene of a record: from its attributes when they hold objects, else parsed from the prompt."""
    if attrs and "objects" in attrs:
        return scene_from_attributes(attrs)
    return parse_caption(prompt)


def load_real_scenes(
    shards: str | list[str], max_images: int | None = None
) -> tuple[list[Image.Image], list[dict[str, Any]], list[str]]:
    """The first `max_images` records of shards that have a readable scene: images, normalised scenes, captions."""
    images, scenes, captions = [], [], []
    for _key, image, caption, attrs in iterate_records(shards):
        scene = record_scene(caption, attrs)
        if scene is None:
            continue
        images.append(image)
        scenes.append(scene)
        captions.append(attrs.get("canonical", caption) if attrs else caption)
        if max_images is not None and len(images) >= max_images:
            break
    return images, scenes, captions


class ShapesBenchmark(Benchmark):
    name = "shapes"
    default_encoder = "assets/eval_encoder_shapes"
    wants_diversity_samples = True

    def matches(self, records: EvalRecords) -> bool:
        return all(record_scene(p, a) is not None for p, a in zip(records.prompts, records.attributes, strict=True))

    def image_metrics(
        self, images: list[Image.Image], prompts: list[str], image_size: int, seed: int, samples_per_prompt: int = 1
    ) -> dict[str, Any]:
        """Prompt accuracy (every attribute and the relation right, nothing extra), per attribute and by object
        count; with several samples per prompt also the layout diversity of each prompt's correct samples."""
        scores = [score_image(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
        n = max(len(scores), 1)
        report: dict[str, Any] = {"prompt_accuracy": sum(s["correct"] for s in scores) / n, "num": len(scores)}
        report.update({k: sum(s[k] for s in scores) / n for k in ATTRIBUTES})
        for count in (1, 2):
            subset = [s for s, p in zip(scores, prompts, strict=True) if _num_objects(p) == count]
            accuracy = sum(s["correct"] for s in subset) / len(subset) if subset else None
            report[f"prompt_accuracy_{count}_object"] = accuracy
        k = samples_per_prompt
        if k > 1:
            by_prompt = {prompts[i]: images[i : i + k] for i in range(0, len(images), k)}
            diversity = diversity_report(by_prompt, image_size, seed)
            report.update({key: diversity[key] for key in ("diversity", "diversity_real", "diversity_ratio")})
        return report

    def diversity_metrics(self, by_prompt: dict[str, list[Image.Image]], image_size: int, seed: int) -> dict[str, Any]:
        return diversity_report(by_prompt, image_size, seed)

    def caption_metrics(self, captions: list[str], records: EvalRecords) -> dict[str, Any]:
        scenes = [record_scene(p, a) for p, a in zip(records.prompts, records.attributes, strict=True)]
        metrics = caption_metrics(captions, scenes, records.prompts)
        metrics["samples"] = [{"caption": t, "reference": c} for t, c in zip(captions[:20], records.prompts[:20])]
        return metrics

    def caption_probes(self, pipe, records: EvalRecords, model, batch_size: int) -> dict[str, Any]:
        if isinstance(trained_caption_policy(model), LeftFirstPolicy):
            # a left-first captioner never says "right of"/"below": swapping that word asks about the phrasing
            return {"relation_direction": {"num": 0, "skipped": "the model was trained on left-first phrasings"}}
        return {"relation_direction": relation_direction(pipe, records.images, records.prompts, batch_size)}

    def nll_references(self, model: str | os.PathLike | Any, records: EvalRecords) -> tuple[list[str], str]:
        return nll_references(model, records.prompts)


def _num_objects(prompt: str) -> int:
    scene = parse_caption(prompt)
    return len(scene["objects"]) if scene else 0
