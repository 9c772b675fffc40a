"""The speed-quality frontier of text -> image on held-out shapes: every way mmdiff has to spend fewer transformer
rows per image, measured on the same prompts and seeds (docs/performance.md, "The frontier").

    mmdiff data shapes --out data/shapes --num 60000 --seed 0      # the held-out prompts: data/shapes/val
    python scripts/frontier.py --shards data/shapes/val --num-prompts 512 \
        --few-step-model assets/shapes_meanflow --out assets/frontier/frontier.json

Contenders: the shipped v-prediction model with DDIM at 25 steps and DPM-Solver++ at 8 and 10, each with and
without the guidance interval (0.2, 0.8), and with diffusers' cache hooks (first-block cache 0.2, TaylorSeer every
2nd step) at DDIM 25; a flow-matching model (--flow-model) with UniPC at 8 and 25; the few-step MeanFlow model
(--few-step-model) at 1, 2 and 4 steps. A contender whose model is not given is listed as not run.

For each: prompt accuracy (the shapes reader, as `mmdiff eval` scores it), FD in the shapes eval encoder's space
against the same records' real images, the transformer rows each image took (the pipeline's count: conditional and
unconditional rows of every step, and the fraction of DiT blocks those rows ran: a cache hook skips some) and
images/s over the whole batch after a warm-up (one process, the threads torch
has; the timings are only comparable within one run). Caption accuracy (the shapes benchmark's exact score, the
model's own caption settings) is a property of the model, measured once per model on --num-captions images.
Writes the rows as JSON to --out and the plot beside it (accuracy against rows per image and against images/s).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from mmdiff.eval.benchmarks.shapes.frontier import plot, run_frontier
from mmdiff.eval.harness import versions
from mmdiff.paths import SHIPPED_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="data/shapes/val", help="held-out shapes shards")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--num-captions", type=int, default=128)
    parser.add_argument("--model", default=SHIPPED_MODEL, help="the v-prediction model (default: the shipped one)")
    parser.add_argument("--flow-model", help="a flow-matching shapes model (e.g. a run of configs/shapes_flow.yaml)")
    parser.add_argument("--few-step-model", help="a MeanFlow shapes model (e.g. assets/shapes_meanflow)")
    parser.add_argument("--only", nargs="*", help="labels of the contenders to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    models = {"shipped": args.model, "flow": args.flow_model, "few-step": args.few_step_model}
    rows, prompts = run_frontier(models, args.shards, args.num_prompts, args.num_captions, args.only, args.batch_size)
    record = {
        "date": date.today().isoformat(),
        "command": shlex.join(["python", "scripts/frontier.py", *sys.argv[1:]]),
        "shards": args.shards,
        "num_prompts": args.num_prompts,
        "num_captions": args.num_captions,
        "models": models,
        "device": "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads",
        "versions": versions(),
        "rows": rows,
        "prompts": prompts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
