"""`mmdiff generate` and `mmdiff caption`: the pipelines from the command line, writing PNGs, grids and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import torch


def pick_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def save_grid(images: list[PIL.Image.Image], rows: int, path: Path, min_cell: int = 128) -> Path:
    """Tile images row-major into one PNG, upscaling small images (nearest) so a person can see them."""
    from diffusers.utils import make_image_grid

    cols = (len(images) + rows - 1) // rows
    images = images + [PIL.Image.new("RGB", images[0].size, "white")] * (rows * cols - len(images))
    scale = max(1, min_cell // images[0].width)
    images = [im.resize((im.width * scale, im.height * scale), PIL.Image.NEAREST) for im in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=rows, cols=cols).save(path)
    return path


def generate_command(args) -> int:
    from .pipelines import MMDiffTextToImagePipeline, swap_scheduler

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt (use --prompt '' for unconditional samples) or --prompts-file")
    device = pick_device(args.device)
    pipe = MMDiffTextToImagePipeline.from_pretrained(args.model).to(device)
    if args.scheduler:
        swap_scheduler(pipe, args.scheduler)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = pipe(
        prompts,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval or ()) or None,
        guidance_rescale=args.guidance_rescale,
        num_images_per_prompt=args.num_images_per_prompt,
        generator=generator,
    ).images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, image in enumerate(images):
        prompt = prompts[i // args.num_images_per_prompt]
        path = out / f"{i:04d}.png"
        image.save(path)
        records.append({"file": path.name, "prompt": prompt})
    (out / "prompts.json").write_text(json.dumps(records, indent=1))
    if args.grid:
        print(f"grid: {save_grid(images, len(prompts), out / 'grid.png')}")
    print(f"wrote {len(images)} images to {out}")
    return 0


def caption_command(args) -> int:
    from .pipelines import MMDiffImageToTextPipeline

    images, names = [], []
    if args.shards:
        from .data.loader import expand_urls, iterate_records

        for key, image, caption, _ in iterate_records(expand_urls(args.shards)):
            images.append(image)
            names.append({"key": key, "reference": caption})
            if len(images) >= args.num:
                break
    for path in args.images:
        images.append(PIL.Image.open(path))
        names.append({"file": str(path)})
    if not images:
        raise ValueError("give image files or --shards")
    device = pick_device(args.device)
    pipe = MMDiffImageToTextPipeline.from_pretrained(args.model).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    result = pipe(
        images,
        prompt=args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        max_length=args.max_length,
        remasking=args.remasking,
        temperature=args.temperature,
        generator=generator,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [{**name, "caption": text} for name, text in zip(names, result.text)]
    if out.suffix == ".txt":
        out.write_text("\n".join(result.text) + "\n")
    else:
        out.write_text(json.dumps(records, indent=1))
    for record in records:
        print(json.dumps(record))
    print(f"wrote {len(records)} captions to {out}")
    return 0
