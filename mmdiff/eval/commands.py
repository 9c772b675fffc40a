"""Command-line front ends: `mmdiff eval`, `mmdiff sweep` and `mmdiff eval-classifier`.

`add_eval_parsers(sub)` adds the three subcommands to mmdiff's parser; `run_eval_command(args)` runs one of them.
"""

from __future__ import annotations

import argparse
import json

EVAL_COMMANDS = ("eval", "sweep", "eval-classifier")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved pipeline folder")
    parser.add_argument("--shards", required=True, help="validation shards (folder, glob, brace range or list)")
    parser.add_argument(
        "--classifier", default=None, help="FD feature classifier folder (default: assets/eval_classifier)"
    )
    parser.add_argument("--steps", type=int, default=50, help="image denoising steps")
    parser.add_argument("--caption-steps", type=int, default=None, help="unmasking steps (default: one per token)")
    parser.add_argument("--nll-levels", type=int, default=8, help="random mask levels per caption for the NLL bound")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default=None, help="ddpm | ddim | dpm++ | euler | euler_a | unipc")
    parser.add_argument("--device", default=None, help="cpu | cuda ... (default: cuda when available)")


def add_eval_parsers(sub) -> None:
    """Add `eval`, `sweep` and `eval-classifier` to an argparse subparsers object."""
    ev = sub.add_parser("eval", help="score a pipeline on the shapes benchmark (both directions) -> JSON")
    _add_common(ev)
    ev.add_argument("--num-images", type=int, default=500)
    ev.add_argument("--num-captions", type=int, default=500)
    ev.add_argument("--guidance-scale", type=float, default=3.0, help="text->image w; 1 = no guidance")
    ev.add_argument("--caption-guidance-scale", type=float, default=2.0, help="image->text w on logits")
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
    sw.set_defaults(nll_levels=4)

    cls = sub.add_parser("eval-classifier", help="train the small CNN whose features define the FD")
    cls.add_argument("--shards", default=None, help="training shards (default: freshly rendered scenes)")
    cls.add_argument("--val-shards", default=None)
    cls.add_argument("--out", required=True, help="folder for config.json + safetensors + training.json")
    cls.add_argument("--steps", type=int, default=1500)
    cls.add_argument("--batch-size", type=int, default=128)
    cls.add_argument("--lr", type=float, default=2e-3)
    cls.add_argument("--image-size", type=int, default=32)
    cls.add_argument("--max-images", type=int, default=None)
    cls.add_argument("--num-rendered", type=int, default=4000, help="scenes to render when no --shards")
    cls.add_argument("--seed", type=int, default=0)
    cls.add_argument("--device", default=None)


def run_eval_command(args) -> int:
    """Dispatch one of EVAL_COMMANDS; prints a short summary and returns the exit status."""
    if args.cmd == "eval-classifier":
        from .features import train_feature_classifier

        record = train_feature_classifier(
            args.out,
            args.shards,
            args.val_shards,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            image_size=args.image_size,
            max_images=args.max_images,
            num_rendered=args.num_rendered,
            seed=args.seed,
            device=args.device,
        )
        print(json.dumps(record, indent=1))
        return 0
    if args.cmd == "eval":
        from .run import evaluate

        result = evaluate(
            args.model,
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
            classifier=args.classifier,
            diversity_prompts=args.diversity_prompts,
            diversity_samples=args.diversity_samples,
            nll_levels=args.nll_levels,
            scheduler=args.scheduler,
            device=args.device,
            out=args.out,
        )
        t2i, i2t = result["text_to_image"], result["image_to_text"]
        summary = {
            "prompt_accuracy": t2i["prompt_accuracy"],
            "fd": t2i["fd"],
            "diversity_ratio": t2i.get("diversity_ratio"),
            "caption_all_attributes": i2t["all"],
            "caption_exact_match": i2t["exact_match"],
            "nll_image_bits": i2t["nll_image_bits"],
            "nll_null_bits": i2t["nll_null_bits"],
        }
        print(json.dumps(summary, indent=1))
        print(f"wrote {args.out}")
        return 0
    from .sweep import sweep

    record = sweep(
        args.model,
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
        classifier=args.classifier,
        nll_levels=args.nll_levels,
        grid_samples=args.grid_samples,
        scheduler=args.scheduler,
        device=args.device,
        out_dir=args.out,
    )
    for row in record["text_to_image"]:
        print(f"w={row['guidance_scale']:g}: prompt accuracy {row['prompt_accuracy']:.3f}, fd {row['fd']:.3f}")
    print(f"wrote {args.out}/{{grid.png, sweep.csv, captions.csv, sweep.json, sweep_plot.png}}")
    return 0
