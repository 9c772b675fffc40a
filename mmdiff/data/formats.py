"""Convert the image-caption formats people already have into webdataset shards.

Every reader here turns its format into :class:`SourceRecord` rows (or the name of the reason a row was skipped),
and :func:`write_records` packs them through the one :class:`~mmdiff.data.writer.ShardSink`, exactly as
``mmdiff data folder`` does: the image bytes unchanged (``.png``/``.jpg``/``.webp``..., the extension from the
image's own header), the caption as ``.txt`` and any other fields as ``.json``.

- :func:`convert_imagefolder`: a Hugging Face ``imagefolder`` (``metadata.jsonl`` / ``metadata.csv`` with
  ``file_name`` and a caption column, files relative to the metadata file's folder),
- :func:`convert_table`: a CSV / TSV / JSONL of image path + caption (paths relative to the table's folder, or
  absolute),
- :func:`convert_coco`: COCO captions (``captions_*.json``: ``images`` + ``annotations``): one record per image, its
  first caption as ``.txt`` and all of them in the ``.json``'s ``"captions"``, which training draws phrasings from
  and evaluation scores against (``eval/records.py``),
- :func:`convert_hf_dataset`: a Hugging Face dataset saved with ``save_to_disk``, or parquet files with an image
  column (needs the optional ``datasets`` package: ``pip install "mmdiff[hf]"``).

img2dataset output needs no conversion: its tars are read as training shards as they are (``shards.py``).

A row that cannot become a record is skipped and counted by reason (:data:`SKIPS`); a file that cannot be read as
its format at all is a ValueError (``FileNotFoundError`` when missing) of one line, raised before anything in the
output folder is written or removed, and so is a source of which no row converts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmdiff.data import images, shards
from mmdiff.data.folder import MAX_CAPTION_FILE_BYTES, MAX_IMAGE_FILE_BYTES, sanitize_key
from mmdiff.data.writer import ShardSink

# The columns looked for when none is named, first present wins (Hugging Face's imagefolder uses these names).
CAPTION_COLUMNS = ("text", "caption")
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path")
SKIPS = (
    "skipped_missing_image",  # the row names an image file that does not exist
    "skipped_bad_image",  # an image PIL cannot read
    "skipped_no_caption",  # no caption at all (a missing or null cell; a COCO image without annotations)
    "skipped_bad_caption",  # an empty caption, or one that is not text
    "skipped_bad_row",  # a line that does not parse, a row without the image column, an annotation of no image
    "skipped_outside_src",  # an imagefolder row whose file resolves outside the folder
    "skipped_too_large",  # beyond the size limits of `mmdiff data folder` (folder.py)
)
_FORMAT_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


class MissingDependencyError(ImportError):
    """An optional package a format needs is not installed (the CLI prints it as one line, exit status 2)."""


@dataclass
class SourceRecord:
    """One image-caption pair of a source format, before it is checked and packed.

    ``name`` becomes the sample key (sanitised, made unique); ``image`` is a file or the image's bytes; ``caption``
    is the raw cell (a string, a list of strings: the first is the ``.txt``, all are ``"captions"``, or anything
    else, which is skipped); ``attributes`` are stored as the record's ``.json``.
    """

    name: str
    image: Path | bytes
    caption: Any
    attributes: dict[str, Any] | None = None


def write_records(
    rows: Iterable[SourceRecord | str], out: str | os.PathLike, shard_size: int, source: str
) -> dict[str, Any]:
    """Pack ``rows`` into ``out/shard-000000.tar ...``; a row that is a string is the :data:`SKIPS` reason it was
    skipped for. Returns ``{"written", *SKIPS, "duplicate_keys", "shards"}``.

    The sink is opened at the first good record, so a source of which nothing converts is a ValueError naming
    ``source`` and the counts, and leaves ``out`` as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; give a folder for the shards")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    stats: dict[str, int] = {"written": 0, **dict.fromkeys(SKIPS, 0), "duplicate_keys": 0}
    used_keys: set[str] = set()
    sink: ShardSink | None = None
    for row in rows:
        if isinstance(row, str):
            stats[row] += 1
            continue
        sample = _sample(row, stats)
        if sample is None:
            continue
        base = sanitize_key(Path(row.name))
        key, n = base, 1
        while key in used_keys:  # "a b.png" and "a_b.png" sanitise alike: no sample overwrites another
            key, n = f"{base}_{n}", n + 1
        stats["duplicate_keys"] += key != base
        used_keys.add(key)
        sink = sink or ShardSink(out, shard_size)
        sink.add({"__key__": key, **sample})
        stats["written"] += 1
    if sink is None:
        parts = [f"{n} {reason.removeprefix('skipped_')}" for reason, n in stats.items() if n and reason in SKIPS]
        raise ValueError(f"nothing to convert in {source}: {', '.join(parts) or 'no rows'} (skipped)")
    sink.flush()
    return {**stats, "shards": sink.shards}


def _sample(row: SourceRecord, stats: dict[str, int]) -> dict[str, bytes] | None:
    """The shard members of a row (image, txt, json), or None with its skip counted into ``stats``."""
    captions = row.caption if isinstance(row.caption, list) else [row.caption]
    if not captions or captions[0] is None:
        stats["skipped_no_caption"] += 1
        return None
    if not all(isinstance(c, str) for c in captions) or not captions[0].strip():
        stats["skipped_bad_caption"] += 1
        return None
    caption = captions[0].encode("utf-8")
    if len(caption) > MAX_CAPTION_FILE_BYTES:
        stats["skipped_too_large"] += 1
        return None
    if isinstance(row.image, Path):
        if not row.image.is_file():
            stats["skipped_missing_image"] += 1
            return None
        if row.image.stat().st_size > MAX_IMAGE_FILE_BYTES:
            stats["skipped_too_large"] += 1
            return None
        data = row.image.read_bytes()
    else:
        data = row.image
    ext = _image_ext(data)
    if ext in SKIPS:
        stats[ext] += 1
        return None
    sample = {ext: data, "txt": caption}
    attributes = dict(row.attributes or {})
    if len(captions) > 1:
        attributes["captions"] = captions
    if attributes:
        encoded = json.dumps(attributes, ensure_ascii=False, default=str).encode("utf-8")
        if len(encoded) > shards.MAX_JSON_BYTES:
            stats["skipped_too_large"] += 1
            return None
        sample["json"] = encoded
    return sample


def _image_ext(data: bytes) -> str:
    """The shard extension of an image from its header (verified, not decoded), or the skip reason."""
    try:
        with images.open_image_header(data) as opened:
            images.check_image_size(opened)
            kind = opened.format
            opened.verify()
    except (images.ImageTooLargeError, Image.DecompressionBombError):
        return "skipped_too_large"
    except Exception:  # PIL raises many kinds for bytes that are no image (OSError, SyntaxError, ValueError...)
        return "skipped_bad_image"
    return _FORMAT_EXTS.get(kind, "image")


def _pick_column(given: str | None, columns: Iterable[str], defaults: tuple[str, ...], what: str, source) -> str:
    """The column named ``given`` or the first of ``defaults`` present; a ValueError listing the columns if none."""
    columns = list(dict.fromkeys(columns))
    if given is not None:
        if given not in columns:
            raise ValueError(f"{source} has no {what} column {given!r} (columns: {', '.join(columns) or 'none'})")
        return given
    found = next((c for c in defaults if c in columns), None)
    if found is None:
        flag = "--caption-column" if what == "caption" else "--image-column"
        raise ValueError(
            f"{source} has none of the {what} columns {', '.join(defaults)} (columns: {', '.join(columns) or 'none'});"
            f" name one with {flag}"
        )
    return found


# ---------------------------------------------------------------- tables: CSV, TSV, JSONL (and imagefolder metadata)


def read_table(path: str | os.PathLike) -> tuple[list[dict[str, Any] | None], list[str]]:
    """(rows, columns) of a ``.csv``, ``.tsv`` or ``.jsonl`` file; a row that does not parse is None.

    CSV/TSV need a header line; a JSONL line that is not a JSON object is a bad row, and the columns are those of all
    its objects. A file that is not UTF-8, or has no header, is a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}" if not path.exists() else f"{path} is not a file")
    kind = path.suffix.lower()
    if kind not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl table, got {kind or 'no extension'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if kind == ".jsonl":
        rows: list[dict[str, Any] | None] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            rows.append(row if isinstance(row, dict) else None)
        return rows, list(dict.fromkeys(k for row in rows if row for k in row))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == ".tsv" else ",")
    try:
        columns = list(reader.fieldnames or [])
        # a row with more fields than the header puts the rest under None; one with fewer leaves cells None
        rows = [None if None in row else row for row in reader]
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable {kind[1:].upper()} file (line {reader.line_num}: {err})") from None
    if not columns:
        raise ValueError(f"{path} is empty: a {kind[1:].upper()} table needs a header line naming its columns")
    return rows, columns


def _table_rows(
    rows: list[dict[str, Any] | None], image_column: str, caption_column: str, base: Path, inside: Path | None = None
) -> Iterator[SourceRecord | str]:
    """Rows of a parsed table as records: images relative to ``base`` (or absolute); with ``inside`` set, a file
    resolving outside that folder is skipped. The other columns become the record's attributes."""
    root = inside.resolve() if inside is not None else None
    for row in rows:
        value = row.get(image_column) if row is not None else None
        if not isinstance(value, str) or not value.strip():
            yield "skipped_bad_row"
            continue
        image = base / value.strip()
        if root is not None and not image.resolve().is_relative_to(root):
            yield "skipped_outside_src"
            continue
        attributes = {k: v for k, v in row.items() if k not in (image_column, caption_column) and v not in (None, "")}
        name = str(image.relative_to(inside)) if inside is not None else value.strip().lstrip("/")
        yield SourceRecord(name, image, row.get(caption_column), attributes or None)


def convert_table(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_column: str | None = None,
    caption_column: str | None = None,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Shards from a CSV / TSV / JSONL of image path + caption (paths relative to the table's folder, or absolute).

    The image column is ``image_column`` or the first of :data:`IMAGE_COLUMNS` present, the caption column
    ``caption_column`` or the first of :data:`CAPTION_COLUMNS`; other columns are kept in each record's ``.json``.
    Returns the counts of :func:`write_records`.
    """
    rows, columns = read_table(src)
    src = Path(src)
    image_column = _pick_column(image_column, columns, IMAGE_COLUMNS, "image", src)
    caption_column = _pick_column(caption_column, columns, CAPTION_COLUMNS, "caption", src)
    return write_records(_table_rows(rows, image_column, caption_column, src.parent), out, shard_size, str(src))


def convert_imagefolder(
    src: str | os.PathLike, out: str | os.PathLike, caption_column: str | None = None, shard_size: int = 1000
) -> dict[str, Any]:
    """Shards from a Hugging Face ``imagefolder``: every ``metadata.jsonl`` / ``metadata.csv`` under ``src``, its
    ``file_name`` relative to its own folder (so split folders ``train/``, ``test/`` each bring theirs: give
    ``src/train`` to convert one split). The caption column is ``caption_column`` or the first of
    :data:`CAPTION_COLUMNS`; a file that resolves outside ``src`` (``../``, a symlink) is skipped and counted.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"imagefolder not found: {src}")
    if not src.is_dir():
        raise ValueError(f"{src} is a file: give the imagefolder's folder (the one holding metadata.jsonl or .csv)")
    metadata = sorted(p for p in src.rglob("metadata.*") if p.suffix in (".jsonl", ".csv") and p.is_file())
    if not metadata:
        raise ValueError(f"no metadata.jsonl or metadata.csv under {src}: an imagefolder with captions needs one")
    folders = [p.parent for p in metadata]
    doubled = next((f for f in folders if folders.count(f) > 1), None)
    if doubled is not None:
        raise ValueError(f"{doubled} holds both metadata.jsonl and metadata.csv: keep one")

    def rows() -> Iterator[SourceRecord | str]:
        for path in metadata:
            table, columns = read_table(path)
            image_column = _pick_column("file_name", columns, (), "image", path)
            column = _pick_column(caption_column, columns, CAPTION_COLUMNS, "caption", path)
            yield from _table_rows(table, image_column, column, path.parent, inside=src)

    # every metadata file is parsed (and its columns checked) before the first record is written
    checked = list(rows())
    return write_records(checked, out, shard_size, str(src))


# ---------------------------------------------------------------- COCO captions


def read_coco_captions(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[Any, list[str]], int]:
    """(images, captions by image id in annotation order, bad annotations) of a COCO captions json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path}" if not path.exists() else f"{path} is no file")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO captions file: it needs an 'images' list and an 'annotations' list")
    if not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO captions file: it has no 'annotations' list")
    images_list = data["images"]
    ids = {image.get("id") for image in images_list if isinstance(image, dict)}
    captions: dict[Any, list[str]] = {}
    bad = 0
    for annotation in data["annotations"]:
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if image_id not in ids or not isinstance(caption, str):
            bad += 1
        elif caption.strip():
            captions.setdefault(image_id, []).append(" ".join(caption.split()))
    return images_list, captions, bad


def convert_coco(
    captions: str | os.PathLike, images_dir: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000
) -> dict[str, Any]:
    """Shards from COCO captions: one record per image of ``captions``'s ``images`` (files under ``images_dir``),
    its first caption as ``.txt`` and ``{"captions": all of them, "image_id"}`` as ``.json``: training draws a
    phrasing from them and evaluation takes them all as references. An image without captions is counted as
    ``skipped_no_caption``; an annotation of an unknown image or without a caption as ``skipped_bad_row``.
    """
    images_list, by_image, bad = read_coco_captions(captions)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO images folder not found: {images_dir}")

    def rows() -> Iterator[SourceRecord | str]:
        yield from ["skipped_bad_row"] * bad
        for image in images_list:
            name = image.get("file_name") if isinstance(image, dict) else None
            if not isinstance(name, str) or not name.strip():
                yield "skipped_bad_row"
                continue
            texts = by_image.get(image.get("id"))
            yield SourceRecord(name, images_dir / name, texts or None, {"image_id": image.get("id")})

    return write_records(rows(), out, shard_size, str(captions))


# ---------------------------------------------------------------- Hugging Face datasets (optional dependency)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError('install datasets: pip install datasets (or pip install "mmdiff[hf]")') from None
    return datasets


def _hf_image_bytes(value: Any, base: Path) -> Path | bytes | str:
    """An image cell of a dataset as a file or bytes (a skip reason when it is neither): ``datasets.Image``'s
    ``{"bytes", "path"}`` (undecoded), a path string, raw bytes or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value.strip():
        path = Path(value)
        return path if path.is_absolute() else base / path
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return "skipped_bad_row"


def load_hf_dataset(src: str | os.PathLike, split: str | None = None):
    """A dataset from a ``save_to_disk`` folder (a DatasetDict: ``split``, else "train" or its only split) or from
    parquet files (one file, or a folder of ``*.parquet``), which are streamed: nothing is copied into the cache."""
    datasets = _import_datasets()
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"dataset not found: {src}")
    parquet = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    saved = src.is_dir() and any((src / name).is_file() for name in ("dataset_dict.json", "state.json"))
    if saved:
        dataset = datasets.load_from_disk(str(src))
    elif parquet and all(p.suffix == ".parquet" for p in parquet):
        import pyarrow.parquet  # a dependency of datasets

        files = [str(p) for p in parquet]
        with _arrow_errors(src):
            for file in files:  # each footer read first: datasets would log a traceback for a bad one
                pyarrow.parquet.read_schema(file)
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        if split is not None:
            raise ValueError(f"{src} is parquet files, one split: leave out --split")
    else:
        raise ValueError(f"{src} is neither a save_to_disk folder nor parquet files (.parquet)")
    if isinstance(dataset, datasets.DatasetDict):
        names = list(dataset)
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in names:
            raise ValueError(f"{src} has splits {', '.join(names)}: choose one with --split")
        dataset = dataset[chosen]
    elif saved and split is not None and split != str(dataset.split):
        raise ValueError(f"{src} holds one split ({dataset.split}), not {split!r}: leave out --split")
    return dataset


@contextlib.contextmanager
def _arrow_errors(src: Path) -> Iterator[None]:
    """pyarrow's errors for a file that is no parquet (ArrowInvalid, ...) as one ValueError naming ``src``."""
    try:
        yield
    except Exception as err:
        if type(err).__module__.split(".")[0] != "pyarrow":
            raise
        raise ValueError(f"{src}: not readable as parquet ({type(err).__name__}: {err})") from None


def convert_hf_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str | None = None,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Shards from a Hugging Face dataset (:func:`load_hf_dataset`): the image column (``image_column``, else the
    first of "image", :data:`IMAGE_COLUMNS`) holds images or paths relative to ``src``'s folder, the caption column
    a string or a list of strings (all kept as ``"captions"``). Other columns are left out; keys are row numbers.
    """
    datasets = _import_datasets()
    dataset = load_hf_dataset(src, split)
    source = Path(src)
    columns = dataset.column_names or []
    image_column = _pick_column(image_column, columns, ("image", *IMAGE_COLUMNS), "image", source)
    caption_column = _pick_column(caption_column, columns, CAPTION_COLUMNS, "caption", source)
    dataset = dataset.select_columns([image_column, caption_column])
    if isinstance((dataset.features or {}).get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # the stored bytes, not pixels
    base = source if source.is_dir() else source.parent

    def rows() -> Iterator[SourceRecord | str]:
        with _arrow_errors(source):
            for index, row in enumerate(dataset):
                image = _hf_image_bytes(row[image_column], base)
                if isinstance(image, str):
                    yield image
                    continue
                yield SourceRecord(f"{index:09d}", image, row[caption_column])

    return write_records(rows(), out, shard_size, str(src))
