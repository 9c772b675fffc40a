"""The `mmdiff` command line: data, train, generate, caption, sample-pairs, vary, demo, bench, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="write webdataset shards").add_subparsers(dest="data_cmd", required=True)
    shapes = data.add_parser("shapes", help="generate the built-in shapes dataset (train/ and val/ shards)")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--num", type=int, default=20000, help="total images, train + val")
    shapes.add_argument("--image-size", type=int, default=32)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--val-fraction", type=float, default=0.1)
    shapes.add_argument("--shard-size", type=int, default=1000)
    folder = data.add_parser("folder", help="convert a folder of images with same-named .txt captions to shards")
    folder.add_argument("--src", required=True)
    folder.add_argument("--out", required=True)
    folder.add_argument("--shard-size", type=int, default=1000)
    latents = data.add_parser("latents", help="encode image shards once into VAE-latent shards (data.latent_shards)")
    latents.add_argument("--shards", required=True, help="image shards: a folder, brace pattern, glob or comma list")
    latents.add_argument("--vae", required=True, help="the training VAE: an AutoencoderKL folder, or one with vae/")
    latents.add_argument("--out", required=True)
    latents.add_argument("--image-size", type=int, default=32, help="the training data.image_size")
    latents.add_argument("--batch-size", type=int, default=64)
    latents.add_argument("--shard-size", type=int, default=None, help="records per shard (default: one per input)")
    latents.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage type")
    latents.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")


def _add_pipeline_options(parser, default_out: str, scheduler: bool = True) -> None:
    """Options every sampling subcommand shares: the folder, device, dtype, seed, output and progress bar."""
    parser.add_argument("--model", required=True, help="a saved pipeline folder")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (pays off on many calls)")
    if scheduler:
        parser.add_argument("--scheduler", default=None, help="ddpm | ddim | dpm++ | euler | euler_a | unipc")


def _add_sampling(sub) -> None:
    gen = sub.add_parser("generate", help="text -> image with a saved pipeline folder")
    _add_pipeline_options(gen, "outputs/generate")
    gen.add_argument("--prompt", action="append", default=[], help="repeatable; '' samples unconditionally")
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--negative-prompt", help="replaces the null context as the unguided branch")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=3.0, help="w; 1 = no guidance")
    gen.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="phi in [0, 1]")
    gen.add_argument("--num-images-per-prompt", type=int, default=1)
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's resolution)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--grid", action="store_true", help="also write one image grid (prompts x samples)")

    cap = sub.add_parser("caption", help="image -> text with a saved pipeline folder")
    _add_pipeline_options(cap, "outputs/captions.json", scheduler=False)
    cap.add_argument("images", nargs="*", help="image files")
    cap.add_argument("--shards", help="caption the first --num images of these shards instead")
    cap.add_argument("--num", type=int, default=16)
    cap.add_argument("--unconditional", type=int, default=0, metavar="N", help="N captions from p(text), no image")
    cap.add_argument("--prompt", help="a fixed caption prefix, e.g. 'a small red'")
    cap.add_argument("--template", help="a caption with the tokenizer's mask token (e.g. [MASK]) at each blank")
    cap.add_argument("--steps", type=int, default=None, help="unmasking steps (default: one per token)")
    cap.add_argument("--guidance-scale", type=float, default=2.0, help="w on logits; 1 = no guidance")
    cap.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LOW", "T_HIGH"))
    cap.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    cap.add_argument("--temperature", type=float, default=0.0, help="0 = argmax")
    cap.add_argument("--max-length", type=int, default=None, help="caption tokens (default: the model's)")
    cap.add_argument("--tokens", action="store_true", help="also write token ids and per-token confidences")

    pairs = sub.add_parser(
        "sample-pairs", help="joint image-caption samples: caption ~ p(text), image ~ p(image|caption)"
    )
    _add_pipeline_options(pairs, "outputs/pairs")
    pairs.add_argument("--num", type=int, default=8)
    pairs.add_argument("--caption-steps", type=int, default=None)
    pairs.add_argument("--steps", type=int, default=50, help="image denoising steps")
    pairs.add_argument("--guidance-scale", type=float, default=3.0)
    pairs.add_argument("--temperature", type=float, default=1.0, help="caption sampling temperature")

    vary = sub.add_parser("vary", help="image variation: caption each image, then generate from the caption")
    _add_pipeline_options(vary, "outputs/variations")
    vary.add_argument("images", nargs="*", help="image files")
    vary.add_argument("--num-variations", type=int, default=4)
    vary.add_argument("--caption-guidance-scale", type=float, default=2.0)
    vary.add_argument("--steps", type=int, default=50)
    vary.add_argument("--guidance-scale", type=float, default=3.0)
    vary.add_argument("--grid", action="store_true", help="also write one grid (images x variations)")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its errors as the one `mmdiff CMD: error: ...` line every other error gets (argparse prints
    the whole usage first); subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="mmdiff", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_data(sub)
    train = sub.add_parser("train", help="train the shared DiT (and the tokenizer / tiny VAE stages first)")
    train.add_argument("config", help="a YAML config, e.g. configs/shapes_tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    _add_sampling(sub)
    demo = sub.add_parser(
        "demo", help="the shipped model on held-out shapes: images, captions and a small sweep in outputs/"
    )
    demo.add_argument("--out", default="outputs")
    demo.add_argument("--model", default=None, help="a pipeline folder (default: the shipped assets/shapes_small)")
    demo.add_argument("--no-sweep", action="store_true", help="skip the small guidance sweep")
    demo.add_argument("--train", action="store_true", help="instead: make data, train the tiny config, then sample")
    demo.add_argument("--work", default="runs/demo", help="--train: where data, checkpoints and logs go")
    demo.add_argument("--minutes", type=float, default=6.0, help="--train: cap on DiT training time (800 steps)")
    demo.add_argument("--num-images", type=int, default=20000, help="--train: shapes images to write")
    _add_bench(sub)
    from .eval.commands import add_eval_parsers

    add_eval_parsers(sub)
    from .serve.command import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark against diffusers' PixArt at matched size (train, sample, caption)")
    bench.add_argument("--preset", default="cpu-small", choices=["cpu-small", "gpu-b2"])
    bench.add_argument("--out", default="bench.json", help="the JSON report")
    bench.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default: the preset's)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed runs per contender first")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    bench.add_argument("--device", default=None, help="override the preset's device (cpu | cuda | cuda:1)")
    bench.add_argument("--compile", action="store_true", help="torch.compile both contenders' transformers")
    bench.add_argument("--quick", action="store_true", help="a seconds-long smoke run with a tiny model (CI)")
    bench.add_argument(
        "--sections", nargs="+", choices=["train", "sample", "caption", "scaling"], help="default: all four"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad argument (2, its line already printed): a status, not a raise
        return done.code if isinstance(done.code, int) else 2
    try:
        if args.cmd == "data":
            return _data(args)
        if args.cmd == "train":
            from .config import load_config
            from .training.trainer import train

            summary = train(load_config(args.config, args.overrides), resume=args.resume)
            print(json.dumps(summary, indent=1))
            return 0
        if args.cmd == "generate":
            from .sampling import generate_command

            return generate_command(args)
        if args.cmd == "caption":
            from .sampling import caption_command

            return caption_command(args)
        if args.cmd in ("sample-pairs", "vary"):
            from .sampling import sample_pairs_command, vary_command

            return (sample_pairs_command if args.cmd == "sample-pairs" else vary_command)(args)
        if args.cmd == "bench":
            from .bench.run import bench_command

            return bench_command(args)
        if args.cmd in ("eval", "sweep", "eval-encoder", "plot"):
            from .eval.commands import run_eval_command

            return run_eval_command(args)
        if args.cmd == "serve":
            from .serve.command import run

            return run(args)
        if args.cmd == "demo":
            from .demo import run_demo, run_shipped_demo

            if args.train:
                run_demo(Path(args.out), Path(args.work), args.minutes, args.num_images)
            else:
                run_shipped_demo(Path(args.out), args.model, sweep=not args.no_sweep)
            return 0
    # OSError beyond FileNotFoundError too: an --out under a file, a folder given as a file, no permission
    except (ValueError, OSError, TypeError) as err:
        command = f"{args.cmd} {args.data_cmd}" if args.cmd == "data" else args.cmd  # as argparse names it
        print(f"mmdiff {command}: error: {err}", file=sys.stderr)
        return 2
    return 1


def _data(args) -> int:
    if args.data_cmd == "shapes":
        from .data.shapes import write_shapes_shards

        stats = write_shapes_shards(args.out, args.num, args.image_size, args.seed, args.val_fraction, args.shard_size)
    elif args.data_cmd == "latents":
        from .data.latents import encode_shards_to_latents

        stats = encode_shards_to_latents(
            args.shards, args.vae, args.out, args.image_size, args.batch_size, args.shard_size, args.device, args.dtype
        )
    else:
        from .data.folder import convert_folder

        stats = convert_folder(args.src, args.out, shard_size=args.shard_size)
    print(json.dumps(stats, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
