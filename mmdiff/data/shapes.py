"""The built-in "shapes" dataset: coloured geometric shapes on a plain canvas with exact captions.

Every attribute of a scene is known, so generated images (via a detector-free attribute check) and generated captions
(via :func:`parse_caption`) can be scored exactly. Scenes hold one or two non-overlapping objects; with two objects
the caption states an unambiguous spatial relation ("left of", "right of", "above", "below"). :class:`LeftFirstPolicy`
is the dataset's caption policy for ``data.text_task_phrasings: left_first``.

Image coordinates have x to the right and y downwards, so "A above B" means A's centre has the smaller y.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.writer import ShardSink

# Far apart in RGB (L1 distance >= 100 between any two) so an evaluator can classify colours from pixels.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 0),
    "purple": (140, 60, 180),
    "orange": (250, 125, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Extents are fractions of the canvas: 9 px and 13 px at 32 px. Two large objects side by side (13 + gap + 13 plus
# the edge margins) must still fit, otherwise large/large scenes with a relation could never be generated.
_SIZE_FRACTION = {"small": 9 / 32, "large": 13 / 32}
# The dominant axis offset must be at least this many times the other one for the relation to be unambiguous.
_DOMINANCE = 2.0
_SUPERSAMPLE = 4
_MAX_PLACEMENT_TRIES = 200


def object_extent(size: str, image_size: int) -> int:
    """Side length in pixels of an object's bounding box (diameter / side / triangle base and height)."""
    return max(3, round(_SIZE_FRACTION[size] * image_size))


def _gap(image_size: int) -> int:
    """Minimum empty pixels between two objects' bounding boxes, so they never touch after anti-aliasing."""
    return max(2, image_size // 16)


def _edge_margin(image_size: int) -> int:
    return max(1, image_size // 32)


def describe_object(obj: dict[str, Any]) -> str:
    """Noun phrase without article, e.g. "small red circle"."""
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def scene_captions(objects: list[dict[str, Any]], relation: str | None) -> list[str]:
    """All phrasings of a scene; the first one is canonical.

    With two objects, ``relation`` describes ``objects[0]`` relative to ``objects[1]``.
    """
    a = describe_object(objects[0])
    if len(objects) == 1:
        return [f"a {a}", f"there is a {a}", f"a {a} on a plain background"]
    if relation not in INVERSE_RELATION:
        raise ValueError(f"two objects need a relation in {RELATIONS}, got {relation!r}")
    b = describe_object(objects[1])
    inv = INVERSE_RELATION[relation]
    return [
        f"a {a} {relation} a {b}",
        f"a {b} {inv} a {a}",
        f"there is a {a} {relation} a {b}",
        f"there is a {b} {inv} a {a}",
        f"a {a} {relation} a {b} on a plain background",
    ]


def relation_of(dx: float, dy: float) -> str | None:
    """Relation of object A to object B given B.center - A.center, or None when neither axis clearly dominates."""
    if abs(dx) >= _DOMINANCE * abs(dy):
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= _DOMINANCE * abs(dx):
        return "above" if dy > 0 else "below"
    return None


def _boxes_apart(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    """True when the (x0, y0, extent) boxes are separated by at least ``gap`` pixels along some axis."""
    ax, ay, ae = a
    bx, by, be = b
    return ax + ae + gap <= bx or bx + be + gap <= ax or ay + ae + gap <= by or by + be + gap <= ay


def _random_box(rng: random.Random, extent: int, image_size: int) -> tuple[int, int, int]:
    margin = _edge_margin(image_size)
    hi = image_size - margin - extent
    return rng.randint(margin, hi), rng.randint(margin, hi), extent


def _sample_layout(rng: random.Random, image_size: int) -> tuple[list[dict[str, Any]], str | None]:
    """Draw objects and (for two objects) a relation, placing boxes by rejection sampling."""
    while True:
        count = rng.choice((1, 2))
        objects = [
            {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": rng.choice(SIZES)}
            for _ in range(count)
        ]
        # Two identical objects would make "a small red circle left of a small red circle" ambiguous to score.
        if count == 2 and describe_object(objects[0]) == describe_object(objects[1]):
            continue
        extents = [object_extent(o["size"], image_size) for o in objects]
        if count == 1:
            boxes = [_random_box(rng, extents[0], image_size)]
            relation = None
        else:
            # Choose the relation first so the four relations are balanced, then place until the geometry agrees.
            relation = rng.choice(RELATIONS)
            boxes = []
            for _ in range(_MAX_PLACEMENT_TRIES):
                a = _random_box(rng, extents[0], image_size)
                b = _random_box(rng, extents[1], image_size)
                if not _boxes_apart(a, b, _gap(image_size)):
                    continue
                dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)
                dy = (b[1] + b[2] / 2) - (a[1] + a[2] / 2)
                if relation_of(dx, dy) == relation:
                    boxes = [a, b]
                    break
            if not boxes:
                continue
        for obj, (x0, y0, ext) in zip(objects, boxes):
            obj["center"] = [x0 + ext / 2, y0 + ext / 2]
            obj["extent"] = ext
        return objects, relation


_MAX_SCENE_TRIES = 10_000


def place_scene(scene: dict[str, Any], image_size: int, rng: random.Random) -> list[dict[str, Any]]:
    """The objects of a given normalised scene with "center" and "extent", placed by the generator's rule (uniform
    boxes inside the margins, rejection until the boxes are apart and the relation holds)."""
    objects = [dict(obj) for obj in scene["objects"]]
    extents = [object_extent(o["size"], image_size) for o in objects]
    for _ in range(_MAX_SCENE_TRIES):
        boxes = [_random_box(rng, extent, image_size) for extent in extents]
        if len(boxes) == 2:
            a, b = boxes
            if not _boxes_apart(a, b, _gap(image_size)):
                continue
            dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)
            dy = (b[1] + b[2] / 2) - (a[1] + a[2] / 2)
            if relation_of(dx, dy) != scene["relation"]:
                continue
        for obj, (x0, y0, ext) in zip(objects, boxes):
            obj["center"] = [x0 + ext / 2, y0 + ext / 2]
            obj["extent"] = ext
        return objects
    raise ValueError(f"could not place scene {scene} on a {image_size}px canvas")


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], scale: int) -> None:
    ext = obj["extent"] * scale
    x0 = round(obj["center"][0] * scale - ext / 2)
    y0 = round(obj["center"][1] * scale - ext / 2)
    x1, y1 = x0 + ext - 1, y0 + ext - 1
    fill = COLORS[obj["color"]]
    if obj["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def render_objects(objects: list[dict[str, Any]], image_size: int) -> Image.Image:
    """Render objects (with "center" and "extent") anti-aliased: drawn at 4x and box-filtered down."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, _SUPERSAMPLE)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def render_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, dict[str, Any]]:
    """Sample and render one scene.

    Returns an RGB image of shape (image_size, image_size) and a JSON-friendly attributes dict:
    ``{"objects": [{"shape", "color", "size", "center": [x, y], "extent"}], "relation": str | None,
    "captions": [...], "canonical": str}``.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 for shapes to stay recognisable, got {image_size}")
    objects, relation = _sample_layout(rng, image_size)
    captions = scene_captions(objects, relation)
    attrs = {"objects": objects, "relation": relation, "captions": captions, "canonical": captions[0]}
    return render_objects(objects, image_size), attrs


_OBJ = rf"(?:a|an|one)\s+({'|'.join(SIZES)})\s+({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})"
_REL = r"(?:is\s+)?(?:to\s+the\s+)?(left of|right of|above|below)"
_CAPTION_RE = re.compile(
    rf"^(?:there\s+is\s+)?{_OBJ}(?:\s+{_REL}\s+{_OBJ})?(?:\s+on\s+a\s+plain\s+background)?$",
)


def normalize_scene(objects: list[dict[str, Any]], relation: str | None) -> dict[str, Any]:
    """Order-independent scene description: {"objects": [{shape, color, size}], "relation": "left of"|"above"|None}.

    "B right of A" becomes "A left of B" and "B below A" becomes "A above B", so equal scenes compare equal.
    """
    objs = [{"shape": o["shape"], "color": o["color"], "size": o["size"]} for o in objects]
    if len(objs) == 2 and relation in ("right of", "below"):
        objs = [objs[1], objs[0]]
        relation = INVERSE_RELATION[relation]
    return {"objects": objs, "relation": relation if len(objs) == 2 else None}


def scene_from_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """The normalised scene of a rendered sample's attributes, comparable with :func:`parse_caption`."""
    return normalize_scene(attrs["objects"], attrs.get("relation"))


def parse_caption(text: str) -> dict[str, Any] | None:
    """Parse any shapes phrasing into the normalised scene of :func:`normalize_scene`; None if unparseable.

    Case, punctuation and extra whitespace are ignored.
    """
    cleaned = " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())
    m = _CAPTION_RE.match(cleaned)
    if m is None:
        return None
    size_a, color_a, shape_a, relation, size_b, color_b, shape_b = m.groups()
    objects = [{"shape": shape_a, "color": color_a, "size": size_a}]
    if relation is not None:
        objects.append({"shape": shape_b, "color": color_b, "size": size_b})
    return normalize_scene(objects, relation)


_RIGHT_OR_BELOW = re.compile(r"\b(?:right of|below)\b")


def left_first_phrasings(phrasings: list[str]) -> list[str]:
    """The phrasings that name the left (or upper) object first: no "right of" / "below" (all of them when every
    phrasing has one, or none has a relation)."""
    return [p for p in phrasings if not _RIGHT_OR_BELOW.search(p)] or phrasings


def left_first_caption(caption: str) -> str:
    """The canonical phrasing of a shapes caption's scene, which names the left (or upper) object first: "a A right
    of a B" becomes "a B left of a A", "a A below a B" becomes "a B above a A" (the normalised scene, phrased by the
    generator's `scene_captions`); a caption that does not parse is returned as it is."""
    scene = parse_caption(caption)
    if scene is None:
        return caption
    return scene_captions(scene["objects"], scene["relation"])[0]


class LeftFirstPolicy(CaptionPolicy):
    """``data.text_task_phrasings: left_first``: text -> image keeps every phrasing (as the default policy), the
    image -> text task learns only phrasings that name the left (or upper) object first, so a captioner never has to
    guess which of two equivalent word orders to start with. Records without phrasings keep their caption for both.

    Draws: the default policy's (the input caption), then, for a record with phrasings and ``choice="random"``, one
    more for the target among the left-first phrasings; ``choice="txt"`` takes the first of them.
    """

    name = "left_first"
    reference_phrasing = "left_first"

    def choose(self, caption: str, phrasings: list[str], rng: random.Random) -> tuple[str, str]:
        caption, target = super().choose(caption, phrasings, rng)
        if phrasings:
            ordered = left_first_phrasings(phrasings)
            target = rng.choice(ordered) if self.choice == "random" else ordered[0]
        return caption, target

    def reference(self, caption: str) -> str:
        return left_first_caption(caption)


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression level)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_shapes_shards(
    out_dir: str | os.PathLike,
    num: int,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Generate ``num`` distinct shapes scenes into ``out_dir/{train,val}/shard-NNNNNN.tar``.

    Each sample has ``png`` (RGB image_size x image_size), ``txt`` (one phrasing, chosen from the seed) and ``json``
    (the attributes of :func:`render_scene`). The first ``round(num * val_fraction)`` distinct scenes go to val, the
    rest to train; duplicates (same PNG bytes) are redrawn, so the splits never share an image. The output is
    byte-identical for the same arguments.

    Returns ``{"train": {"count", "shards"}, "val": {"count", "shards"}, "duplicates": int, ...}``.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    num_val = round(num * val_fraction)
    sinks = {"val": ShardSink(out_dir / "val", shard_size), "train": ShardSink(out_dir / "train", shard_size)}
    rng = random.Random(seed)
    seen: set[bytes] = set()
    duplicates = 0
    # Bounded so an impossible request (more scenes than distinct images exist) fails instead of looping forever.
    max_duplicates = 100 * num + 1000
    with tqdm(total=num, desc="shapes", unit="img", disable=None) as bar:
        index = 0
        while index < num:
            image, attrs = render_scene(rng, image_size)
            data = png_bytes(image)
            digest = hashlib.sha1(data).digest()
            if digest in seen:
                duplicates += 1
                if duplicates > max_duplicates:
                    raise RuntimeError(f"could only draw {index} distinct {image_size}px scenes of {num} requested")
                continue
            seen.add(digest)
            split = "val" if index < num_val else "train"
            caption = rng.choice(attrs["captions"])
            sample = {
                "__key__": f"{split}-{index:08d}",
                "png": data,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(attrs, sort_keys=True).encode("utf-8"),
            }
            sinks[split].add(sample)
            index += 1
            bar.update(1)
    for sink in sinks.values():
        sink.flush()
    return {
        "train": {"count": sinks["train"].count, "shards": sinks["train"].shards},
        "val": {"count": sinks["val"].count, "shards": sinks["val"].shards},
        "duplicates": duplicates,
        "image_size": image_size,
        "seed": seed,
    }
