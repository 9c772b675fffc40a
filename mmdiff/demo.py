"""`mmdiff demo`: the main job on the embedded default.

By default it runs the shipped model (`assets/shapes_small`, trained with `configs/shapes_small.yaml`) on held-out
validation scenes (`assets/shapes_val_sample.tar`) and writes to `outputs/`: images for held-out captions, captions
of held-out images, both scored by the shapes evaluator, and a small guidance sweep (grid + plot). No training; a
couple of minutes on a 2-core CPU.

`mmdiff demo --train` runs the whole path from scratch instead: shapes shards -> tokenizer -> tiny VAE -> shared DiT
(both directions, `configs/shapes_tiny.yaml`, a few CPU minutes) -> pipeline folder -> images and captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import load_config
from .eval.plots import save_grid
from .paths import SHIPPED_MODEL, VAL_SAMPLE, find_repo_file

# The `sample` settings the demo uses (from the config saved with the pipeline, or the training config).
SAMPLE_KEYS = ("num_inference_steps", "guidance_scale", "caption_steps", "caption_guidance_scale")


def find_config(name: str) -> Path:
    """configs/NAME from the working directory, else from the source checkout this package runs from."""
    return find_repo_file(f"configs/{name}")


def first_records(spec: str | Path, count: int) -> list[tuple[str, object, str, dict | None]]:
    """The first `count` records of image-caption shards: (key, image, caption, attributes or None)."""
    from .data.shards import iterate_records

    records = []
    for record in iterate_records(str(spec)):
        records.append(record)
        if len(records) == count:
            break
    return records


def _write_samples(t2i, i2t, held_out, out: Path, sample_cfg, generator) -> dict:
    """Images for 8 held-out captions (4 each) and captions of 16 held-out images, scored by the shapes evaluator."""
    from .data.shapes import parse_caption, scene_from_attributes
    from .eval.benchmarks.shapes.captions import caption_metrics
    from .eval.benchmarks.shapes.detector import score_image

    prompts = [caption for _, _, caption, _ in held_out[:8]]
    images = t2i(
        prompts,
        num_images_per_prompt=4,
        num_inference_steps=sample_cfg["num_inference_steps"],
        guidance_scale=sample_cfg["guidance_scale"],
        generator=generator,
    ).images
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(images_dir / f"{i // 4:02d}_{i % 4}.png")
    (images_dir / "prompts.json").write_text(json.dumps({f"{i:02d}": p for i, p in enumerate(prompts)}, indent=1))
    grid = save_grid(images, rows=len(prompts), path=out / "generated_grid.png")
    correct = [bool(score_image(im, prompts[i // 4])["correct"]) for i, im in enumerate(images)]

    captions = i2t(
        [image for _, image, _, _ in held_out],
        num_inference_steps=sample_cfg["caption_steps"],
        guidance_scale=sample_cfg["caption_guidance_scale"],
        generator=generator,
    ).text
    records = [{"key": key, "reference": ref, "generated": gen} for (key, _, ref, _), gen in zip(held_out, captions)]
    (out / "captions.json").write_text(json.dumps(records, indent=1))
    save_grid([image.convert("RGB") for _, image, _, _ in held_out], rows=2, path=out / "captioned_images.png")
    scenes = [scene_from_attributes(a) if a and "objects" in a else parse_caption(ref) for _, _, ref, a in held_out]
    canonical = [a.get("canonical", ref) if a else ref for _, _, ref, a in held_out]
    metrics = caption_metrics(captions, scenes, canonical) if all(scenes) else {}

    print("\nheld-out image -> generated caption:")
    for record in records[:8]:
        print(f"  {record['reference']!r:55} -> {record['generated']!r}")
    print(
        f"\nimages for held-out captions: {images_dir}/ (grid: {grid}); evaluator: {sum(correct)}/{len(correct)} show"
    )
    print("  their prompt exactly")
    if metrics:
        print(f"captions of held-out images: {out / 'captions.json'}; all attributes right: {metrics['all']:.3f},")
        print(f"  exact canonical match: {metrics['exact_match']:.3f}")
    return {"prompt_accuracy": sum(correct) / len(correct), "captions": records, "caption_metrics": metrics}


def run_shipped_demo(out: Path, model: str | None = None, sweep: bool = True) -> dict:
    """The shipped model on held-out scenes: samples, captions and a small guidance sweep in `out`."""
    from .eval.sweep import sweep as run_sweep
    from .pipelines import as_image_to_text
    from .pipelines.factory import load_pipeline

    folder = Path(model) if model else find_repo_file(SHIPPED_MODEL)
    val = find_repo_file(VAL_SAMPLE)
    device = None  # cuda when available
    t2i = load_pipeline(folder, device=device)
    i2t = as_image_to_text(t2i)
    sample_cfg = {k: getattr(t2i.sample_config, k) for k in SAMPLE_KEYS}
    print(f"model: {folder}  held-out scenes: {val}  settings: {sample_cfg}")
    result = _write_samples(t2i, i2t, first_records(val, 16), out, sample_cfg, torch.Generator(device).manual_seed(0))
    if sweep:
        record = run_sweep(
            folder,
            str(val),
            scales=[1.0, 2.0, 3.0, 5.0],
            caption_scales=[1.0, 2.0, 4.0],
            num_prompts=4,
            images_per_prompt=8,
            num_captions=32,
            num_inference_steps=sample_cfg["num_inference_steps"],
            guidance_interval=None,
            device=device,
            out_dir=out / "sweep",
            nll_levels=2,
        )
        print("\nsmall guidance sweep (4 prompts x 8 seeds per scale; `mmdiff sweep` for the full one):")
        for row in record["text_to_image"]:
            print(f"  w={row['guidance_scale']:g}: prompt accuracy {row['prompt_accuracy']:.2f}")
        print(f"  grid: {out / 'sweep' / 'grid.png'}  plot: {out / 'sweep' / 'sweep_plot.png'}")
        result["sweep"] = record
    return result


def run_demo(out: Path, work: Path, minutes: float, num_images: int, overrides: list[str] | None = None) -> dict:
    """`mmdiff demo --train`: data -> train the tiny config -> samples and captions from the trained pipeline."""
    from .data.shapes import write_shapes_shards
    from .pipelines import as_image_to_text
    from .pipelines.factory import load_pipeline
    from .training.trainer import train

    data = work / "data"
    if not (data / "train").is_dir():
        write_shapes_shards(data, num_images, image_size=32, seed=0)
    cfg = load_config(
        find_config("shapes_tiny.yaml"),
        [
            f"data.train_shards={data / 'train'}",
            f"data.val_shards={data / 'val'}",
            f"train.output_dir={work / 'shapes_tiny'}",
            f"train.max_minutes={minutes}",
            *(overrides or []),
        ],
    )
    summary = train(cfg, resume=True)
    device = None  # cuda when available
    t2i = load_pipeline(summary["pipeline"], device=device)
    i2t = as_image_to_text(t2i)
    sample_cfg = {k: getattr(cfg.sample, k) for k in SAMPLE_KEYS}
    result = _write_samples(
        t2i, i2t, first_records(data / "val", 16), out, sample_cfg, torch.Generator(device).manual_seed(0)
    )
    print(f"\ntraining: {json.dumps({k: summary[k] for k in ('steps', 'minutes', 'first_eval', 'last_eval')})}")
    print(f"pipeline folder: {summary['pipeline']}")
    return {"summary": summary, **result}
