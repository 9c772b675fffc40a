"""`mmdiff eval`: one saved pipeline on any image-caption shards, both directions, as one reproducible JSON.

Text to image: one image per validation record (its prompt: the canonical caption where the record has one, else its
caption), image i drawn with generator seed ``seed + i``; the generic metrics (FD, KID, precision/recall against the
real images of the same records, CLIP score, R-precision) in every feature space given; the benchmark's exact
scores when the shards belong to one (shapes: prompt accuracy, layout diversity).
Image to text: captions of the records' images, scored against every reference caption (BLEU-4, CIDEr-D, ROUGE-L),
by CLIP score, by the benchmark when there is one; the NLL bounds with the image and with the null context.
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

from ..pipelines.factory import load_pipeline
from .benchmarks import find_benchmark
from .captions import caption_nll, generate_captions
from .features.spaces import resolve_encoders
from .generic import (
    R_PRECISION_R,
    caption_space_metrics,
    generic_caption_metrics,
    image_space_metrics,
    spaces_report,
)
from .records import EvalRecords, load_eval_records, require_records


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
    """Shapes prompt accuracy and per-attribute accuracy of N images (see `benchmarks/shapes.py`)."""
    from .benchmarks.shapes import ShapesBenchmark

    return ShapesBenchmark().image_metrics(images, prompts, images[0].width if images else 32, 0)


def evaluate(
    pipeline_folder,
    val_shards: str | list[str],
    num_images: int = 500,
    num_captions: int = 500,
    guidance_scale: float | None = None,
    caption_guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    caption_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    encoder: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    diversity_prompts: int = 8,
    diversity_samples: int = 16,
    nll_levels: int = 8,
    scheduler: str | None = None,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    caption_sampler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a pipeline folder (or pipeline object) on any image-caption shards; write the JSON to `out` if given.

    Generic metrics always (see `generic.py`), in the feature spaces of `encoder` (an `mmdiff eval-encoder` folder;
    default: the benchmark's shipped one, e.g. assets/eval_encoder_shapes on shapes), `clip` (a local open_clip
    checkpoint) and `inception` (local InceptionV3 weights); plus the exact scores of the dataset's benchmark when
    the shards belong to one (shapes). The real-vs-real FD floor compares the real images of the evaluated records
    with the next `num_images` records when the shards hold them. Everything random is seeded from `seed`; the JSON
    records the seeds, the prompts, the sample counts, the encoders, the model and the command line.
    """
    started = time.time()
    check_counts(num_images=num_images, num_captions=num_captions, batch_size=batch_size)
    records = load_eval_records(val_shards, max(num_images, num_captions) + num_images)
    require_records(
        records, max(num_images, num_captions), f"--num-images {num_images} / --num-captions {num_captions}"
    )
    benchmark = find_benchmark(records)
    pipe = load_pipeline(pipeline_folder, device=device, scheduler=scheduler, progress=False)
    # settings left unset: the folder's saved sample settings (recorded resolved in the JSON)
    # (caption_steps stays unset: the captioner's own sampler then runs, recorded below)
    settings = pipe.fill_sample_settings(
        guidance_scale=guidance_scale,
        caption_guidance_scale=caption_guidance_scale,
        num_inference_steps=num_inference_steps,
    )
    guidance_scale, caption_guidance_scale = settings["guidance_scale"], settings["caption_guidance_scale"]
    num_inference_steps = settings["num_inference_steps"]
    caption_sampler = effective_caption_sampler(pipe, caption_steps, caption_sampler)
    evaluated = records.head(max(num_images, num_captions))
    spaces, notes = resolve_encoders(
        encoder, clip, inception, benchmark, str(pipe._execution_device), pipe.image_size, evaluated.images,
        evaluated.prompts,
    )  # fmt: skip
    t2i_records = records.head(num_images)
    floor = records.slice(max(num_images, num_captions), max(num_images, num_captions) + num_images)
    prompts = t2i_records.prompts

    # text -> image
    t0 = time.time()
    generated = generate_images(pipe, prompts, guidance_scale, num_inference_steps, seed, batch_size, guidance_interval)
    t2i: dict[str, Any] = {"seconds_per_image": (time.time() - t0) / max(len(prompts), 1), "num": len(prompts)}
    floor_images = floor.images if len(floor) == num_images else None
    t2i.update(
        spaces_report(
            {
                name: image_space_metrics(enc, generated, t2i_records.images, prompts, floor_images, seed)
                for name, enc in spaces.items()
            }
        )
    )
    diversity_set: list[str] = []
    if benchmark is not None:
        t2i.update(benchmark.image_metrics(generated, prompts, pipe.image_size, seed))
        if benchmark.wants_diversity_samples:
            diversity_set = list(dict.fromkeys(prompts))[:diversity_prompts]
            by_prompt = {
                # seeds far from the fidelity run's, so these images are new draws
                prompt: generate_images(
                    pipe,
                    [prompt] * diversity_samples,
                    guidance_scale,
                    num_inference_steps,
                    seed + 1_000_000 + j * diversity_samples,
                    batch_size,
                    guidance_interval,
                )
                for j, prompt in enumerate(diversity_set)
            }
            t2i.update(benchmark.diversity_metrics(by_prompt, pipe.image_size, seed))

    # image -> text
    i2t_records = records.head(num_captions)
    i2t = caption_report(
        pipe, i2t_records, spaces, benchmark, pipe, caption_guidance_scale, caption_steps, nll_levels,
        batch_size, seed, caption_sampler=caption_sampler,
    )  # fmt: skip

    result = {
        "model": model_name(pipeline_folder),
        "command": shlex.join(sys.argv),
        "val_shards": val_shards,
        "benchmark": benchmark.name if benchmark else None,
        "encoders": {name: enc.name for name, enc in spaces.items()},
        "notes": notes,
        "skipped_records": records.skipped,
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
        "caption_sampler": caption_sampler or {},
        "guidance_interval": list(guidance_interval) if guidance_interval else None,
        "scheduler": type(pipe.scheduler).__name__,
        "r_precision": f"R = min({R_PRECISION_R}, distinct prompts); distractors: R - 1 other distinct prompts of the "
        "evaluated set, drawn at random (seeded) for each image",
        "fd_real_floor": "FD of the next num_images real records of the shards to the evaluated real images"
        if floor_images
        else "not measured: the shards hold fewer than 2 x num_images records",
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


def effective_caption_sampler(pipe, caption_steps: int | None, given: dict[str, Any] | None) -> dict[str, Any]:
    """The caption sampler a run uses, for its record: the options given, else the K-step schedule when caption steps
    are given, else the text scheduler's configured sampler with its parameter."""
    if given:
        return dict(given)
    if caption_steps is not None:
        return {"sampler": "schedule", "num_inference_steps": caption_steps}
    config = pipe.text_scheduler.config
    parameter = {"entropy": "entropy_bound", "threshold": "threshold"}.get(config.sampler)
    sampler = {"sampler": config.sampler, **({parameter: config[parameter]} if parameter else {})}
    if config.sampler == "schedule":
        sampler["num_inference_steps"] = pipe.default_caption_steps()
    return sampler


def caption_report(
    pipe,
    records: EvalRecords,
    spaces: dict[str, Any],
    benchmark,
    model,
    guidance_scale: float,
    caption_steps: int | None,
    nll_levels: int,
    batch_size: int,
    seed: int,
    probes: bool = True,
    nll_guidance_scale: float = 1.0,
    nll_null_bits: float | None = None,
    caption_sampler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Captions of the records' images at `guidance_scale`: n-gram scores against every reference, CLIP score in
    each joint space, the NLL bounds (bits per token) with the image (CFG-combined logits at `nll_guidance_scale`)
    and with the null context (`nll_null_bits` when the caller has it already: it does not depend on the scale), and
    the benchmark's exact scores and probes."""
    sampler = dict(caption_sampler or {})
    steps = sampler.pop("num_inference_steps", caption_steps)
    texts = generate_captions(pipe, records.images, guidance_scale, steps, batch_size, seed, **sampler)
    report: dict[str, Any] = {"guidance_scale": guidance_scale, "num": len(texts)}
    report.update(generic_caption_metrics(texts, records.references))
    per_space = {name: caption_space_metrics(enc, records.images, texts) for name, enc in spaces.items()}
    per_space = {name: figures for name, figures in per_space.items() if figures}
    if per_space:
        report.update(spaces_report(per_space))
    references, phrasing = benchmark.nll_references(model, records) if benchmark else (list(records.prompts), "prompts")
    report["nll_image_bits"] = caption_nll(
        pipe, records.images, references, nll_guidance_scale, nll_levels, batch_size, seed
    )
    if nll_null_bits is None:
        nll_null_bits = caption_nll(pipe, None, references, 1.0, nll_levels, batch_size, seed)
    report["nll_null_bits"] = nll_null_bits
    report["nll_references"] = phrasing
    if benchmark is not None:
        report.update(benchmark.caption_metrics(texts, records))
        if probes:
            report.update(benchmark.caption_probes(pipe, records, model, batch_size))
    else:
        report["samples"] = [{"caption": t, "references": r} for t, r in zip(texts[:20], records.references[:20])]
    return report


def check_counts(**counts: int) -> None:
    """Every sample count must be a positive integer (a count of 0 would divide by zero in the averages)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
    from importlib.metadata import PackageNotFoundError, version

    import diffusers

    try:
        mmdiff_version = version("mmdiff")
    except PackageNotFoundError:  # run from a source tree that is not installed
        mmdiff_version = ""
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "mmdiff": mmdiff_version,
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
