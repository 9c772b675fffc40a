"""Convert a folder of images with same-named caption files into webdataset shards.

``photos/cat 1.jpg`` + ``photos/cat 1.txt`` [+ ``photos/cat 1.json``] becomes the sample ``photos/cat_1`` with the
image bytes stored unchanged (``.jpg``), the caption as ``.txt`` and the optional attributes as ``.json``.

What is packed is bounded, so that one hostile file cannot fill the shards or the memory of whoever reads them: a
caption file over :data:`MAX_CAPTION_FILE_BYTES` or an attribute file over ``shards.MAX_JSON_BYTES``, an image file
over :data:`MAX_IMAGE_FILE_BYTES` or one whose header gives more than ``images.MAX_IMAGE_PIXELS`` pixels (read
without decoding it) is skipped and counted (``skipped_too_large``). Captions up to the file limit are packed whole
and cut at read time (``shards.MAX_CAPTION_BYTES``); a file whose header PIL cannot read is packed as before and
counted as ``corrupt_image`` by whoever reads the shards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mmdiff.data import images, shards
from mmdiff.data.writer import ShardSink

DEFAULT_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
# Far beyond any real caption (the reader keeps MAX_CAPTION_BYTES of one) or image file; module constants, read at
# call time.
MAX_CAPTION_FILE_BYTES = 1 << 20
MAX_IMAGE_FILE_BYTES = 256 << 20


def sanitize_key(relative: Path) -> str:
    """A webdataset key from a relative path without suffix: only ``[A-Za-z0-9_-/]``.

    Dots must go because webdataset splits the key from the field at the first dot of a file name.
    """
    parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", part).strip("_") or "_" for part in relative.with_suffix("").parts]
    return "/".join(parts)


def convert_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 1000,
    image_exts: tuple[str, ...] = DEFAULT_IMAGE_EXTS,
) -> dict[str, Any]:
    """Write ``out/shard-000000.tar ...`` from every image under ``src`` (recursive, sorted) that has a caption.

    Images without a same-named ``.txt`` are skipped and counted, and so are files that resolve outside ``src``
    (a symlink pointing elsewhere), so a conversion never packs files from outside the folder it was given, and files
    beyond the size limits or unreadable images (module docstring). Returns ``{"written", "skipped_no_caption",
    "skipped_bad_caption", "skipped_outside_src", "skipped_too_large", "duplicate_keys", "shards"}``.

    A folder with no images, or none that can be converted (no captions, only empty ones, ...), is a ValueError that
    says what was found, raised before anything in ``out`` is written or removed.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"image folder not found: {src}")
    if not src.is_dir():
        raise ValueError(f"{src} is a file, not a folder of images with .txt captions")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; give a folder for the shards")
    exts = list(dict.fromkeys(e.lower() if e.startswith(".") else f".{e.lower()}" for e in image_exts))
    images = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not images:
        raise ValueError(f"no images ({'/'.join(exts)}) under {src}")
    stats = {
        "written": 0,
        "skipped_no_caption": 0,
        "skipped_bad_caption": 0,
        "skipped_outside_src": 0,
        "skipped_too_large": 0,
        "duplicate_keys": 0,
    }
    root = src.resolve()
    used_keys: set[str] = set()
    # (image, key, caption bytes, attributes file or None): decided in full before the sink touches `out`
    planned: list[tuple[Path, str, bytes, Path | None]] = []
    for path in images:
        caption_path = path.with_suffix(".txt")
        json_path = path.with_suffix(".json")
        inputs = [p for p in (path, caption_path, json_path) if p.exists()]
        if any(not p.resolve().is_relative_to(root) for p in inputs):
            stats["skipped_outside_src"] += 1
            continue
        if not caption_path.is_file():
            stats["skipped_no_caption"] += 1
            continue
        problem = _file_problem(path, caption_path, json_path)
        if problem is not None:
            stats[problem] += 1
            continue
        caption = caption_path.read_bytes()
        try:
            if not caption.decode("utf-8").strip():
                raise ValueError("empty caption")
        except (UnicodeDecodeError, ValueError):
            stats["skipped_bad_caption"] += 1
            continue
        base = sanitize_key(path.relative_to(src))
        key, n = base, 1
        # "a b.png" and "a_b.jpg" sanitise to the same key; suffix later ones so no sample overwrites another.
        while key in used_keys:
            key, n = f"{base}_{n}", n + 1
        if key != base:
            stats["duplicate_keys"] += 1
        used_keys.add(key)
        planned.append((path, key, caption, json_path if json_path.is_file() else None))
    if not planned:
        raise ValueError(_nothing_to_convert(len(images), src, stats))

    sink = ShardSink(out, shard_size)
    for path, key, caption, json_path in tqdm(planned, desc="convert", unit="img", disable=None):
        sample = {"__key__": key, path.suffix.lower().lstrip("."): path.read_bytes(), "txt": caption}
        if json_path is not None:
            sample["json"] = json_path.read_bytes()
        sink.add(sample)
        stats["written"] += 1
    sink.flush()
    return {**stats, "shards": sink.shards}


def _file_problem(image: Path, caption: Path, attributes: Path) -> str | None:
    """``"skipped_too_large"`` when a record's files are beyond the size limits (the image's pixels read from its
    header, nothing decoded), else None."""
    if caption.stat().st_size > MAX_CAPTION_FILE_BYTES or image.stat().st_size > MAX_IMAGE_FILE_BYTES:
        return "skipped_too_large"
    if attributes.is_file() and attributes.stat().st_size > shards.MAX_JSON_BYTES:
        return "skipped_too_large"
    try:
        with image.open("rb") as fh, images.open_image_header(fh) as opened:
            images.check_image_size(opened)  # the header only: nothing is decoded
    except (images.ImageTooLargeError, Image.DecompressionBombError):
        return "skipped_too_large"
    except Exception:  # no image PIL can open (OSError, SyntaxError...): not a size problem; the reader counts it
        pass
    return None


def _nothing_to_convert(num_images: int, src: Path, stats: dict[str, int]) -> str:
    """Why none of the images under `src` could be converted, with the count of each reason."""
    found = f"{num_images} image{'s' if num_images != 1 else ''} under {src}"
    if stats["skipped_no_caption"] == num_images:
        return f"{found} but none has a same-named .txt caption"
    reasons = {
        "skipped_no_caption": "without a same-named .txt caption",
        "skipped_bad_caption": "with an empty or non-UTF-8 caption",
        "skipped_outside_src": "resolving outside the folder (symlinks)",
        "skipped_too_large": "over the size limits",
    }
    parts = [f"{stats[k]} {why}" for k, why in reasons.items() if stats[k]]
    return f"{found} but none could be converted: {', '.join(parts)}"
