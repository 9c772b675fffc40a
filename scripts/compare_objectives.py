"""Flow matching against v-prediction on shapes: prompt accuracy and FD against sampling steps, per scheduler.

    python scripts/compare_objectives.py --models runs/shapes_v/pipeline runs/shapes_flow/pipeline \
        --shards data/shapes/val --out assets/objectives

Each model samples the same 512 held-out prompts with the same seeds at w = 2 with every scheduler of its family
(`mmdiff.pipelines.schedulers`) at 4, 8, 16 and 25 steps; captions (which do not depend on the image sampler) are
scored once per model. Writes objectives.json and objectives_plot.png (accuracy and FD against steps, the best
scheduler of each family marked). The models are the two runs of configs/shapes_flow.yaml (README, "Flow matching").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmdiff.eval.benchmarks import find_benchmark
from mmdiff.eval.caption_metrics import generate_captions
from mmdiff.eval.features.spaces import resolve_encoders
from mmdiff.eval.generic import image_space_metrics
from mmdiff.eval.records import load_eval_records
from mmdiff.eval.run import generate_images
from mmdiff.pipelines import swap_scheduler
from mmdiff.pipelines.factory import load_pipeline
from mmdiff.pipelines.schedulers import scheduler_names

STEPS = (4, 8, 16, 25)


def measure(model: str, records, spaces, benchmark, num: int, scale: float, seed: int, steps_list) -> dict:
    pipe = load_pipeline(model, device="cpu", progress=False)
    family = pipe.objective_family
    prompts = records.prompts[:num]
    rows = []
    for name in scheduler_names(family):
        if name in ("ddpm", "euler_a"):  # stochastic samplers: not what a few-step comparison is about
            continue
        swap_scheduler(pipe, name)
        for steps in steps_list:
            t0 = time.time()
            images = generate_images(pipe, prompts, scale, steps, seed, 128)
            row = {"scheduler": name, "steps": steps, "seconds": round(time.time() - t0, 1)}
            row |= {
                k: v
                for k, v in benchmark.image_metrics(images, prompts, pipe.image_size, seed).items()
                if isinstance(v, int | float)
            }
            fd = image_space_metrics(spaces["eval_encoder"], images, records.images[:num], prompts, seed=seed)
            row["fd"] = fd["fd"]
            rows.append(row)
            print(model, family, name, steps, f"accuracy {row['prompt_accuracy']:.3f} fd {row['fd']:.1f}", flush=True)
    captions = generate_captions(pipe, records.images[:num], 2.0, None, 128, seed)
    caption_scores = {
        k: v for k, v in benchmark.caption_metrics(captions, records.head(num)).items() if isinstance(v, int | float)
    }
    return {"model": model, "family": family, "rows": rows, "captions": caption_scores}


def plot(results: list[dict], path: Path, steps_list) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    for i, (key, label) in enumerate((("prompt_accuracy", "prompt accuracy"), ("fd", "FD (eval encoder)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for result in results:
            for name in dict.fromkeys(r["scheduler"] for r in result["rows"]):
                rows = [r for r in result["rows"] if r["scheduler"] == name]
                ax.plot(
                    [r["steps"] for r in rows], [r[key] for r in rows], marker="o", label=f"{result['family']} / {name}"
                )
        ax.set_xscale("log")
        ax.set_xticks(list(steps_list), labels=[str(s) for s in steps_list])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("sampling steps")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--out", default="assets/objectives")
    args = parser.parse_args()
    torch.set_num_threads(2)
    records = load_eval_records(args.shards, args.num)
    benchmark = find_benchmark(records)
    spaces, _ = resolve_encoders(None, None, None, benchmark, "cpu", 32, records.images, records.prompts)
    results = [
        measure(m, records, spaces, benchmark, args.num, args.guidance_scale, args.seed, args.steps)
        for m in args.models
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "objectives.json").write_text(json.dumps({"command": vars(args), "results": results}, indent=1))
    plot(results, out / "objectives_plot.png", args.steps)
    print(f"wrote {out}/objectives.json, objectives_plot.png")


if __name__ == "__main__":
    main()
