"""`mmdiff demo`: the shipped model on held-out shapes (or, with --train, the whole path from scratch)."""

from __future__ import annotations

from pathlib import Path

from .sample import add_model_options, model_folder


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="the shipped model on held-out shapes: images, captions and a small sweep in outputs/"
    )
    demo.add_argument("--out", default="outputs")
    add_model_options(demo, required=False, default="the shipped assets/shapes_small")
    demo.add_argument("--no-sweep", action="store_true", help="skip the small guidance sweep")
    demo.add_argument("--train", action="store_true", help="instead: make data, train the tiny config, then sample")
    demo.add_argument("--work", default="runs/demo", help="--train: where data, checkpoints and logs go")
    demo.add_argument("--minutes", type=float, default=6.0, help="--train: cap on DiT training time (800 steps)")
    demo.add_argument("--num-images", type=int, default=20000, help="--train: shapes images to write")


def run(args) -> int:
    from ..demo import run_demo, run_shipped_demo

    if args.train:
        run_demo(Path(args.out), Path(args.work), args.minutes, args.num_images)
    else:
        run_shipped_demo(Path(args.out), model_folder(args), sweep=not args.no_sweep)
    return 0
