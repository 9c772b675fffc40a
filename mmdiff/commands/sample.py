"""`mmdiff generate`, `caption`, `sample-pairs` and `vary`: the pipelines from the command line, writing PNGs, grids
and JSON. Unset sampling options take the pipeline folder's saved sample settings (`MMDiffPipelineBase.sample_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import torch

from ..checks import check_seed, check_text, open_image_file
from ..eval.plots import save_grid

MODEL_HELP = "a saved pipeline folder or a hub id (org/name)"


def add_model_options(parser, required: bool = True, default: str | None = None) -> None:
    """--model (a pipeline folder or a hub id) and --revision (which revision of a hub id)."""
    help_text = MODEL_HELP + (f" (default: {default})" if default else "")
    parser.add_argument("--model", required=required, default=None, help=help_text)
    parser.add_argument(
        "--revision", default=None, help="with a hub id for --model: a branch, tag or commit hash (default: main)"
    )


def model_folder(args, option: str = "model") -> Path | None:
    """The folder of --model (or another option naming a pipeline), a hub id fetched into the Hugging Face cache at
    --revision (`mmdiff.hub.resolve_pretrained`); None when the option is unset. A folder that does not exist is
    returned as it is, and the loader names it."""
    from ..hub import resolve_pretrained

    name = getattr(args, option, None)
    if name is None:
        return None
    revision = getattr(args, "revision", None) if option == "model" else None
    if revision and Path(name).expanduser().exists():
        raise ValueError(f"--revision {revision} applies to a hub id; --model {name} is a local folder")
    return resolve_pretrained(name, revision=revision, what=f"--{option.replace('_', '-')}")


def load_pipe(cls, args):
    """The command's pipeline (`load_pipeline` with --model at --revision, --device, --dtype, --scheduler,
    --compile, --quiet) and a generator seeded with --seed."""
    from ..pipelines.factory import load_pipeline, pick_device

    check_seed("--seed", args.seed)
    pipe = load_pipeline(
        model_folder(args),
        cls,
        device=args.device,
        dtype=args.dtype,
        scheduler=getattr(args, "scheduler", None),
        compile=getattr(args, "compile", False),
        progress=not getattr(args, "quiet", False),
    )
    return pipe, torch.Generator(pick_device(args.device)).manual_seed(args.seed)


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
    from ..pipelines import MMDiffTextToImagePipeline

    check_out(args.out, folder=True)
    prompts = [check_text("--prompt", prompt) for prompt in args.prompt]
    if args.negative_prompt is not None:
        check_text("--negative-prompt", args.negative_prompt)
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
    (out / "prompts.json").write_text(
        json.dumps(records, indent=1)
    )  # the prompts alone, for tools that read them without the images
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
    from ..pipelines import MMDiffImageToTextPipeline, infill_caption

    check_out(args.out, folder=False)
    for option, text in (("--prompt", args.prompt), ("--template", args.template)):
        if text is not None:
            check_text(option, text)
    if args.prompt and args.template:
        raise ValueError("give either --prompt (a fixed prefix) or --template (blanks marked with the mask token)")
    if args.unconditional < 0 or (args.unconditional and (args.images or args.shards)):
        raise ValueError("--unconditional N takes N >= 1 and no image files or --shards: captions from p(text) alone")
    if args.shards and args.num < 1:
        raise ValueError(f"--num must be >= 1 (images to caption from --shards), got {args.num}")
    images, names = [], []
    if args.shards:
        from ..data.shards import expand_urls, iterate_records

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
        **sampler_settings(args),
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
    from ..pipelines import MMDiffTextToImagePipeline, sample_pairs

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
    from ..pipelines import MMDiffTextToImagePipeline, vary_image

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


def _add_pipeline_options(parser, default_out: str, scheduler: bool = True) -> None:
    """Options every sampling subcommand shares: the model, device, dtype, seed, output and progress bar."""
    add_model_options(parser)
    parser.add_argument("--out", default=default_out)
    add_seed_and_device(parser)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (pays off on many calls)")
    if scheduler:
        add_scheduler_option(parser)


def add_seed_and_device(parser, batch_size: int | None = None) -> None:
    """--seed (default 0), --device and, when given a default, --batch-size: the options every command that samples
    shares, defined once."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size)


def add_scheduler_option(parser) -> None:
    """--scheduler: a diffusers image scheduler by name (unset: the folder's)."""
    parser.add_argument(
        "--scheduler",
        default=None,
        help="ddpm | ddim | dpm++ | euler | euler_a | unipc (flow models: flow_euler | dpm++ | unipc)",
    )


def add_folder_default(parser, flag: str, kind: type, what: str) -> None:
    """An option that, left out, takes the pipeline folder's saved sample setting (`pipe.sample_config`)."""
    where = "(default: the folder's saved sample settings)"
    parser.add_argument(flag, type=kind, default=None, help=f"{what} {where}" if what else where)


def add_sampler_options(parser) -> None:
    """The caption sampler's options (unset: the folder's text scheduler config)."""
    from ..diffusion.masked import SAMPLERS

    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="which positions each step unmasks")
    parser.add_argument("--threshold", type=float, default=None, help="--sampler threshold: confidence tau in (0, 1]")
    parser.add_argument("--entropy-bound", type=float, default=None, help="--sampler entropy: gamma in nats (> 0)")
    parser.add_argument("--block-length", type=int, default=None, help="decode left to right in blocks of N tokens")
    parser.add_argument(
        "--remask-fraction", type=float, default=None, help="ReMDM: remask this fraction of committed tokens, [0, 1)"
    )
    parser.add_argument(
        "--remask-window", type=float, nargs=2, default=None, metavar=("T_LOW", "T_HIGH"), help="levels that remask"
    )


def sampler_settings(args) -> dict:
    """The caption sampler options given on the command line, as pipeline keyword arguments."""
    names = ("sampler", "threshold", "entropy_bound", "block_length", "remask_fraction", "remask_window")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="text -> image with a saved pipeline folder or hub id")
    _add_pipeline_options(gen, "outputs/generate")
    gen.add_argument("--prompt", action="append", default=[], help="repeatable; '' samples unconditionally")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--negative-prompt", help="replaces the null context as the unguided branch")
    add_folder_default(gen, "--steps", int, "denoising steps")
    add_folder_default(gen, "--guidance-scale", float, "w; 1 = no guidance")
    gen.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="phi in [0, 1]")
    gen.add_argument("--num-images-per-prompt", type=int, default=1)
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's resolution)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--grid", action="store_true", help="also write one image grid (prompts x samples)")

    cap = sub.add_parser("caption", help="image -> text with a saved pipeline folder or hub id")
    _add_pipeline_options(cap, "outputs/captions.json", scheduler=False)
    cap.add_argument("images", nargs="*", help="image files")
    cap.add_argument("--shards", help="caption the first --num images of these shards instead")
    cap.add_argument("--num", type=int, default=16)
    cap.add_argument("--unconditional", type=int, default=0, metavar="N", help="N captions from p(text), no image")
    cap.add_argument("--prompt", help="a fixed caption prefix, e.g. 'a small red'")
    cap.add_argument("--template", help="a caption with the tokenizer's mask token (e.g. [MASK]) at each blank")
    add_folder_default(cap, "--steps", int, "unmasking steps")
    add_folder_default(cap, "--guidance-scale", float, "w on logits; 1 = no guidance")
    cap.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    cap.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    add_sampler_options(cap)
    cap.add_argument("--temperature", type=float, default=0.0, help="0 = argmax")
    cap.add_argument("--max-length", type=int, default=None, help="caption tokens (default: the model's)")
    cap.add_argument("--tokens", action="store_true", help="also write token ids and per-token confidences")

    pairs = sub.add_parser(
        "sample-pairs", help="joint image-caption samples: caption ~ p(text), image ~ p(image|caption)"
    )
    _add_pipeline_options(pairs, "outputs/pairs")
    pairs.add_argument("--num", type=int, default=8)
    pairs.add_argument("--caption-steps", type=int, default=None)
    add_folder_default(pairs, "--steps", int, "image denoising steps")
    add_folder_default(pairs, "--guidance-scale", float, "")
    pairs.add_argument("--temperature", type=float, default=1.0, help="caption sampling temperature")

    vary = sub.add_parser("vary", help="image variation: caption each image, then generate from the caption")
    _add_pipeline_options(vary, "outputs/variations")
    vary.add_argument("images", nargs="*", help="image files")
    vary.add_argument("--num-variations", type=int, default=4)
    add_folder_default(vary, "--caption-guidance-scale", float, "")
    add_folder_default(vary, "--steps", int, "image denoising steps")
    add_folder_default(vary, "--guidance-scale", float, "")
    vary.add_argument("--grid", action="store_true", help="also write one grid (images x variations)")


def run(args) -> int:
    handlers = {
        "generate": generate_command,
        "caption": caption_command,
        "sample-pairs": sample_pairs_command,
        "vary": vary_command,
    }
    return handlers[args.cmd](args)
