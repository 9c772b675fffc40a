"""`mmdiff sweep`: metrics against the guidance scale, in both directions, on any data, with a grid and plots.

Text to image runs on :meth:`MMDiffTextToImagePipeline.guidance_sweep`: every scale denoises the same prompts from the
same initial noise (image r of prompt p uses generator seed ``seed + p * images_per_prompt + r``), so the columns of
the grid differ only by w. The prompts are the first `num_prompts` distinct prompts of the shards. Per scale it
reports the generic metrics in every feature space given (FD, KID and precision/recall against the real images of
the first P x K records, CLIP score and R-precision of the images with their prompts; see `generic.py`) and the
benchmark's exact scores when the shards belong to one (shapes: prompt accuracy, layout diversity). With a guidance
interval the whole sweep runs a second time with CFG only inside the interval, and both wall times are recorded.

Image to text: for each caption guidance scale, the captions of the first `num_captions` records scored against
every reference (BLEU-4, CIDEr-D, ROUGE-L), by CLIP score and by the benchmark, and the NLL bound with the
CFG-combined logits at that scale (plus the unconditional, null-context bound).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import PIL.Image

from .generic import R_PRECISION_R, image_space_metrics, spaces_report
from .harness import EvalRun, check_counts, write_json
from .plots import plot_methods, plot_sweep, save_labeled_grid
from .run import caption_report

DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
DEFAULT_CAPTION_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)


def distinct_prompts(prompts: list[str], num_prompts: int) -> list[str]:
    """The first `num_prompts` distinct prompts, in shard order."""
    return list(dict.fromkeys(prompts))[:num_prompts]


def sweep_images(
    pipe,
    prompts: list[str],
    scales: list[float],
    images_per_prompt: int,
    num_inference_steps: int,
    seed: int,
    batch_size: int,
    guidance_interval: tuple[float, float] | None = None,
    guidance: str = "cfg",
    weak_model=None,
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
            guidance=guidance,
            weak_model=weak_model,
        )
        seconds += time.time() - t0
        rows += out.num_forward_rows
        for s, group in enumerate(out.images):
            images[s].extend(group)
    return images, seconds, rows


def sweep(
    pipeline_folder,
    val_shards: str | list[str],
    scales: list[float] = DEFAULT_SCALES,
    caption_scales: list[float] = DEFAULT_CAPTION_SCALES,
    num_prompts: int = 8,
    images_per_prompt: int = 4,
    num_captions: int = 64,
    num_inference_steps: int | None = None,
    caption_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = (0.2, 0.8),
    seed: int = 0,
    batch_size: int = 64,
    encoder: str | os.PathLike | None = None,
    clip: str | os.PathLike | None = None,
    inception: str | os.PathLike | None = None,
    nll_levels: int = 4,
    grid_samples: int = 2,
    scheduler: str | None = None,
    device: str | None = None,
    out_dir: str | os.PathLike = "outputs/sweep",
    caption_sampler: dict[str, Any] | None = None,
    guidance_methods: list[str] | tuple[str, ...] = ("cfg",),
    weak_model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run both sweeps and write `out_dir/{grid.png, sweep.csv, captions.csv, sweep.json, sweep_plot.png}`.

    encoder / clip / inception: feature spaces as in `evaluate`. guidance_interval: (t_low, t_high) for the
    interval-on run, None to skip it. grid_samples: samples shown per grid cell (prompts x scales).
    guidance_methods: more than ["cfg"] compares the methods at every scale with the same prompts and seeds (no
    interval), written to methods.csv, methods_grid.png and methods_plot.png; "autoguidance" needs `weak_model` (a
    pipeline folder of an earlier or smaller checkpoint). Returns the JSON record (also written to sweep.json).
    """
    check_counts(num_prompts=num_prompts, images_per_prompt=images_per_prompt, num_captions=num_captions)
    scales = [float(w) for w in scales]
    caption_scales = [float(w) for w in caption_scales]
    if not scales or not caption_scales:
        raise ValueError("--scales and --caption-scales each need at least one guidance scale")
    k = images_per_prompt
    run = EvalRun.open(
        pipeline_folder, val_shards, max(num_captions, num_prompts * k), device=device, scheduler=scheduler
    )
    records, benchmark, pipe = run.records, run.benchmark, run.pipe
    prompts = distinct_prompts(records.prompts, num_prompts)
    expanded = [p for p in prompts for _ in range(k)]
    reference = records.head(max(len(expanded), 2))
    num_inference_steps = run.sample_settings(num_inference_steps=num_inference_steps)["num_inference_steps"]
    caption_sampler = run.caption_sampler(caption_steps, caption_sampler)
    spaces = run.feature_spaces(encoder, clip, inception, records.images, records.prompts)
    out = Path(out_dir)
    real_features = {name: enc.image_features(reference.images) for name, enc in spaces.items()}

    methods = list(dict.fromkeys(guidance_methods or ["cfg"]))
    weak = pipe.weak_pipeline(weak_model) if weak_model is not None else None
    if "autoguidance" in methods and weak is None:
        raise ValueError("--guidance-methods autoguidance needs --weak-model (a folder of a weaker checkpoint)")

    def score(images: list[list[PIL.Image.Image]]) -> list[dict[str, Any]]:
        rows = []
        for w, imgs in zip(scales, images, strict=True):
            per_space = {
                space: image_space_metrics(
                    enc, imgs, reference.images, expanded, seed=seed, real_features=real_features[space]
                )
                for space, enc in spaces.items()
            }
            row = {"guidance_scale": w} | spaces_report(per_space)
            if benchmark is not None:
                row |= benchmark.image_metrics(imgs, expanded, pipe.image_size, seed, samples_per_prompt=k)
            rows.append(row)
        return rows

    runs = {"off": None, "on": guidance_interval} if guidance_interval else {"off": None}
    rows_by_run, timing, grids = {}, {}, {}
    for name, interval in runs.items():
        images, seconds, forward_rows = sweep_images(
            pipe, prompts, scales, k, num_inference_steps, seed, batch_size, interval
        )
        timing[name] = {"seconds": round(seconds, 3), "forward_rows": forward_rows, "interval": interval}
        rows_by_run[name] = score(images)
        grids[name] = images
    method_rows: dict[str, list[dict[str, Any]]] = {}
    method_images: dict[str, list[list[PIL.Image.Image]]] = {}
    for method in methods:
        if method == "cfg":
            method_rows[method], method_images[method] = rows_by_run["off"], grids["off"]
            continue
        images, seconds, forward_rows = sweep_images(
            pipe, prompts, scales, k, num_inference_steps, seed, batch_size, None, method,
            weak if method == "autoguidance" else None,
        )  # fmt: skip
        timing[method] = {"seconds": round(seconds, 3), "forward_rows": forward_rows, "interval": None}
        method_rows[method], method_images[method] = score(images), images
    table = _merge_interval_rows(rows_by_run)
    cells = [[grids["off"][s][p * k : p * k + grid_samples] for s in range(len(scales))] for p in range(len(prompts))]
    out.mkdir(parents=True, exist_ok=True)
    save_labeled_grid(cells, prompts, [f"w = {w:g}" for w in scales], out / "grid.png")
    if len(methods) > 1:
        write_method_comparison(method_rows, method_images, scales, prompts[0], grid_samples, out)

    # image -> text
    caption_records = records.head(num_captions)
    caption_rows: list[dict[str, Any]] = []
    for w in caption_scales:
        row = caption_report(
            pipe, caption_records, spaces, benchmark, pipe, w, caption_steps, nll_levels, batch_size,
            seed, probes=False, nll_guidance_scale=w,
            nll_null_bits=caption_rows[0]["nll_null_bits"] if caption_rows else None, caption_sampler=caption_sampler,
        )  # fmt: skip
        row.pop("samples", None)
        caption_rows.append(row)

    _write_csv(out / "sweep.csv", table)
    _write_csv(out / "captions.csv", caption_rows)
    plot_sweep(table, caption_rows, out / "sweep_plot.png", has_interval="on" in runs, timing=timing)
    record = {
        **run.header(),
        "seed": seed,
        "seeds": "image r of prompt p: seed + p * images_per_prompt + r; caption i: seed + i",
        "prompts": prompts,
        "images_per_prompt": k,
        "real_reference": f"the real images of the first {len(reference)} records",
        "r_precision": f"R = min({R_PRECISION_R}, distinct prompts); distractors: R - 1 other distinct prompts, "
        "drawn at random (seeded) for each image",
        "num_captions": len(caption_records),
        "num_inference_steps": num_inference_steps,
        "caption_steps": caption_steps,
        "caption_sampler": caption_sampler or {},
        "scheduler": type(pipe.scheduler).__name__,
        "nll_levels": nll_levels,
        "text_to_image": table,
        "guidance_methods": {m: [_plain(r) for r in rows] for m, rows in method_rows.items()}
        if len(methods) > 1
        else {},
        "weak_model": str(weak_model) if weak_model is not None else None,
        "image_to_text": caption_rows,
        "interval": timing,
        "files": {name: name for name in ("grid.png", "sweep.csv", "captions.csv", "sweep_plot.png")},
        "seconds": run.seconds(),
    }
    write_json(out / "sweep.json", record)
    return record


# the figures that the interval-on run adds to each row, as `<name>_interval`
_INTERVAL_COLUMNS = (
    "prompt_accuracy",
    "fd",
    "clip_score",
    "r_precision",
    "precision",
    "recall",
    "diversity",
    "diversity_ratio",
)


def _merge_interval_rows(rows_by_run: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per scale: the interval-off figures, plus `<figure>_interval` columns from the interval-on run."""
    table = []
    for i, row in enumerate(rows_by_run["off"]):
        merged = {key: value for key, value in row.items() if key != "per_prompt"}
        if "on" in rows_by_run:
            on = rows_by_run["on"][i]
            merged.update({f"{key}_interval": on[key] for key in _INTERVAL_COLUMNS if key in on})
        table.append(merged)
    return table


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=[k for k in rows[0] if not isinstance(rows[0][k], list | dict)], extrasaction="ignore"
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) for k in writer.fieldnames})


def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "per_prompt"}


def write_method_comparison(
    method_rows: dict[str, list[dict[str, Any]]],
    method_images: dict[str, list[list[PIL.Image.Image]]],
    scales: list[float],
    prompt: str,
    samples: int,
    out: Path,
) -> None:
    """methods.csv (one row per method and scale), methods_grid.png (method x scale, the first prompt's first
    samples, same seeds) and methods_plot.png (the figures against the scale, one line per method)."""
    table = [{"guidance": m, **_plain(r)} for m, rows in method_rows.items() for r in rows]
    _write_csv(out / "methods.csv", table)
    cells = [[method_images[m][s][:samples] for s in range(len(scales))] for m in method_rows]
    save_labeled_grid(
        cells, [f"{m}: {prompt}" for m in method_rows], [f"w = {w:g}" for w in scales], out / "methods_grid.png"
    )
    plot_methods(method_rows, out / "methods_plot.png")
