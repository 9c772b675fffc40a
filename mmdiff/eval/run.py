"""`mmdiff eval`: the shapes benchmark for one saved pipeline, both directions, written as one reproducible JSON.

Text to image: one image per validation caption (its canonical phrasing), image i drawn with generator seed
``seed + i``; prompt accuracy and per-attribute accuracy from the exact detector; FD against the real validation
images of the same captions in the feature classifier's space; layout diversity on a few prompts.
Image to text: captions for held-out validation images scored by attributes and exact match; NLL bounds.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from mmdiff.data.shapes import parse_caption
from mmdiff.paths import EVAL_CLASSIFIER, find_repo_file

from .captions import caption_report, nll_references
from .detector import ATTRIBUTES, score_image
from .diversity import diversity_report, render_prompt
from .features import extract_features, frechet_distance, load_feature_classifier, load_real_scenes


def load_pipeline(model, device: str | None = None, scheduler: str | None = None):
    """A text-to-image pipeline from a folder (or an mmdiff pipeline object, used as is), progress bar off."""
    from mmdiff.pipelines import MMDiffTextToImagePipeline, as_text_to_image, swap_scheduler

    if isinstance(model, str | os.PathLike):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = MMDiffTextToImagePipeline.from_pretrained(model).to(device)
    else:
        pipe = as_text_to_image(model)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        swap_scheduler(pipe, scheduler)
    return pipe


def model_name(model) -> str:
    """The folder a model was loaded from, or the pipeline class when an object was passed."""
    return str(model) if isinstance(model, str | os.PathLike) else type(model).__name__


def generate_images(
    pipe,
    prompts: list[str],
    guidance_scale: float,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 64,
    guidance_interval: tuple[float, float] | None = None,
) -> list[PIL.Image.Image]:
    """One image per prompt; image i uses generator seed `seed + i`, so it does not depend on the batching."""
    images: list[PIL.Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(
            chunk,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            guidance_interval=guidance_interval,
            generator=generators,
        ).images
    return images


def fidelity_report(images: list[PIL.Image.Image], prompts: list[str]) -> dict[str, Any]:
    """Prompt accuracy (every attribute and relation right, nothing extra) and per-attribute accuracy of N images,
    overall and split by the number of objects the prompt asks for."""
    scores = [score_image(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    n = max(len(scores), 1)
    report: dict[str, Any] = {"prompt_accuracy": sum(s["correct"] for s in scores) / n, "num": len(scores)}
    report.update({k: sum(s[k] for s in scores) / n for k in ATTRIBUTES})
    for count in (1, 2):
        subset = [s for s, p in zip(scores, prompts) if _num_objects(p) == count]
        report[f"prompt_accuracy_{count}_object"] = sum(s["correct"] for s in subset) / len(subset) if subset else None
    return report


def _num_objects(prompt: str) -> int:
    scene = parse_caption(prompt)
    return len(scene["objects"]) if scene else 0


def fd_report(
    classifier, generated: list[PIL.Image.Image], real: list[PIL.Image.Image], prompts: list[str], seed: int
) -> dict[str, Any]:
    """FD(generated, real) and, as the sampling-noise floor, FD(real, fresh real renders of the same prompts)."""
    fake_feats = extract_features(classifier, generated)
    real_feats = extract_features(classifier, real)
    image_size = real[0].width
    floor_images = [render_prompt(p, 1, image_size, seed + 1 + i)[0] for i, p in enumerate(prompts)]
    return {
        "fd": frechet_distance(fake_feats, real_feats),
        "fd_real_floor": frechet_distance(extract_features(classifier, floor_images), real_feats),
    }


def _resolve_classifier(classifier: str | os.PathLike | None, device: str):
    """The FD feature classifier: `classifier`, else the shipped assets/eval_classifier, else (None, None)."""
    path = classifier
    if path is None:
        try:
            path = find_repo_file(EVAL_CLASSIFIER)
        except FileNotFoundError:
            return None, None
    return load_feature_classifier(path, device), str(path)


def evaluate(
    pipeline_folder,
    val_shards: str | list[str],
    num_images: int = 500,
    num_captions: int = 500,
    guidance_scale: float = 3.0,
    caption_guidance_scale: float = 2.0,
    num_inference_steps: int = 50,
    caption_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    classifier: str | os.PathLike | None = None,
    diversity_prompts: int = 8,
    diversity_samples: int = 16,
    nll_levels: int = 8,
    scheduler: str | None = None,
    device: str | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a pipeline folder (or pipeline object) on validation shards; write the JSON to `out` if given.

    classifier: the FD feature classifier folder (default `assets/eval_classifier` when it exists; without one the
    FD is reported as null). Everything random is seeded from `seed`; the JSON records the seeds, the prompts, the
    sample counts, the model and the command line, so the run can be repeated exactly.
    """
    started = time.time()
    pipe = load_pipeline(pipeline_folder, device, scheduler)
    feature_model, classifier_path = _resolve_classifier(classifier, str(pipe._execution_device))
    images, scenes, canonical = load_real_scenes(val_shards, max(num_images, num_captions))
    if len(images) < max(num_images, num_captions):
        raise ValueError(f"{val_shards!r} holds {len(images)} usable records; asked for {num_images}/{num_captions}")
    prompts = canonical[:num_images]

    # text -> image
    t0 = time.time()
    generated = generate_images(pipe, prompts, guidance_scale, num_inference_steps, seed, batch_size, guidance_interval)
    t2i_seconds = time.time() - t0
    t2i = fidelity_report(generated, prompts)
    t2i["seconds_per_image"] = t2i_seconds / max(len(prompts), 1)
    if feature_model is not None and len(prompts) >= 2:
        t2i.update(fd_report(feature_model, generated, images[:num_images], prompts, seed))
    else:
        t2i.update({"fd": None, "fd_real_floor": None})
    diversity_set = list(dict.fromkeys(prompts))[:diversity_prompts]
    by_prompt = {}
    for j, prompt in enumerate(diversity_set):
        # seeds far from the fidelity run's, so these images are new draws
        by_prompt[prompt] = generate_images(
            pipe,
            [prompt] * diversity_samples,
            guidance_scale,
            num_inference_steps,
            seed + 1_000_000 + j * diversity_samples,
            batch_size,
            guidance_interval,
        )
    t2i.update(diversity_report(by_prompt, pipe.image_size, seed) if by_prompt else {})

    # image -> text
    references, phrasing = nll_references(pipeline_folder, canonical[:num_captions])
    i2t = caption_report(
        pipe,
        images[:num_captions],
        scenes[:num_captions],
        canonical[:num_captions],
        references,
        caption_guidance_scale,
        caption_steps,
        nll_levels,
        batch_size,
        seed,
        relation_probe=phrasing == "canonical",
    )
    i2t["nll_references"] = phrasing

    result = {
        "model": model_name(pipeline_folder),
        "command": shlex.join(sys.argv),
        "val_shards": val_shards,
        "seed": seed,
        "seeds": {
            "image_i": f"{seed} + i",
            "diversity": f"{seed} + 1000000 + j * samples + r",
            "caption_i": f"{seed} + i",
        },
        "num_images": num_images,
        "num_captions": num_captions,
        "guidance_scale": guidance_scale,
        "caption_guidance_scale": caption_guidance_scale,
        "num_inference_steps": num_inference_steps,
        "caption_steps": caption_steps,
        "guidance_interval": list(guidance_interval) if guidance_interval else None,
        "scheduler": type(pipe.scheduler).__name__,
        "classifier": classifier_path,
        "nll_levels": nll_levels,
        "prompts": prompts,
        "diversity_prompts": diversity_set,
        "diversity_samples": diversity_samples,
        "text_to_image": t2i,
        "image_to_text": i2t,
        "seconds": round(time.time() - started, 1),
        "versions": _versions(),
    }
    if out is not None:
        write_json(out, result)
    return result


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Strict JSON (NaN and infinities become null, numpy scalars plain numbers), parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(value), indent=1, default=_json_default, allow_nan=False))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def _versions() -> dict[str, str]:
    import diffusers

    import mmdiff

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "mmdiff": getattr(mmdiff, "__version__", ""),
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
