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


def plot_sweep(
    t2i_rows: list[dict[str, Any]],
    caption_rows: list[dict[str, Any]],
    path: str | Path,
    has_interval: bool = False,
    timing: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Top: prompt accuracy, FD and diversity (generated vs real) against w; bottom: caption accuracy and NLL
    against the caption guidance scale, and the sweep's wall time with CFG everywhere / in the interval.
    Interval-on curves are dashed."""
    fig = Figure(figsize=(12, 7), dpi=100)
    axes = fig.subplots(2, 3)
    w = _series(t2i_rows, "guidance_scale")
    panels = [
        (axes[0][0], "prompt_accuracy", "text→image prompt accuracy"),
        (axes[0][1], "fd", "Fréchet distance (features)"),
        (axes[0][2], "diversity", "layout diversity (canvas units)"),
    ]
    for ax, key, title in panels:
        ax.plot(w, _series(t2i_rows, key), "o-", label="CFG everywhere")
        if has_interval:
            ax.plot(w, _series(t2i_rows, f"{key}_interval"), "s--", label="CFG in interval")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("guidance scale w")
    real = _series(t2i_rows, "diversity_real")
    if np.isfinite(real).any():
        axes[0][2].axhline(float(np.nanmean(real)), color="gray", linestyle=":", label="real data")
    for ax, _key, _title in panels:
        ax.legend(fontsize=7)

    wc = _series(caption_rows, "guidance_scale")
    acc = axes[1][0]
    for key, label in (("all", "all attributes"), ("exact_match", "exact match"), ("relation", "relation")):
        acc.plot(wc, _series(caption_rows, key), "o-", label=label)
    acc.set_title("image→text caption accuracy", fontsize=10)
    acc.legend(fontsize=7)
    nll = axes[1][1]
    nll.plot(wc, _series(caption_rows, "nll_image_bits"), "o-", label="image context (guided logits)")
    nll.plot(wc, _series(caption_rows, "nll_null_bits"), ":", color="gray", label="null context")
    nll.set_title("caption NLL bound (bits / token)", fontsize=10)
    nll.legend(fontsize=7)
    for ax in (acc, nll):
        ax.set_xlabel("caption guidance scale w")
    if timing:
        names = list(timing)
        axes[1][2].bar(names, [timing[n]["seconds"] for n in names], color=["tab:blue", "tab:orange"][: len(names)])
        axes[1][2].set_title("text→image sweep wall time (s), interval off / on", fontsize=10)
    else:
        axes[1][2].axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
