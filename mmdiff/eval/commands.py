"""Command-line front ends: `mmdiff eval`, `mmdiff sweep`, `mmdiff eval-encoder` and `mmdiff plot`.

`add_eval_parsers(sub)` adds the subcommands to mmdiff's parser; `run_eval_command(args)` runs one of them.
"""

from __future__ import annotations

import argparse
import json

EVAL_COMMANDS = ("eval", "sweep", "eval-encoder", "plot")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved pipeline folder")
    parser.add_argument("--shards", required=True, help="validation shards (folder, glob, brace range or list)")
    parser.add_argument(
        "--encoder",
        default=None,
        help="an `mmdiff eval-encoder` folder trained on your shards: the default feature space (on shapes: "
        "assets/eval_encoder_shapes)",
    )
    parser.add_argument("--clip", default=None, help="a local open_clip checkpoint (folder or file): CLIP score, FD")
    parser.add_argument("--inception", default=None, help="local InceptionV3 weights (FID as papers report it)")
    parser.add_argument("--steps", type=int, default=50, help="image denoising steps")
    parser.add_argument("--caption-steps", type=int, default=None, help="unmasking steps (default: one per token)")
    parser.add_argument("--nll-levels", type=int, default=8, help="random mask levels per caption for the NLL bound")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default=None, help="ddpm | ddim | dpm++ | euler | euler_a | unipc")
    parser.add_argument("--device", default=None, help="cpu | cuda ... (default: cuda when available)")


def add_eval_parsers(sub) -> None:
    """Add `eval`, `sweep`, `eval-encoder` and `plot` to an argparse subparsers object."""
    ev = sub.add_parser("eval", help="score a pipeline on any image-caption shards (both directions) -> JSON")
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

    from .encoder import add_eval_encoder_parser

    add_eval_encoder_parser(sub)
    plot = sub.add_parser("plot", help="a training run's losses and in-training evaluation against the step")
    plot.add_argument("run_dir", help="a `mmdiff train` output folder (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/training_plot.png)")


def run_eval_command(args) -> int:
    """Dispatch one of EVAL_COMMANDS; prints a short summary and returns the exit status."""
    if args.cmd == "plot":
        from .training_plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.out)}")
        return 0
    if args.cmd == "eval-encoder":
        from .encoder import eval_encoder_command

        return eval_encoder_command(args)
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
            encoder=args.encoder,
            clip=args.clip,
            inception=args.inception,
            diversity_prompts=args.diversity_prompts,
            diversity_samples=args.diversity_samples,
            nll_levels=args.nll_levels,
            scheduler=args.scheduler,
            device=args.device,
            out=args.out,
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
        encoder=args.encoder,
        clip=args.clip,
        inception=args.inception,
        nll_levels=args.nll_levels,
        grid_samples=args.grid_samples,
        scheduler=args.scheduler,
        device=args.device,
        out_dir=args.out,
    )
    for row in record["text_to_image"]:
        figures = [f"{k} {row[k]:.4g}" for k in ("fd", "clip_score", "r_precision", "prompt_accuracy") if k in row]
        print(f"w={row['guidance_scale']:g}: " + ", ".join(figures))
    for note in record["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}/{{grid.png, sweep.csv, captions.csv, sweep.json, sweep_plot.png}}")
    return 0
