"""Speed against prompt accuracy for diffusers' step caching on the shipped model (docs/performance.md, "Caching DiT
steps").

    python scripts/cache_frontier.py --num-prompts 32 --out /tmp/cache_frontier.json

For each setting (no cache, first-block cache at three thresholds, TaylorSeer at two refresh intervals) the shipped
model draws one image for each of the first N held-out prompts of assets/shapes_val_sample.tar, image i with seed i,
at the folder's sampling defaults (25 DDIM steps, w = 3). Prints images/s, prompt accuracy (the shapes benchmark's
reader, as `mmdiff eval` scores it), the fraction of DiT blocks that ran, and the mean absolute pixel difference to
the uncached images (pixels in [0, 1]); writes the same rows as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from mmdiff.demo import first_records
from mmdiff.eval.benchmarks.shapes.detector import score_image
from mmdiff.eval.run import generate_images
from mmdiff.paths import SHIPPED_MODEL, VAL_SAMPLE
from mmdiff.pipelines.factory import load_pipeline

SETTINGS = {
    "none": None,
    "fbc 0.05": FirstBlockCacheConfig(threshold=0.05),
    "fbc 0.1": FirstBlockCacheConfig(threshold=0.1),
    "fbc 0.2": FirstBlockCacheConfig(threshold=0.2),
    "taylorseer 2": TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=3, taylor_factors_dtype=torch.float32
    ),
    "taylorseer 4": TaylorSeerCacheConfig(
        cache_interval=4, disable_cache_before_step=3, taylor_factors_dtype=torch.float32
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--shards", default=VAL_SAMPLE)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=None)
    pipe.set_progress_bar_config(disable=True)
    steps, w = pipe.sample_config.num_inference_steps, pipe.sample_config.guidance_scale
    prompts = [caption for _, _, caption, _ in first_records(args.shards, args.num_prompts)]
    blocks_run = [0]
    for block in pipe.transformer.blocks:  # the MLP runs inside a block's forward, which a skipped block never enters
        block.mlp.register_forward_hook(lambda *_: blocks_run.__setitem__(0, blocks_run[0] + 1))
    generate_images(pipe, prompts[:2], w, 2)  # warm-up: first-call costs stay out of the timings

    rows, reference = [], None
    for name, config in SETTINGS.items():
        if config is not None:
            pipe.transformer.enable_cache(config)
        blocks_run[0] = 0
        start = time.perf_counter()
        images = generate_images(pipe, prompts, w, steps)
        seconds = time.perf_counter() - start
        if config is not None:
            pipe.transformer.disable_cache()
        pixels = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
        reference = pixels if reference is None else reference
        batches = -(-len(prompts) // 64)  # generate_images' batches: one forward per step and batch
        row = {
            "setting": name,
            "images_per_s": len(images) / seconds,
            "prompt_accuracy": float(np.mean([score_image(im, p)["correct"] for im, p in zip(images, prompts)])),
            "blocks_run": blocks_run[0] / (batches * steps * len(pipe.transformer.blocks)),
            "mean_abs_diff": float(np.abs(pixels - reference).mean()),
        }
        rows.append(row)
        print(
            f"{name:>14}  {row['images_per_s']:6.2f} images/s  accuracy {row['prompt_accuracy']:.3f}  "
            f"blocks run {row['blocks_run']:.2f}  mean |diff| {row['mean_abs_diff']:.4f}",
            flush=True,
        )
    record = {
        "date": date.today().isoformat(),
        "model": str(args.model),
        "shards": str(args.shards),
        "num_prompts": len(prompts),
        "num_inference_steps": steps,
        "guidance_scale": w,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
