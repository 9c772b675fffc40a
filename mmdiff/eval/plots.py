"""Figures of a guidance sweep: a labelled image grid and metric curves against the guidance scale.

Only matplotlib's object API (``Figure`` + ``savefig``) is used, never pyplot, so no GUI backend or global figure
state is involved and figures can be written from any thread or headless machine.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from matplotlib.figure import Figure


def _hstack(images: list[PIL.Image.Image], gap: int = 1) -> np.ndarray:
    """Side-by-side uint8 array (H, W_total, 3) of equally sized images, white gaps between them."""
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    h = arrays[0].shape[0]
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, array in enumerate(arrays):
        parts += [spacer, array] if i else [array]
    return np.concatenate(parts, axis=1)


def save_labeled_grid(
    cells: list[list[list[PIL.Image.Image]]], row_labels: list[str], col_labels: list[str], path: str | Path
) -> Path:
    """cells[r][c]: the images of row r (a prompt) and column c (a scale), shown side by side in one cell."""
    rows, cols = len(cells), len(cells[0])
    per_cell = max(len(c) for row in cells for c in row)
    fig = Figure(figsize=(1.1 * per_cell * cols + 2.6, 1.2 * rows + 0.6), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            # nearest: 32 px images must stay crisp, not blurred into the judgement of the reader
            ax.imshow(_hstack(cells[r][c]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(
                    "\n".join(textwrap.wrap(row_labels[r], 24)), fontsize=7, rotation=0, ha="right", va="center"
                )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _series(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


def _line(ax, x: np.ndarray, rows: list[dict[str, Any]], key: str, label: str, style: str = "o-") -> bool:
    y = _series(rows, key)
    if not np.isfinite(y).any():
        return False
    ax.plot(x, y, style, label=label)
    return True


def plot_sweep(
    t2i_rows: list[dict[str, Any]],
    caption_rows: list[dict[str, Any]],
    path: str | Path,
    has_interval: bool = False,
    timing: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """The figure people pick a scale from. Top left: the trade-off curve, FD against CLIP score with each point
    labelled by w (low FD and high CLIP score is better; guidance moves along the curve). Next to it the per-scale
    curves: FD, CLIP score and R-precision, precision and recall; the dataset benchmark's exact score where there is
    one. Bottom: caption scores and the caption NLL bound against the caption guidance scale, and the wall time with
    CFG everywhere / in the interval. Interval-on curves are dashed."""
    fig = Figure(figsize=(16, 7), dpi=100)
    axes = fig.subplots(2, 4)
    w = _series(t2i_rows, "guidance_scale")
    runs = [("", "o-", "CFG everywhere")] + ([("_interval", "s--", "CFG in interval")] if has_interval else [])

    trade = axes[0][0]
    for suffix, style, label in runs:
        fd, cs = _series(t2i_rows, f"fd{suffix}"), _series(t2i_rows, f"clip_score{suffix}")
        if np.isfinite(fd).any() and np.isfinite(cs).any():
            trade.plot(fd, cs, style, label=label)
            for x, y, scale in zip(fd, cs, w, strict=True):
                if np.isfinite(x) and np.isfinite(y):
                    trade.annotate(f"{scale:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    trade.set_xlabel("FD (lower is better)")
    trade.set_ylabel("CLIP score (higher is better)")
    trade.set_title("trade-off over w (labels: w)", fontsize=10)

    panels = [
        (axes[0][1], [("fd", "FD")], "Fréchet distance"),
        (axes[0][2], [("clip_score", "CLIP score")], "CLIP score (image, prompt)"),
        (
            axes[0][3],
            [("r_precision", "R-precision"), ("precision", "precision"), ("recall", "recall")],
            "retrieval, precision / recall",
        ),
    ]
    bench = "prompt_accuracy" if np.isfinite(_series(t2i_rows, "prompt_accuracy")).any() else None
    panels.append(
        (
            axes[1][0],
            [("prompt_accuracy", "prompt accuracy"), ("diversity_ratio", "layout diversity / real")],
            "benchmark",
        )
        if bench
        else (axes[1][0], [("kid", "KID")], "kernel inception distance")
    )
    for ax, keys, title in panels:
        for key, label in keys:
            for suffix, style, run_label in runs:
                name = f"{label} ({run_label})" if has_interval else label
                _line(ax, w, t2i_rows, f"{key}{suffix}", name, style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("guidance scale w")
    wc = _series(caption_rows, "guidance_scale")
    scores = axes[1][1]
    for key, label in (("cider_d", "CIDEr-D"), ("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("all", "all attributes")):
        _line(scores, wc, caption_rows, key, label)
    scores.set_title("image→text caption scores", fontsize=10)
    nll = axes[1][2]
    _line(nll, wc, caption_rows, "nll_image_bits", "image context (guided logits)")
    _line(nll, wc, caption_rows, "nll_null_bits", "null context", ":")
    nll.set_title("caption NLL bound (bits / token)", fontsize=10)
    for ax in (scores, nll):
        ax.set_xlabel("caption guidance scale w")
    if timing:
        names = list(timing)
        axes[1][3].bar(names, [timing[n]["seconds"] for n in names], color=["tab:blue", "tab:orange"][: len(names)])
        axes[1][3].set_title("text→image sweep wall time (s), interval off / on", fontsize=10)
    else:
        axes[1][3].axis("off")
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_grid(images: list[PIL.Image.Image], rows: int, path: Path, min_cell: int = 128) -> Path:
    """Tile images row-major into one PNG, upscaling small images (nearest) so a person can see them."""
    from diffusers.utils import make_image_grid

    cols = (len(images) + rows - 1) // rows
    images = images + [PIL.Image.new("RGB", images[0].size, "white")] * (rows * cols - len(images))
    scale = max(1, min_cell // images[0].width)
    images = [im.resize((im.width * scale, im.height * scale), PIL.Image.NEAREST) for im in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=rows, cols=cols).save(path)
    return path


def plot_methods(method_rows: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Guidance methods against the scale: one panel per figure (prompt accuracy, FD, diversity, CLIP score, where
    the rows have them), one line per method."""
    first = next(iter(method_rows.values()))[0]
    keys = [k for k in ("prompt_accuracy", "fd", "diversity", "clip_score") if k in first]
    fig = Figure(figsize=(4.2 * len(keys), 3.6), dpi=110)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for method, rows in method_rows.items():
            ax.plot([r["guidance_scale"] for r in rows], [r.get(key) for r in rows], marker="o", label=method)
        ax.set_xlabel("guidance scale w")
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
