"""`mmdiff sweep`: metrics against the guidance scale, in both directions, with an image grid and a plot.

Text to image runs on :meth:`MMDiffTextToImagePipeline.guidance_sweep`: every scale denoises the same prompts from the
same initial noise (image r of prompt p uses generator seed ``seed + p * images_per_prompt + r``), so the columns of
the grid differ only by w. Per scale it reports prompt accuracy (fidelity), the FD to real renders of the same
prompts, layout diversity (see :mod:`mmdiff.eval.diversity`) and feature diversity (mean pairwise distance of the
classifier features of one prompt's samples, divided by the same on real renders). With a guidance interval the
whole sweep is run a second time with CFG only inside the interval, and both wall times are recorded.

Image to text: for each caption guidance scale, attribute accuracy of greedy captions of validation images and the
NLL bound with the CFG-combined logits at that scale (plus the unconditional, null-context bound).
"""

from __future__ import annotations

import csv
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from .captions import caption_metrics, caption_nll, generate_captions, nll_references
from .detector import ATTRIBUTES
from .diversity import diversity_report, mean_pairwise_distance, render_prompt
from .features import extract_features, frechet_distance, load_real_scenes
from .plots import plot_sweep, save_labeled_grid
from .run import _resolve_classifier, fidelity_report, load_pipeline, model_name, write_json

DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
DEFAULT_CAPTION_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)


def distinct_prompts(val_shards: str | list[str], num_prompts: int) -> list[str]:
    """The first `num_prompts` distinct canonical captions of the validation shards, in shard order."""
    prompts: list[str] = []
    _, _, canonical = load_real_scenes(val_shards, None)
    for caption in canonical:
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == num_prompts:
            break
    return prompts


def sweep_images(
    pipe,
    prompts: list[str],
    scales: list[float],
    images_per_prompt: int,
    num_inference_steps: int,
    seed: int,
    batch_size: int,
    guidance_interval: tuple[float, float] | None = None,
) -> tuple[list[list[PIL.Image.Image]], float, int]:
    """Images per scale (S lists of P*K images, prompt-major), the wall seconds and the transformer rows run."""
    import torch

    per_call = max(1, batch_size // images_per_prompt)  # prompts per guidance_sweep call
    images: list[list[PIL.Image.Image]] = [[] for _ in scales]
    seconds, rows = 0.0, 0
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        first = start * images_per_prompt
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk) * images_per_prompt)]
        t0 = time.time()
        out = pipe.guidance_sweep(
            chunk,
            scales,
            num_inference_steps=num_inference_steps,
            guidance_interval=guidance_interval,
            num_images_per_prompt=images_per_prompt,
            generator=generators,
        )
        seconds += time.time() - t0
        rows += pipe._num_forward_rows
        for s, group in enumerate(out.images):
            images[s].extend(group)
    return images, seconds, rows


def _scale_metrics(
    images: list[PIL.Image.Image],
    expanded: list[str],
    prompts: list[str],
    k: int,
    classifier,
    real_feats: np.ndarray | None,
    real_feature_div: float,
    image_size: int,
    seed: int,
) -> dict[str, Any]:
    """Fidelity, FD, layout diversity and feature diversity of one scale's P*K images."""
    metrics = fidelity_report(images, expanded)
    by_prompt = {p: images[i * k : (i + 1) * k] for i, p in enumerate(prompts)}
    diversity = diversity_report(by_prompt, image_size, seed)
    metrics.update({key: diversity[key] for key in ("diversity", "diversity_real", "diversity_ratio")})
    metrics["fd"] = metrics["feature_diversity"] = float("nan")
    if classifier is not None and real_feats is not None:
        feats = extract_features(classifier, images)
        metrics["fd"] = frechet_distance(feats, real_feats)
        per_prompt = [mean_pairwise_distance(list(feats[i * k : (i + 1) * k])) for i in range(len(prompts))]
        metrics["feature_diversity"] = float(np.nanmean(per_prompt)) / real_feature_div
    return metrics


def sweep(
    pipeline_folder,
    val_shards: str | list[str],
    scales: list[float] = DEFAULT_SCALES,
    caption_scales: list[float] = DEFAULT_CAPTION_SCALES,
    num_prompts: int = 8,
    images_per_prompt: int = 4,
    num_captions: int = 64,
    num_inference_steps: int = 50,
    caption_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = (0.2, 0.8),
    seed: int = 0,
    batch_size: int = 64,
    classifier: str | os.PathLike | None = None,
    nll_levels: int = 4,
    grid_samples: int = 2,
    scheduler: str | None = None,
    device: str | None = None,
    out_dir: str | os.PathLike = "outputs/sweep",
) -> dict[str, Any]:
    """Run both sweeps and write `out_dir/{grid.png, sweep.csv, captions.csv, sweep.json, sweep_plot.png}`.

    guidance_interval: (t_low, t_high) for the interval-on run, None to skip it. grid_samples: samples shown per
    grid cell (prompts x scales). Returns the JSON record (also written to sweep.json).
    """
    started = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(pipeline_folder, device, scheduler)
    feature_model, classifier_path = _resolve_classifier(classifier, str(pipe._execution_device))
    scales = [float(w) for w in scales]
    prompts = distinct_prompts(val_shards, num_prompts)
    if not prompts:
        raise ValueError(f"no parseable shapes captions in {val_shards!r}")
    k = images_per_prompt
    expanded = [p for p in prompts for _ in range(k)]
    size = pipe.image_size

    # real renders of the same prompts, K each: the reference of FD and of both diversity figures
    real_feats, real_feature_div = None, float("nan")
    if feature_model is not None:
        real = [im for i, p in enumerate(prompts) for im in render_prompt(p, max(k, 2), size, seed + i)]
        real_feats = extract_features(feature_model, real)
        kr = max(k, 2)
        real_feature_div = float(
            np.nanmean([mean_pairwise_distance(list(real_feats[i * kr : (i + 1) * kr])) for i in range(len(prompts))])
        )

    runs = {"off": None, "on": guidance_interval} if guidance_interval else {"off": None}
    rows_by_run, timing, grids = {}, {}, {}
    for name, interval in runs.items():
        images, seconds, forward_rows = sweep_images(
            pipe, prompts, scales, k, num_inference_steps, seed, batch_size, interval
        )
        timing[name] = {"seconds": round(seconds, 3), "forward_rows": forward_rows, "interval": interval}
        rows_by_run[name] = [
            {"guidance_scale": w}
            | _scale_metrics(imgs, expanded, prompts, k, feature_model, real_feats, real_feature_div, size, seed)
            for w, imgs in zip(scales, images)
        ]
        grids[name] = images
    table = _merge_interval_rows(rows_by_run)
    cells = [[grids["off"][s][p * k : p * k + grid_samples] for s in range(len(scales))] for p in range(len(prompts))]
    save_labeled_grid(cells, prompts, [f"w = {w:g}" for w in scales], out / "grid.png")

    # image -> text
    images, scenes, canonical = load_real_scenes(val_shards, num_captions)
    references, phrasing = nll_references(pipeline_folder, canonical)
    caption_rows = []
    nll_null = caption_nll(pipe, None, references, 1.0, nll_levels, batch_size, seed)
    for w in caption_scales:
        texts = generate_captions(pipe, images, float(w), caption_steps, batch_size, seed)
        row = {"guidance_scale": float(w)} | caption_metrics(texts, scenes, canonical)
        row["nll_image_bits"] = caption_nll(pipe, images, references, float(w), nll_levels, batch_size, seed)
        row["nll_null_bits"] = nll_null
        caption_rows.append(row)

    _write_csv(out / "sweep.csv", table)
    _write_csv(out / "captions.csv", caption_rows)
    plot_sweep(table, caption_rows, out / "sweep_plot.png", has_interval="on" in runs, timing=timing)
    record = {
        "model": model_name(pipeline_folder),
        "command": shlex.join(sys.argv),
        "val_shards": val_shards,
        "seed": seed,
        "seeds": "image r of prompt p: seed + p * images_per_prompt + r; caption i: seed + i",
        "prompts": prompts,
        "images_per_prompt": k,
        "num_captions": len(images),
        "nll_references": phrasing,
        "num_inference_steps": num_inference_steps,
        "caption_steps": caption_steps,
        "scheduler": type(pipe.scheduler).__name__,
        "classifier": classifier_path,
        "nll_levels": nll_levels,
        "text_to_image": table,
        "image_to_text": caption_rows,
        "interval": timing,
        "files": {name: name for name in ("grid.png", "sweep.csv", "captions.csv", "sweep_plot.png")},
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "sweep.json", record)
    return record


_T2I_COLUMNS = ("prompt_accuracy", *ATTRIBUTES, "fd", "diversity", "diversity_real", "diversity_ratio")


def _merge_interval_rows(rows_by_run: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per scale: the interval-off metrics, plus `<metric>_interval` columns from the interval-on run."""
    table = []
    for i, row in enumerate(rows_by_run["off"]):
        merged = {"guidance_scale": row["guidance_scale"]}
        merged.update({key: row[key] for key in (*_T2I_COLUMNS, "feature_diversity")})
        if "on" in rows_by_run:
            on = rows_by_run["on"][i]
            merged.update({f"{key}_interval": on[key] for key in ("prompt_accuracy", "fd", "diversity")})
        table.append(merged)
    return table


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if not isinstance(rows[0][k], list)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) for k in writer.fieldnames})


def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
