"""`mmdiff train CONFIG [overrides] [--resume]`: the stages, then the shared DiT."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train the shared DiT (and the tokenizer / tiny VAE stages first)")
    train.add_argument("config", help="a YAML config, e.g. configs/shapes_tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")


def run(args) -> int:
    from ..config import load_config
    from ..eval.in_training import TrainingEvalHooks
    from ..training.trainer import train

    summary = train(load_config(args.config, args.overrides), resume=args.resume, hooks=TrainingEvalHooks())
    print(json.dumps(summary, indent=1))
    return 0
