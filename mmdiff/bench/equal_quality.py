"""`mmdiff bench --frontier FRONTIER.json`: the trained shapes models timed at equal quality.

`scripts/frontier.py` measures every contender's prompt accuracy on the same held-out prompts. This section takes
the shipped model's default (DDIM, 25 guided steps) as the reference and, for each model in the frontier, the
setting of each family (a model, with one cache hook or none) with the fewest transformer block-rows per image whose
accuracy is within `tolerance` (one point) of the
reference's; it times those settings and diffusers' PixArt-alpha pipeline at 25 DDIM steps, alternated after
warm-up, at the same image size, width, depth, heads and batch (PixArt has no trained shapes model: a random-init
transformer and T5 of the shipped model's size, which costs what a trained one would). The quality figures of each
setting are recorded next to its time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..eval.benchmarks.shapes.frontier import Contender, apply_setting
from ..pipelines.factory import load_pipeline
from . import contenders as C
from .presets import BenchPreset
from .timing import Contender as Timed
from .timing import paired_ratio, summarize, time_alternating

REFERENCE = "v DDIM 25"
QUALITY_KEYS = ("prompt_accuracy", "fd", "caption_accuracy", "rows_per_image", "block_rows_per_image")


def read_frontier(path: str | Path) -> dict:
    """The frontier JSON, checked for the reference row; a ValueError naming the problem otherwise."""
    try:
        frontier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--frontier {path}: cannot read it as JSON ({err})") from None
    rows = {row.get("label"): row for row in frontier.get("rows", []) if "prompt_accuracy" in row}
    if REFERENCE not in rows:
        raise ValueError(f"--frontier {path} has no measured {REFERENCE!r} row (run scripts/frontier.py with it)")
    return frontier


def pick_settings(frontier: dict, tolerance: float = 0.01) -> tuple[dict, list[dict]]:
    """(the reference row, the cheapest row of each family (a model, with one cache hook or none) within
    `tolerance` of its accuracy: the fewest block-rows per image, then the most images/s); families with no such
    row are left out (the JSON says which in "not_reached")."""
    measured = [row for row in frontier["rows"] if "prompt_accuracy" in row]
    reference = next(row for row in measured if row["label"] == REFERENCE)
    chosen = []
    floor = reference["prompt_accuracy"] - tolerance
    for family in dict.fromkeys(_family(row) for row in measured):
        good = [r for r in measured if _family(r) == family and r["prompt_accuracy"] >= floor]
        if good:
            chosen.append(min(good, key=lambda r: (r["block_rows_per_image"], -r["images_per_s"])))
    if reference not in chosen:
        chosen.insert(0, reference)
    return reference, chosen


def _family(row: dict) -> tuple:
    """A contender family: one model, with one cache hook or none (its samplers and step counts are its settings)."""
    return row["model"], row.get("cache")


def _contender(row: dict) -> Contender:
    interval = tuple(row["interval"]) if row.get("interval") else None
    sigmas = tuple(row["sigmas"]) if row.get("sigmas") else None
    return Contender(row["label"], row["model"], row.get("scheduler"), row["steps"], interval, row.get("cache"), sigmas)


def bench_equal_quality(preset: BenchPreset, frontier_path: str | Path, device, autocast, tolerance: float = 0.01):
    frontier = read_frontier(frontier_path)
    reference, chosen = pick_settings(frontier, tolerance)
    pipes, runs = {}, {}
    for row in chosen:
        setting = _contender(row)
        if row["model"] not in pipes:
            pipes[row["model"]] = load_pipeline(frontier["models"][row["model"]], device=str(device), progress=False)
            pipes[row["model"]].set_progress_bar_config(disable=True)
        runs[row["label"]] = (pipes[row["model"]], setting, row["guidance_scale"])
    shipped = pipes.get("shipped") or load_pipeline(frontier["models"]["shipped"], device=str(device), progress=False)
    held_out = frontier.get("prompts") or C.PROMPTS  # the frontier's own held-out prompts, the first batch of them
    prompts = [held_out[i % len(held_out)] for i in range(preset.sample_batch)]
    batch = len(prompts)

    def mmdiff_run(label: str):
        pipe, setting, w = runs[label]

        def run():
            apply_setting(pipe, setting)  # pipelines shared by two settings switch scheduler / cache each call
            with autocast:
                return pipe(
                    prompts,
                    num_inference_steps=setting.steps,
                    sigmas=None if setting.sigmas is None else list(setting.sigmas),
                    guidance_scale=w,
                    guidance_interval=setting.interval,
                    generator=torch.Generator().manual_seed(0),
                    output_type="pt",
                )

        return run

    pixart_preset = matched_preset(preset, shipped)
    tokenizer = C.build_tokenizer()
    pixart = C.pixart_pipeline(
        C.build_pixart(pixart_preset, device), C.build_t5(pixart_preset, len(tokenizer), device), shipped.vae, tokenizer
    )
    size = shipped.image_size

    def pixart_run():
        with autocast:
            return pixart(
                prompts, negative_prompt="", height=size, width=size, num_inference_steps=25,
                guidance_scale=shipped.sample_config.guidance_scale, generator=torch.Generator().manual_seed(0),
                clean_caption=False, use_resolution_binning=False,
                max_sequence_length=pixart_preset.context_length, output_type="pt",
            )  # fmt: skip

    timed = [Timed("pixart 25", pixart_run, batch, device)]
    timed += [Timed(row["label"], mmdiff_run(row["label"]), batch, device) for row in chosen]
    with torch.no_grad():
        times = time_alternating(timed, preset.repeats, preset.warmup)
    results = {}
    for contender in timed:
        record = summarize(contender, times[contender.name])
        record["paired_ratio"] = paired_ratio(times["pixart 25"], times[contender.name])
        results[contender.name] = record
    for row in chosen:
        record = results[row["label"]]
        record.update({key: row[key] for key in QUALITY_KEYS})
        record["setting"] = {
            k: row.get(k) for k in ("model", "scheduler", "steps", "sigmas", "interval", "cache", "guidance_scale")
        }
        record["vs_reference"] = record["per_s"] / results[REFERENCE]["per_s"]
        record["vs_pixart"] = record["per_s"] / results["pixart 25"]["per_s"]
    reached = {_family(row) for row in chosen}
    return {
        "unit": "images/s",
        "frontier": str(frontier_path),
        "frontier_command": frontier.get("command"),
        "reference": REFERENCE,
        "reference_accuracy": reference["prompt_accuracy"],
        "tolerance": tolerance,
        "batch": batch,
        "image_size": size,
        "pixart": {"steps": 25, "size_matched_to": frontier["models"]["shipped"], "weights": "random init"},
        "not_reached": [
            {"model": model, "cache": cache}
            for model, cache in dict.fromkeys(_family(r) for r in frontier["rows"] if "prompt_accuracy" in r)
            if (model, cache) not in reached
        ],
        "results": results,
    }


def matched_preset(preset: BenchPreset, pipe) -> BenchPreset:
    """The preset with the shipped transformer's shape (PixArt is built from it)."""
    cfg = pipe.transformer.config
    model = ModelConfig(
        patch_size=cfg.patch_size, hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, text_encoder_depth=max(cfg.text_encoder_depth, 1),
    )  # fmt: skip
    return dataclasses.replace(
        preset, model=model, latent_size=cfg.sample_size, in_channels=cfg.in_channels,
        context_length=cfg.max_text_length,
    )  # fmt: skip
