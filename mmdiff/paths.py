"""Files of the source checkout (configs/, assets/) found from the working directory or beside the package."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = "assets/shapes_small"
VAL_SAMPLE = "assets/shapes_val_sample.tar"


def find_repo_file(relative: str) -> Path:
    """`relative` (e.g. "configs/shapes_tiny.yaml") under the working directory, else under the checkout that this
    mmdiff package runs from (an editable install); FileNotFoundError naming both places otherwise."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / relative
        if path.exists():
            return path
    raise FileNotFoundError(f"{relative} not found in {Path.cwd()} or beside the mmdiff package; run from the repo")
