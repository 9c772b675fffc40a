"""`mmdiff demo`: the main job on the embedded default, end to end on a CPU in a few minutes.

shapes shards -> tokenizer -> tiny VAE -> shared DiT (both directions) -> pipeline folder -> images for held-out
captions and captions for held-out images in `outputs/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import load_config
from .sampling import save_grid


def find_config(name: str) -> Path:
    """configs/NAME from the working directory, else from the source checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"configs/{name} not found in {Path.cwd()} or beside the mmdiff package; run from the repo")


def run_demo(out: Path, work: Path, minutes: float, num_images: int, overrides: list[str] | None = None) -> dict:
    from .data.loader import expand_urls, iterate_records
    from .data.shapes import write_shapes_shards
    from .pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline
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

    # held-out validation scenes: their captions become prompts, their images get captioned
    held_out = []
    for record in iterate_records(expand_urls(str(data / "val"))):
        held_out.append(record)
        if len(held_out) == 16:
            break
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t2i = MMDiffTextToImagePipeline.from_pretrained(summary["pipeline"]).to(device)
    i2t = MMDiffImageToTextPipeline(**t2i.components)
    generator = torch.Generator(device).manual_seed(0)
    prompts = [caption for _, _, caption, _ in held_out[:8]]
    images = t2i(
        prompts,
        num_images_per_prompt=4,
        num_inference_steps=cfg.sample.num_inference_steps,
        guidance_scale=cfg.sample.guidance_scale,
        generator=generator,
    ).images
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(images_dir / f"{i // 4:02d}_{i % 4}.png")
    (images_dir / "prompts.json").write_text(json.dumps({f"{i:02d}": p for i, p in enumerate(prompts)}, indent=1))
    grid = save_grid(images, rows=len(prompts), path=out / "generated_grid.png")

    captions = i2t(
        [image for _, image, _, _ in held_out],
        num_inference_steps=cfg.sample.caption_steps,
        guidance_scale=cfg.sample.caption_guidance_scale,
        generator=generator,
    ).text
    records = [{"key": key, "reference": ref, "generated": gen} for (key, _, ref, _), gen in zip(held_out, captions)]
    (out / "captions.json").write_text(json.dumps(records, indent=1))
    save_grid([image.convert("RGB") for _, image, _, _ in held_out], rows=2, path=out / "captioned_images.png")

    print("\nheld-out image -> generated caption:")
    for record in records[:8]:
        print(f"  {record['reference']!r:55} -> {record['generated']!r}")
    print(f"\ntraining: {json.dumps({k: summary[k] for k in ('steps', 'minutes', 'first_eval', 'last_eval')})}")
    print(f"images for held-out captions: {images_dir}/ (grid: {grid})")
    print(f"captions of held-out images: {out / 'captions.json'}")
    print(f"pipeline folder: {summary['pipeline']}")
    return {"summary": summary, "captions": records, "grid": str(grid)}
