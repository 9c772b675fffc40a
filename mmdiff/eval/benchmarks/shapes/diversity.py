"""Layout diversity of the images made for one prompt, and real reference images for any prompt.

Definition. For an image made for prompt P, each object of P's normalised scene is matched to a detected object
with the same colour, shape and size; the image's layout descriptor is ``(cx, cy, extent)`` of every matched object,
in P's object order, divided by the image width (so it is in canvas units, comparable across resolutions). Images
where the match fails (wrong count or attributes) have no descriptor: diversity is measured among correct samples.
The diversity of P is the mean pairwise Euclidean distance between the descriptors of its samples (NaN with fewer
than 2 descriptors). The real figure is the same quantity on real renders of P: the generator's own placement rule
(uniform boxes inside the margins, rejection until the relation holds), so generated / real ~ 1 means the model
covers the layouts the data has, and << 1 means it collapsed to a few (as strong guidance tends to do).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image

# references are placed by the generator's own rule, so they are drawn exactly as the training data was
from mmdiff.data.shapes import parse_caption, place_scene, render_objects

from .detector import detect_objects


def render_prompt(prompt: str, num: int, image_size: int = 32, seed: int = 0) -> list[Image.Image]:
    """`num` real renders of a shapes prompt with independent random layouts (seeded)."""
    scene = parse_caption(prompt)
    if scene is None:
        raise ValueError(f"not a shapes caption: {prompt!r}")
    rng = random.Random(f"{seed}-{prompt}")
    return [render_objects(place_scene(scene, image_size, rng), image_size) for _ in range(num)]


def layout_descriptor(image: Image.Image | np.ndarray, prompt: str) -> np.ndarray | None:
    """(3 * objects,) layout of the prompt's objects as detected in `image`, in canvas units; None if unmatched."""
    scene = parse_caption(prompt)
    objects = detect_objects(image)
    if scene is None or len(objects) != len(scene["objects"]):
        return None
    width = np.asarray(image).shape[1]
    unused = list(objects)
    values: list[float] = []
    for wanted in scene["objects"]:
        match = next((o for o in unused if all(o[k] == wanted[k] for k in ("color", "shape", "size"))), None)
        if match is None:
            return None
        unused.remove(match)
        values += [match["center"][0] / width, match["center"][1] / width, match["extent"] / width]
    return np.array(values)


def mean_pairwise_distance(descriptors: list[np.ndarray]) -> float:
    """Mean Euclidean distance over all pairs of (D,) descriptors; NaN with fewer than 2."""
    if len(descriptors) < 2:
        return float("nan")
    x = np.stack(descriptors)  # (K, D)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # (K, K)
    k = len(x)
    return float(dist.sum() / (k * (k - 1)))


def prompt_diversity(images: list[Image.Image], prompt: str) -> tuple[float, int]:
    """(diversity of the samples of one prompt, number of samples with a descriptor)."""
    descriptors = [d for d in (layout_descriptor(im, prompt) for im in images) if d is not None]
    return mean_pairwise_distance(descriptors), len(descriptors)


def diversity_report(
    images_by_prompt: dict[str, list[Image.Image]], image_size: int, seed: int = 0, num_real: int | None = None
) -> dict[str, Any]:
    """Generated vs real layout diversity over prompts.

    images_by_prompt: {prompt: its K generated images}. The real figure uses `num_real` (default K) renders per
    prompt. Returns {"diversity", "diversity_real", "diversity_ratio", "per_prompt": [...]}; the means skip NaNs.
    """
    rows = []
    for prompt, images in images_by_prompt.items():
        generated, valid = prompt_diversity(images, prompt)
        real, _ = prompt_diversity(render_prompt(prompt, num_real or len(images), image_size, seed), prompt)
        rows.append({"prompt": prompt, "diversity": generated, "diversity_real": real, "valid": valid})
    gen = np.array([r["diversity"] for r in rows], dtype=np.float64)
    real = np.array([r["diversity_real"] for r in rows], dtype=np.float64)
    ratio = gen / np.where(real > 0, real, np.nan)
    return {
        "diversity": _nanmean(gen),
        "diversity_real": _nanmean(real),
        "diversity_ratio": _nanmean(ratio),
        "per_prompt": rows,
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")
