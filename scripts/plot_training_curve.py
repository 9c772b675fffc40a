"""Prompt accuracy against training steps, flow matching against v-prediction (README, "Flow matching").

Reads the eval records: the flow run continued past 2000 steps (`assets/objectives/flow_continued/eval_step*.json`,
each written by the `mmdiff eval` command it records), the 2000-step comparison (`assets/objectives/objectives.json`)
and the shipped v-prediction model (`assets/shapes_small_training/eval_small.json`, step 14 000). The shipped run's
steps 6 000 and 12 000 have no record file; their figures are the ones README "The shipped model" reports from the
same eval command (w = 2, 25 DDIM steps, 512 prompts).

    python scripts/plot_training_curve.py            # writes assets/objectives/training_curve.png
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_RUN_WITHOUT_RECORDS = {6000: 0.885, 12000: 0.953}  # README, "The shipped model"


def best_at(results: dict, family: str, steps: int) -> float:
    rows = [r for m in results["results"] if m["family"] == family for r in m["rows"] if r["steps"] == steps]
    return max(r["prompt_accuracy"] for r in rows)


def main() -> None:
    comparison = json.loads((ROOT / "objectives" / "objectives.json").read_text())
    flow = {steps: {2000: best_at(comparison, "flow", int(steps))} for steps in ("25", "8")}
    for path in sorted((ROOT / "objectives" / "flow_continued").glob("eval_step*_unipc*.json")):
        match = re.fullmatch(r"eval_step(\d+)_unipc(\d+)\.json", path.name)
        if match:  # the w = 2 records (the w = 3 one has a suffix)
            record = json.loads(path.read_text())
            flow[match[2]][int(match[1])] = record["text_to_image"]["prompt_accuracy"]
    shipped = json.loads((ROOT / "shapes_small_training" / "eval_small.json").read_text())
    v = {2000: best_at(comparison, "gaussian", 25), **SHIPPED_RUN_WITHOUT_RECORDS}
    v[14000] = shipped["text_to_image"]["prompt_accuracy"]

    fig = Figure(figsize=(6.4, 4), dpi=120)
    ax = fig.add_subplot()
    for label, points, style in (
        ("v-prediction, 25 steps", v, "o-"),
        ("flow matching, 25 UniPC steps", flow["25"], "s-"),
        ("flow matching, 8 UniPC steps", flow["8"], "^--"),
    ):
        steps = sorted(points)
        ax.plot(steps, [100 * points[s] for s in steps], style, label=label)
    ax.set_xlabel("training steps (batch 64)")
    ax.set_ylabel("prompt accuracy, w = 2, 512 held-out prompts (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = ROOT / "objectives" / "training_curve.png"
    fig.savefig(out)
    print(f"wrote {out}")
    for label, points in (("v", v), ("flow 25", flow["25"]), ("flow 8", flow["8"])):
        print(label, {s: round(100 * a, 1) for s, a in sorted(points.items())})


if __name__ == "__main__":
    main()
