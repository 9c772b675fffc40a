"""`mmdiff generate` and `mmdiff caption`: the pipelines from the command line, writing PNGs, grids and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import torch
from diffusers.utils import logging as diffusers_logging


def pick_device(device: str | None) -> str:
    """`device` when this machine has it (else a ValueError saying so); without one, cuda when available."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; give cpu, cuda, cuda:1, mps ...") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise ValueError(f"--device {device!r}: this machine has no {kind} device to run on; try --device cpu")
    return device


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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipe(cls, args):
    """`cls.from_pretrained(args.model)` on `args.device` in `args.dtype`, progress bar as `args.quiet` says."""
    device = pick_device(args.device)
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed accepts
        raise ValueError(f"--seed {args.seed} is out of range: it must lie in [0, 2**64 - 1]")
    quiet = bool(getattr(args, "quiet", False))
    was_enabled = diffusers_logging.is_progress_bar_enabled()
    if quiet:  # diffusers' "Loading pipeline components" bar is global; restored below
        diffusers_logging.disable_progress_bar()
    try:
        # `dtype` is diffusers 0.42's spelling of `torch_dtype` (the old name still works, with a FutureWarning)
        pipe = cls.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(device)
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=quiet)
    if getattr(args, "compile", False):
        pipe.transformer.compile()  # in place: same class, config and weights; the first call compiles
    if getattr(args, "scheduler", None):
        from .pipelines import swap_scheduler

        swap_scheduler(pipe, args.scheduler)
    return pipe, torch.Generator(device).manual_seed(args.seed)


def open_image_file(path: str | Path) -> PIL.Image.Image:
    """An image file, decoded in full now, so that a missing, empty, non-image or truncated file is one error naming
    the file (FileNotFoundError or ValueError) here, not a PIL traceback from inside a pipeline later."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give image files (.png, .jpg, ...)")
    if path.stat().st_size == 0:
        raise ValueError(f"image file {path} is empty")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read (a text file, or a format it does not know?)") from None
    except Exception as err:  # PIL raises many types for damaged files: OSError, SyntaxError, EOFError, ...
        raise ValueError(f"image file {path} is damaged: {type(err).__name__}: {err}") from None
    return image


def check_out(out: str | Path, folder: bool) -> None:
    """Refuse an --out that cannot be written before any sampling: a file where a folder is wanted (or the
    reverse), or a path under an existing file."""
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the images")
    if not folder and out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a .json or .txt file for the captions")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out}: {blocking} is a file, not a folder")


def _read_text_file(path: str | Path, option: str) -> str:
    """A UTF-8 text file named on the command line; a missing, non-file or binary one is one error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{option} {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {path} is not UTF-8 text (byte {err.start})") from None


def _interval(values: list[float] | None) -> tuple[float, float] | None:
    return tuple(values) if values else None


def _save_images(images: list[PIL.Image.Image], out: Path, records: list[dict]) -> None:
    """Write 0000.png, 0001.png, ... and an index.json of `records` (one per image) beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, record) in enumerate(zip(images, records, strict=True)):
        image.save(out / f"{i:04d}.png")
        record["file"] = f"{i:04d}.png"
    (out / "index.json").write_text(json.dumps(records, indent=1))


def generate_command(args) -> int:
    from .pipelines import MMDiffTextToImagePipeline

    check_out(args.out, folder=True)
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = _read_text_file(args.prompts_file, "--prompts-file").splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(f"--prompts-file {args.prompts_file} holds no prompts (one per line)")
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt (use --prompt '' for unconditional samples) or --prompts-file")
    pipe, generator = load_pipe(MMDiffTextToImagePipeline, args)
    images = pipe(
        prompts,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=_interval(args.guidance_interval),
        guidance_rescale=args.guidance_rescale,
        num_images_per_prompt=args.num_images_per_prompt,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images
    out = Path(args.out)
    records = [{"prompt": prompts[i // args.num_images_per_prompt]} for i in range(len(images))]
    _save_images(images, out, records)
    (out / "prompts.json").write_text(json.dumps(records, indent=1))  # the name earlier versions wrote
    if args.grid:
        print(f"grid: {save_grid(images, len(prompts), out / 'grid.png')}")
    print(f"wrote {len(images)} images to {out}")
    return 0


def _write_captions(out: Path, records: list[dict], texts: list[str]) -> None:
    """A .txt file gets one caption per line; anything else gets the JSON records."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".txt":
        out.write_text("\n".join(texts) + "\n")
    else:
        out.write_text(json.dumps(records, indent=1))
    for record in records:
        print(json.dumps(record))
    print(f"wrote {len(records)} captions to {out}")


def caption_command(args) -> int:
    from .pipelines import MMDiffImageToTextPipeline, infill_caption

    check_out(args.out, folder=False)
    if args.prompt and args.template:
        raise ValueError("give either --prompt (a fixed prefix) or --template (blanks marked with the mask token)")
    if args.unconditional < 0 or (args.unconditional and (args.images or args.shards)):
        raise ValueError("--unconditional N takes N >= 1 and no image files or --shards: captions from p(text) alone")
    if args.shards and args.num < 1:
        raise ValueError(f"--num must be >= 1 (images to caption from --shards), got {args.num}")
    images, names = [], []
    if args.shards:
        from .data.shards import expand_urls, iterate_records

        for key, image, caption, _ in iterate_records(expand_urls(args.shards)):
            images.append(image)
            names.append({"key": key, "reference": caption})
            if len(images) >= args.num:
                break
        if not images:
            raise ValueError(f"--shards {args.shards}: no readable image-caption records in these shards")
    for path in args.images:
        images.append(open_image_file(path))
        names.append({"file": str(path)})
    if not images and not args.unconditional:
        raise ValueError("give image files, --shards, or --unconditional N")
    pipe, generator = load_pipe(MMDiffImageToTextPipeline, args)
    common = dict(
        guidance_scale=args.guidance_scale,
        remasking=args.remasking,
        temperature=args.temperature,
        generator=generator,
        return_tokens=True,
    )
    if not images:
        names = [{"unconditional": i} for i in range(args.unconditional)]
    if args.template:
        result = infill_caption(pipe, args.template, images or None, num_inference_steps=args.steps, **common)
        if not images:
            names = [{"template": args.template}]
    else:
        result = pipe(
            images or None,
            prompt=args.prompt,
            num_inference_steps=args.steps,
            max_length=args.max_length,
            guidance_interval=_interval(args.guidance_interval),
            num_captions=None if images else args.unconditional,
            **common,
        )
    records = [{**name, "caption": text} for name, text in zip(names, result.text)]
    if args.tokens:
        for record, ids, conf in zip(records, result.token_ids.tolist(), result.confidences.tolist()):
            record.update(token_ids=ids, confidences=[round(c, 4) for c in conf])
    _write_captions(Path(args.out), records, result.text)
    return 0


def sample_pairs_command(args) -> int:
    from .pipelines import MMDiffTextToImagePipeline, sample_pairs

    check_out(args.out, folder=True)
    pipe, generator = load_pipe(MMDiffTextToImagePipeline, args)
    pairs = sample_pairs(
        pipe,
        num_pairs=args.num,
        caption_steps=args.caption_steps,
        image_steps=args.steps,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        generator=generator,
    )
    out = Path(args.out)
    _save_images(pairs.images, out, [{"caption": text} for text in pairs.text])
    print(f"wrote {len(pairs.images)} image-caption pairs to {out}")
    return 0


def vary_command(args) -> int:
    from .pipelines import MMDiffTextToImagePipeline, vary_image

    check_out(args.out, folder=True)
    if not args.images:
        raise ValueError("give at least one image file to vary")
    images = [open_image_file(path) for path in args.images]
    pipe, generator = load_pipe(MMDiffTextToImagePipeline, args)
    result = vary_image(
        pipe,
        images,
        num_variations=args.num_variations,
        caption_guidance_scale=args.caption_guidance_scale,
        image_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
    )
    out = Path(args.out)
    records = [
        {"source": str(args.images[i // args.num_variations]), "caption": result.text[i // args.num_variations]}
        for i in range(len(result.images))
    ]
    _save_images(result.images, out, records)
    if args.grid:
        print(f"grid: {save_grid(result.images, len(args.images), out / 'grid.png')}")
    print(f"wrote {len(result.images)} variations to {out}")
    return 0
