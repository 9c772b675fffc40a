"""`mmdiff plot RUN_DIR`: a training run's losses, learning rate and in-training evaluation against the step.

Reads `RUN_DIR/metrics.jsonl` (what `mmdiff train` writes every `train.log_every` / `train.eval_every` steps) and
draws one panel per group: the training losses of both tasks, the held-out losses on the fixed batch, the learning
rate, and every generic evaluation figure the run logged (`eval_fd`, `eval_clip_score`, ... when
`train.eval_encoder` is set). Uses matplotlib's object API only (no GUI backend).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

LOSS_KEYS = ("loss_image", "loss_text")
HELD_OUT_KEYS = ("eval_loss_image", "eval_loss_text")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (a truncated last line, from a crash mid-write, is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a `mmdiff train` output folder?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no metric records yet")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    pairs = [(s, v) for s, v in pairs if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def generic_eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The in-training evaluation figures logged by the run (numeric `eval_*` keys other than the held-out losses)."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("eval_") and key not in HELD_OUT_KEYS and isinstance(value, int | float):
                keys[key] = None
    return list(keys)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the figure (default RUN_DIR/training_plot.png) and return its path."""
    rows = read_metrics(run_dir)
    extra = generic_eval_keys(rows)
    panels: list[tuple[str, tuple[str, ...], bool]] = [
        ("training loss", LOSS_KEYS, True),
        ("held-out loss (fixed batch, fixed noise)", HELD_OUT_KEYS, True),
        ("learning rate", ("lr",), False),
        *[(key.removeprefix("eval_").replace("_", " "), (key,), False) for key in extra],
    ]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows), dpi=100)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (title, keys, log_scale) in zip(axes, panels, strict=False):
        drawn = False
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, "o-" if len(steps) < 30 else "-", markersize=3, label=key)
                drawn = True
        if drawn and log_scale and all(v > 0 for key in keys for v in _series(rows, key)[1]):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.locator_params(axis="x", nbins=5)
        if drawn:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "training_plot.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
