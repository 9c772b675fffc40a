"""`mmdiff eval`: one saved pipeline on any image-caption shards, both directions, as one reproducible JSON.

Text to image: one image per validation record (its prompt: the canonical caption where the record has one, else its
caption), image i drawn with generator seed ``seed + i``; the generic metrics (FD, KID, precision/recall against the
real images of the same records, CLIP score, R-precision) in every feature space given; the benchmark's exact
scores when the shards belong to one (shapes: prompt accuracy, layout diversity).
Image to text: captions of the records' images, scored against every reference caption (BLEU-4, CIDEr-D, ROUGE-L),
by CLIP score, by the benchmark when there is one; the NLL bounds with the image and with the null context.
"""

from __future__ import annotations

import os
import time
from typing import Any

import PIL.Image
import torch

from .caption_metrics import caption_nll, generate_captions
from .generic import (
    R_PRECISION_R,
    caption_space_metrics,
    generic_caption_metrics,
    image_space_metrics,
    spaces_report,
)
from .harness import EvalRun, check_counts, write_json
from .records import EvalRecords


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
    check_counts(num_images=num_images, num_captions=num_captions, batch_size=batch_size)
    evaluated_count = max(num_images, num_captions)
    run = EvalRun.open(
        pipeline_folder, val_shards, evaluated_count + num_images, evaluated_count,
        f"--num-images {num_images} / --num-captions {num_captions}", device, scheduler,
    )  # fmt: skip
    records, benchmark, pipe = run.records, run.benchmark, run.pipe
    # (caption_steps stays unset: the captioner's own sampler then runs, recorded below)
    settings = run.sample_settings(
        guidance_scale=guidance_scale,
        caption_guidance_scale=caption_guidance_scale,
        num_inference_steps=num_inference_steps,
    )
    guidance_scale, caption_guidance_scale = settings["guidance_scale"], settings["caption_guidance_scale"]
    num_inference_steps = settings["num_inference_steps"]
    caption_sampler = run.caption_sampler(caption_steps, caption_sampler)
    evaluated = records.head(evaluated_count)
    spaces = run.feature_spaces(encoder, clip, inception, evaluated.images, evaluated.prompts)
    t2i_records = records.head(num_images)
    floor = records.slice(evaluated_count, evaluated_count + num_images)
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
        **run.header(),
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
        "seconds": run.seconds(),
    }
    if out is not None:
        write_json(out, result)
    return result


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
