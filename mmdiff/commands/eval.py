"""`mmdiff eval`, `sweep`, `eval-samplers`, `eval-encoder` and `plot`: evaluation on any shards.

`add_parser(sub)` adds the subcommands to mmdiff's parser; `run(args)` runs one of them.
"""

from __future__ import annotations

import argparse
import json

from ..checks import check_seed
from ..diffusion.guidance import GUIDANCE_METHODS
from ..eval.features.contrastive_training import DEFAULT_STEPS
from .sample import (
    add_folder_default,
    add_model_options,
    add_sampler_options,
    add_scheduler_option,
    add_seed_and_device,
    model_folder,
    sampler_settings,
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--shards", required=True, help="validation shards (folder, glob, brace range or list)")
    parser.add_argument(
        "--encoder",
        default=None,
        help="an `mmdiff eval-encoder` folder trained on your shards, or a hub id (org/name): the default feature "
        "space (on shapes: assets/eval_encoder_shapes)",
    )
    parser.add_argument(
        "--clip", default=None, help="an open_clip checkpoint (folder or file) or a hub id (org/name): CLIP score, FD"
    )
    parser.add_argument(
        "--inception", default=None, help="InceptionV3 weights (a file, or a hub id): FID as papers report it"
    )
    add_folder_default(parser, "--steps", int, "image denoising steps")
    add_folder_default(parser, "--caption-steps", int, "unmasking steps")
    parser.add_argument("--nll-levels", type=int, default=8, help="random mask levels per caption for the NLL bound")
    add_seed_and_device(parser, batch_size=64)
    add_scheduler_option(parser)
    add_sampler_options(parser)


def add_parser(sub) -> None:
    """Add `eval`, `sweep`, `eval-samplers`, `eval-encoder` and `plot` to an argparse subparsers object."""
    ev = sub.add_parser("eval", help="score a pipeline on any image-caption shards (both directions) -> JSON")
    _add_common(ev)
    ev.add_argument("--num-images", type=int, default=500)
    ev.add_argument("--num-captions", type=int, default=500)
    add_folder_default(ev, "--guidance-scale", float, "text->image w; 1 = no guidance")
    add_folder_default(ev, "--caption-guidance-scale", float, "image->text w on logits")
    ev.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    ev.add_argument("--diversity-prompts", type=int, default=8)
    ev.add_argument("--diversity-samples", type=int, default=16)
    ev.add_argument("--out", default="outputs/eval.json")

    sw = sub.add_parser("sweep", help="metrics, image grid and plot against the guidance scale")
    _add_common(sw)
    sw.add_argument("--scales", type=float, nargs="+", default=[1, 1.5, 2, 3, 4, 6, 8])
    sw.add_argument("--caption-scales", type=float, nargs="+", default=[1, 1.5, 2, 3, 4])
    sw.add_argument("--num-prompts", type=int, default=8)
    sw.add_argument("--images-per-prompt", type=int, default=4)
    sw.add_argument("--num-captions", type=int, default=64)
    sw.add_argument("--interval", type=float, nargs=2, default=[0.2, 0.8], metavar=("T_LOW", "T_HIGH"))
    sw.add_argument("--no-interval", action="store_true", help="skip the guidance-interval comparison")
    sw.add_argument("--grid-samples", type=int, default=2, help="samples per grid cell")
    sw.add_argument("--out", default="outputs/sweep")
    sw.add_argument(
        "--guidance-methods",
        nargs="+",
        default=["cfg"],
        choices=list(GUIDANCE_METHODS),
        help="compare guidance methods at every scale (same prompts and seeds): methods.csv, _grid.png, _plot.png",
    )
    sw.add_argument(
        "--weak-model", default=None, help="autoguidance: a weaker checkpoint's pipeline folder or hub id (org/name)"
    )
    sw.set_defaults(nll_levels=4)

    _add_eval_encoder_parser(sub)
    samplers = sub.add_parser(
        "eval-samplers",
        help="caption samplers compared: caption scores against transformer rows and captions/s (table and plot)",
    )
    add_model_options(samplers)
    samplers.add_argument("--shards", required=True, help="held-out shards (folder, glob, brace range or list)")
    samplers.add_argument("--num", type=int, default=512, help="images to caption with every setting")
    samplers.add_argument("--guidance-scale", type=float, default=None, help="caption w (default: the folder's)")
    add_seed_and_device(samplers, batch_size=64)
    samplers.add_argument("--out", default="outputs/samplers")
    plot = sub.add_parser("plot", help="a training run's losses and in-training evaluation against the step")
    plot.add_argument("run_dir", help="a `mmdiff train` output folder (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/training_plot.png)")


def run(args) -> int:
    """Run one of the commands `add_parser` adds; prints a short summary and returns the exit status."""
    if args.cmd == "plot":
        from ..eval.training_plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.out)}")
        return 0
    check_seed("--seed", args.seed, 2**63 - 1)  # image i draws seed + i (and diversity samples seed + 10**6 + ...)
    if args.cmd == "eval-samplers":
        from ..eval.samplers import accuracy_key, compare_caption_samplers

        if args.num < 2 or args.batch_size < 1:
            raise ValueError(f"--num must be >= 2 and --batch-size >= 1, got {args.num} and {args.batch_size}")
        record = compare_caption_samplers(
            model_folder(args), args.shards, args.num, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
            seed=args.seed, device=args.device, out_dir=args.out,
        )  # fmt: skip
        key = accuracy_key(record["settings"][0])
        for row in record["settings"]:
            print(
                f"{row['setting']:30s} {key} {row[key]:.3f}  rows/caption {row['rows_per_caption']:6.1f}  "
                f"captions/s {row['captions_per_s']:7.1f}"
            )
        print(f"wrote {args.out}/{{samplers.json, samplers.csv, samplers_plot.png}}")
        return 0
    if args.cmd == "eval-encoder":
        return _eval_encoder_command(args)
    if args.cmd == "eval":
        from ..eval.run import evaluate

        result = evaluate(
            model_folder(args),
            args.shards,
            num_images=args.num_images,
            num_captions=args.num_captions,
            guidance_scale=args.guidance_scale,
            caption_guidance_scale=args.caption_guidance_scale,
            num_inference_steps=args.steps,
            caption_steps=args.caption_steps,
            guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
            seed=args.seed,
            batch_size=args.batch_size,
            encoder=args.encoder,
            clip=args.clip,
            inception=args.inception,
            diversity_prompts=args.diversity_prompts,
            diversity_samples=args.diversity_samples,
            nll_levels=args.nll_levels,
            scheduler=args.scheduler,
            device=args.device,
            out=args.out,
            caption_sampler=sampler_settings(args),
        )
        t2i, i2t = result["text_to_image"], result["image_to_text"]
        summary = {"feature_space": t2i.get("feature_space")}
        summary |= {f"t2i_{k}": t2i.get(k) for k in ("fd", "fd_real_floor", "kid", "precision", "recall")}
        summary |= {f"t2i_{k}": t2i.get(k) for k in ("clip_score", "r_precision", "prompt_accuracy")}
        summary |= {f"i2t_{k}": i2t.get(k) for k in ("bleu4", "cider_d", "rouge_l", "clip_score", "all")}
        summary |= {f"i2t_{k}": i2t.get(k) for k in ("nll_image_bits", "nll_null_bits")}
        summary = {k: v for k, v in summary.items() if v is not None}
        print(json.dumps(summary, indent=1))
        for note in result["notes"]:
            print(f"note: {note}")
        print(f"wrote {args.out}")
        return 0
    from ..eval.sweep import sweep

    record = sweep(
        model_folder(args),
        args.shards,
        scales=args.scales,
        caption_scales=args.caption_scales,
        num_prompts=args.num_prompts,
        images_per_prompt=args.images_per_prompt,
        num_captions=args.num_captions,
        num_inference_steps=args.steps,
        caption_steps=args.caption_steps,
        guidance_interval=None if args.no_interval else tuple(args.interval),
        seed=args.seed,
        batch_size=args.batch_size,
        encoder=args.encoder,
        clip=args.clip,
        inception=args.inception,
        nll_levels=args.nll_levels,
        grid_samples=args.grid_samples,
        scheduler=args.scheduler,
        device=args.device,
        out_dir=args.out,
        caption_sampler=sampler_settings(args),
        guidance_methods=args.guidance_methods,
        weak_model=model_folder(args, "weak_model"),
    )
    for row in record["text_to_image"]:
        figures = [f"{k} {row[k]:.4g}" for k in ("fd", "clip_score", "r_precision", "prompt_accuracy") if k in row]
        print(f"w={row['guidance_scale']:g}: " + ", ".join(figures))
    for note in record["notes"]:
        print(f"note: {note}")
    for method, rows in record["guidance_methods"].items():
        for row in rows:
            figures = [f"{k} {row[k]:.4g}" for k in ("fd", "prompt_accuracy", "diversity") if k in row]
            print(f"{method} w={row['guidance_scale']:g}: " + ", ".join(figures))
    extra = ", methods.csv, methods_grid.png, methods_plot.png" if record["guidance_methods"] else ""
    print(f"wrote {args.out}/{{grid.png, sweep.csv, captions.csv, sweep.json, sweep_plot.png{extra}}}")
    return 0


def _add_eval_encoder_parser(sub) -> None:
    """Add `mmdiff eval-encoder` to an argparse subparsers object."""
    p = sub.add_parser(
        "eval-encoder",
        help="train the contrastive image-text encoder of `eval` / `sweep` (FD, KID, CLIP score, R-precision) on "
        "your shards",
    )
    p.add_argument("--shards", required=True, help="training shards (folder, glob, brace range or list)")
    p.add_argument("--val-shards", required=True, help="held-out shards: the retrieval accuracy is measured on them")
    p.add_argument("--out", required=True, help="folder for the encoder (safetensors, tokenizer/, training.json)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=None, help="default: the first training image's shorter side")
    p.add_argument("--lr", type=float, default=2e-3)
    add_seed_and_device(p)
    p.add_argument("--max-records", type=int, default=None, help="read at most this many training records")
    p.add_argument("--max-val-records", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=0, help="also measure retrieval every N steps (0: at the end)")


def _eval_encoder_command(args) -> int:
    """Run `mmdiff eval-encoder`: train, print the held-out retrieval accuracy and where the encoder is."""
    from ..eval.features.contrastive_training import train_eval_encoder

    record = train_eval_encoder(
        args.shards,
        args.val_shards,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        image_size=args.image_size,
        lr=args.lr,
        seed=args.seed,
        max_records=args.max_records,
        max_val_records=args.max_val_records,
        eval_every=args.eval_every,
        device=args.device,
    )
    r, full = record["retrieval"], record["retrieval"]["full_gallery"]
    print(
        f"trained on {record['train_data']['num_records']} records at {record['image_size']} px for "
        f"{record['steps']} steps ({record['train_seconds']} s), final loss {record['final_loss']}"
    )
    print(
        f"held-out retrieval top-1 over {r['num_galleries']} galleries of R = {r['gallery_size']} (chance "
        f"{r['chance']:.3f}): image->text {r['image_to_text_top1']:.3f}, text->image {r['text_to_image_top1']:.3f}; "
        f"over all {full['size']} pairs: {full['image_to_text_top1']:.3f}, {full['text_to_image_top1']:.3f}"
    )
    print(f"wrote {args.out} (vocabulary {record['vocabulary']['size']} words)")
    return 0
