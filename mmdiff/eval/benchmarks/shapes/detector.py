"""An exact, rule-based reader of shapes images: which objects are there, and does an image show its prompt?

The shapes generator draws flat palette colours on a white canvas, anti-aliased by 4x supersampling, so every pixel
is a blend ``white + alpha * (colour - white)``. The detector inverts that blend per pixel, labels connected
components of covered pixels, and reads each component's attributes:

- colour: the palette colour nearest (RGB, L2) to the mean of the component's well-covered pixels; a component whose
  mean is far from every palette colour is "unknown" (it can never match a prompt);
- shape: from the fill ratio ``area / (tallest column x widest row)`` of the component's coverage (square 1, circle
  ~pi/4, triangle ~1/2) and the vertical offset of the centroid from the box centre (the triangle points up, so its
  mass sits low). Column and row sums of coverage do not change when an object sits between pixels or has soft
  edges; the fill of the pixel bounding box does (a 9-px square half a pixel off the grid covers a 10-px box, fill
  81/100, and was read as a circle), and generated images put objects anywhere, not on the generator's pixel grid;
- size: the bounding-box extent against the midpoint of the generator's small and large extents;
- position: the bounding-box centre, which is what the generator calls an object's centre.

Components covering less than a fraction of the smallest object's area are treated as background noise.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

# The spatial rule of the generator itself, so that the detector can never disagree with the data about "above".
from mmdiff.data.shapes import BACKGROUND, COLORS, normalize_scene, object_extent, parse_caption, relation_of

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (K, 3)
_PALETTE_NAMES = list(COLORS)
_WHITE = np.array(BACKGROUND, dtype=np.float64)
# A pixel belongs to an object when at least this fraction of it is covered (estimated alpha).
_COVERED = 0.3
# Pixels at least this covered define a component's colour: the anti-aliased rim is a blend with white.
_CORE = 0.75
# Noise blobs smaller than this fraction of the smallest possible object (a small triangle) are background.
_MIN_AREA_FRACTION = 0.3
# A component's mean colour must lie within this fraction of the smallest palette distance of a palette colour.
_MAX_COLOR_ERROR = 0.5
_PALETTE_GAP = min(
    float(np.linalg.norm(_PALETTE[i] - _PALETTE[j])) for i in range(len(_PALETTE)) for j in range(i + 1, len(_PALETTE))
)
# Shape thresholds on the projection fill ratio. Renders at random sub-pixel offsets measure 0.53-0.64 (triangle),
# 0.76-0.80 (circle) and 0.99-1.00 (square) at 32 px; the thresholds sit between those ranges.
_TRIANGLE_FILL = 0.70
_SQUARE_FILL = 0.9
_TRIANGLE_OFFSET = 0.08  # centroid below the box centre by this fraction of the height (ideal triangle: 1/6)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image (any mode) or uint8 array (H, W, 3) -> float64 array (H, W, 3) in [0, 255]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and array.max() <= 1.0:
        array = array * 255.0  # diffusers' "np" output: floats in [0, 1]
    return array.astype(np.float64)


def coverage(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel coverage alpha (H, W) in [0, 1] and best palette index (H, W).

    For every palette colour c the least-squares alpha of ``p = white + alpha * (c - white)`` is found; the colour
    with the smallest residual wins. Pixels of a non-palette colour get the alpha of their best fit, clipped.
    """
    offset = pixels - _WHITE  # (H, W, 3)
    direction = _PALETTE - _WHITE  # (K, 3)
    alphas = np.einsum("hwc,kc->hwk", offset, direction) / (direction**2).sum(-1)  # (H, W, K)
    alphas = alphas.clip(0.0, 1.0)
    residual = ((offset[..., None, :] - alphas[..., None] * direction) ** 2).sum(-1)  # (H, W, K)
    best = residual.argmin(-1)
    return np.take_along_axis(alphas, best[..., None], -1)[..., 0], best


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask (H, W) -> labels (H, W) in 0..n (0 = background) and n.

    An iterative flood fill that visits only foreground pixels: a shapes image has a few hundred of them, so this
    beats whole-image numpy passes, and it needs no scipy.
    """
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int64)
    count = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        stack = [(int(y0), int(x0))]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
    return labels, count


def _classify_shape(alpha: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float, float]:
    """(shape, fill ratio, centroid offset) of a component from its coverage inside its box (x0, y0, x1, y1).

    The fill ratio divides the covered area by the product of the largest column sum and the largest row sum of
    coverage (the object's height and width in pixels, fractional), so it is the same wherever the object sits.
    """
    x0, y0, x1, y1 = box
    patch = alpha[y0:y1, x0:x1]
    area = float(patch.sum())
    fill = area / max(float(patch.sum(0).max() * patch.sum(1).max()), 1e-9)
    rows = np.arange(y0, y1) + 0.5
    centroid_y = float((patch.sum(1) * rows).sum() / max(area, 1e-9))
    offset = (centroid_y - (y0 + y1) / 2) / (y1 - y0)
    if fill < _TRIANGLE_FILL or offset > _TRIANGLE_OFFSET:
        shape = "triangle"
    elif fill > _SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    return shape, fill, offset


def detect_objects(image: Image.Image | np.ndarray) -> list[dict[str, Any]]:
    """The objects in a shapes image (any square size), largest first.

    Returns ``[{"color", "shape", "size", "center": [x, y], "extent", "area", "fill"}]`` in pixel units of the
    given image; "color" is "unknown" for a component whose colour is not near any palette colour.
    """
    pixels = to_rgb_array(image)
    height, width = pixels.shape[:2]
    size_px = min(height, width)
    alpha, _ = coverage(pixels)
    labels, count = label_components(alpha >= _COVERED)
    small, large = object_extent("small", size_px), object_extent("large", size_px)
    min_area = _MIN_AREA_FRACTION * small * small / 2
    objects = []
    for index in range(1, count + 1):
        member = labels == index
        comp_alpha = np.where(member, alpha, 0.0)
        area = float(comp_alpha.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(member)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        core = member & (alpha >= _CORE)
        mean = pixels[core if core.any() else member].mean(0)
        distances = np.linalg.norm(_PALETTE - mean, axis=1)
        color = _PALETTE_NAMES[int(distances.argmin())]
        if distances.min() > _MAX_COLOR_ERROR * _PALETTE_GAP:
            color = "unknown"
        shape, fill, _ = _classify_shape(comp_alpha, box)
        extent = max(box[2] - box[0], box[3] - box[1])
        objects.append(
            {
                "color": color,
                "shape": shape,
                "size": "small" if extent < (small + large) / 2 else "large",
                "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
                "extent": extent,
                "area": area,
                "fill": fill,
            }
        )
    return sorted(objects, key=lambda o: -o["area"])


def detected_scene(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Normalised scene (as :func:`mmdiff.data.shapes.normalize_scene`) of detected objects.

    With exactly two objects the relation of the first to the second follows the generator's rule; an ambiguous
    layout (neither axis dominates) has relation None and therefore never matches a two-object caption.
    """
    relation = None
    if len(objects) == 2:
        (ax, ay), (bx, by) = objects[0]["center"], objects[1]["center"]
        relation = relation_of(bx - ax, by - ay)
    return normalize_scene(objects, relation)


def _multiset(scene: dict[str, Any] | None, key: str) -> Counter:
    return Counter(o[key] for o in scene["objects"]) if scene else Counter()


def compare_scenes(predicted: dict[str, Any] | None, reference: dict[str, Any]) -> dict[str, bool]:
    """Per-attribute agreement of a predicted scene (None = unreadable) with a reference scene.

    count: same number of objects; colors / shapes / sizes: the same multiset of values; relation: the same
    relation between the same two (fully described) objects, or no relation for one-object scenes; all: the whole
    normalised scene is equal, i.e. every stated attribute and relation is present and nothing extra.
    """
    if predicted is None:
        return {k: False for k in ("count", "colors", "shapes", "sizes", "relation", "all")}
    same_count = len(predicted["objects"]) == len(reference["objects"])
    if len(reference["objects"]) == 1:
        relation_ok = len(predicted["objects"]) == 1
    else:
        relation_ok = same_count and predicted["relation"] == reference["relation"]
        relation_ok = relation_ok and predicted["objects"] == reference["objects"]
    return {
        "count": same_count,
        "colors": _multiset(predicted, "color") == _multiset(reference, "color"),
        "shapes": _multiset(predicted, "shape") == _multiset(reference, "shape"),
        "sizes": _multiset(predicted, "size") == _multiset(reference, "size"),
        "relation": relation_ok,
        "all": predicted == reference,
    }


def score_image(image: Image.Image | np.ndarray, prompt: str) -> dict[str, Any]:
    """Whether an image shows its prompt exactly.

    Returns ``{"correct": bool, "parsed": bool, "count"/"colors"/"shapes"/"sizes"/"relation": bool,
    "objects": [...detected...], "scene": detected normalised scene}``. An unparseable prompt scores all False.
    """
    reference = parse_caption(prompt)
    objects = detect_objects(image)
    scene = detected_scene(objects)
    if reference is None:
        checks = compare_scenes(None, {"objects": []})
    else:
        checks = compare_scenes(scene, reference)
    return {"correct": checks.pop("all"), "parsed": reference is not None, **checks, "objects": objects, "scene": scene}


# Attributes reported per image by score_image and per caption by the caption metrics, in a fixed order.
ATTRIBUTES = ("count", "colors", "shapes", "sizes", "relation")
__all__ = ["ATTRIBUTES", "compare_scenes", "detect_objects", "detected_scene", "score_image"]
