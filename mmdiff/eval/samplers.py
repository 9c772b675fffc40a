"""`mmdiff eval-samplers`: caption samplers compared at their settings — accuracy against transformer rows and time.

Every setting captions the same N held-out images with the same seeds and guidance; the figures are the caption
scores (the benchmark's exact ones when the shards have a benchmark, e.g. shapes: every attribute right and exact
match; BLEU-4 / CIDEr-D otherwise), the transformer rows run per caption (CFG's unconditional rows included: the
work a sampler costs) and captions per second. Writes samplers.json, samplers.csv and samplers_plot.png.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..pipelines import as_image_to_text
from .generic import generic_caption_metrics
from .harness import EvalRun

# (label, pipeline keyword arguments): today's default first, then each sampler over its main parameter
DEFAULT_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("schedule K=16", {"sampler": "schedule", "num_inference_steps": 16}),
    ("schedule K=8", {"sampler": "schedule", "num_inference_steps": 8}),
    ("schedule K=4", {"sampler": "schedule", "num_inference_steps": 4}),
    *[
        (f"threshold {tau}", {"sampler": "threshold", "threshold": tau})
        for tau in (0.999, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5)
    ],
    *[
        (f"entropy {g}", {"sampler": "entropy", "entropy_bound": g})
        for g in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    ],
    ("threshold 0.99, blocks of 4", {"sampler": "threshold", "threshold": 0.99, "block_length": 4}),
    ("threshold 0.99, blocks of 8", {"sampler": "threshold", "threshold": 0.99, "block_length": 8}),
    ("threshold 0.9, blocks of 8", {"sampler": "threshold", "threshold": 0.9, "block_length": 8}),
    ("schedule K=8, blocks of 8", {"sampler": "schedule", "num_inference_steps": 8, "block_length": 8}),
    *[
        (f"schedule K=8, remask {f}", {"sampler": "schedule", "num_inference_steps": 8, "remask_fraction": f})
        for f in (0.1, 0.25)
    ],
    ("schedule K=4, remask 0.25", {"sampler": "schedule", "num_inference_steps": 4, "remask_fraction": 0.25}),
]


def family(settings: dict[str, Any]) -> str:
    """The curve a setting belongs to in the plot."""
    name = settings.get("sampler", "schedule")
    if settings.get("block_length"):
        name += " + blocks"
    if settings.get("remask_fraction"):
        name += " + remask"
    return name


def caption_with(i2t, images, settings: dict[str, Any], guidance_scale: float, batch_size: int, seed: int):
    """Captions of `images` (image i seeded `seed + i`), the transformer rows they took and the seconds."""
    texts, rows, seconds = [], 0, 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        t0 = time.perf_counter()
        out = i2t(chunk, guidance_scale=guidance_scale, generator=generators, **settings)
        seconds += time.perf_counter() - t0
        texts.extend(out.text)
        rows += out.num_forward_rows
    return texts, rows, seconds


def compare_caption_samplers(
    model: str | os.PathLike,
    shards: str | list[str],
    num: int = 512,
    settings: list[tuple[str, dict[str, Any]]] | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Caption the first `num` records with every setting; see the module doc. Returns the JSON record."""
    settings = settings or DEFAULT_SETTINGS
    run = EvalRun.open(model, shards, num, num, f"--num {num}", device)
    records, benchmark, i2t = run.records, run.benchmark, as_image_to_text(run.pipe)
    guidance_scale = run.sample_settings(caption_guidance_scale=guidance_scale)["caption_guidance_scale"]
    i2t(records.images[:2], guidance_scale=guidance_scale)  # warm-up: first-call costs out of the timings
    rows_out = []
    for label, kwargs in tqdm(settings, desc="samplers"):
        texts, rows, seconds = caption_with(i2t, records.images, kwargs, guidance_scale, batch_size, seed)
        scores = benchmark.caption_metrics(texts, records) if benchmark else {}
        scores = {k: v for k, v in scores.items() if isinstance(v, int | float)}
        scores |= {k: v for k, v in generic_caption_metrics(texts, records.references).items() if k != "not_computed"}
        rows_out.append(
            {
                "setting": label,
                "family": family(kwargs),
                **kwargs,
                "rows_per_caption": rows / len(texts),
                "captions_per_s": len(texts) / seconds,
                **scores,
                "samples": texts[:4],
            }
        )
    record = {
        **run.header(),
        "num": num,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "device": str(i2t._execution_device),
        "torch_threads": torch.get_num_threads(),
        "settings": rows_out,
    }
    if out_dir is not None:
        write_outputs(record, Path(out_dir))
    return record


def accuracy_key(row: dict[str, Any]) -> str:
    """The score the comparison is judged on: every attribute right on the shapes benchmark, else CIDEr-D."""
    return "all" if "all" in row else "cider_d"


def write_outputs(record: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.json").write_text(json.dumps(record, indent=1))
    keys = ["setting", "family", "rows_per_caption", "captions_per_s", "all", "exact_match", "cider_d", "bleu4"]
    with open(out / "samplers.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record["settings"])
    plot_samplers(record, out / "samplers_plot.png")


def plot_samplers(record: dict[str, Any], path: Path) -> Path:
    """Caption accuracy against transformer rows per caption, one line per sampler family."""
    from matplotlib.figure import Figure

    rows = record["settings"]
    key = accuracy_key(rows[0])
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for name in dict.fromkeys(r["family"] for r in rows):
        points = sorted((r["rows_per_caption"], r[key], r["setting"]) for r in rows if r["family"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    reference = rows[0]
    ax.axhline(reference[key] - (0.005 if key == "all" else 0.0), color="grey", lw=0.8, ls="--")
    ax.axvline(reference["rows_per_caption"] / 2, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks([2, 4, 8, 16, 32, 64], labels=["2", "4", "8", "16", "32", "64"])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("transformer rows per caption (log; CFG rows included)")
    ax.set_ylabel("captions with every attribute right" if key == "all" else "CIDEr-D")
    ax.set_title(f"caption samplers, {record['num']} held-out images, w = {record['guidance_scale']:g}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path
