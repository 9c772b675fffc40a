"""Webdataset input for training and evaluation: shard expansion, robust record reading, decoding and batching.

Shards are plain webdataset tars (``key.png``/``key.jpg`` + ``key.txt`` [+ ``key.json``]), or latent shards with
precomputed VAE latents (``key.latents.npy``, see ``latents.py``) in place of the image. Bad records never crash
a run: they are skipped and counted by reason. Counts cross DataLoader worker processes inside the samples
themselves (each sample carries the counts since the previous one) and the collate function sums them into
``batch["skips"]``; :class:`SkipStats` accumulates them in the training loop.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmdiff.config import TEXT_TASK_PHRASINGS
from mmdiff.data.latents import LATENTS_EXT, read_latent_record
from mmdiff.data.tokenizer import encode_captions

# Tokenizers warns (and disables itself) when a process forks after it used its thread pool; DataLoader workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "image")
CAPTION_EXTS = ("txt", "caption", "text")
SKIP_REASONS = tuple(
    "corrupt_image corrupt_tar bad_utf8 empty_caption no_image no_caption bad_json truncated unsafe_name "
    "corrupt_latents".split()
)
_BRACE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_REMOTE_RE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")


class SkipStats:
    """Running counts of skipped or altered records by reason ("truncated" counts captions cut to max_length)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def accumulate(self, skips: dict[str, int]) -> None:
        for reason, n in skips.items():
            if n:
                self.counts[reason] += int(n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.counts:
            return "no skipped records"
        return ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))


def _expand_braces(pattern: str) -> list[str]:
    """Expand numeric ``{000..099}`` ranges (zero padding kept from the first bound), left to right."""
    m = _BRACE_RE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"brace range {m.group(0)} in {pattern!r} is descending")
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :]))
    return out


def expand_urls(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a list, a brace pattern (``shard-{000000..000099}.tar``), a comma list, a glob or a folder.

    A folder means every ``*.tar`` in it, sorted. Remote urls (``pipe:``, ``http://``...) pass through unchecked.
    Raises FileNotFoundError naming the pattern when nothing matches or a listed shard is missing.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    else:
        parts = [str(p) for p in spec]
    if not parts:
        raise ValueError(f"no shards given: {spec!r}")
    urls: list[str] = []
    for part in parts:
        if _REMOTE_RE.match(part):
            urls.extend(_expand_braces(part))
        elif os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in folder {part!r}")
            urls.extend(found)
        elif any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise FileNotFoundError(f"no shards match {part!r}")
            urls.extend(found)
        else:
            expanded = _expand_braces(part)
            missing = [p for p in expanded if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{len(missing)} shard(s) of {part!r} not found, first: {missing[0]!r}")
            urls.extend(expanded)
    return urls


def is_unsafe_member_name(name: str) -> bool:
    """A tar member name that would land outside the folder it is extracted to (absolute, ``..``, a drive)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":") or "\0" in name


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset convention: the key is the path up to the first dot of the file name, the rest is the field."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _open_url(url: str):
    if _REMOTE_RE.match(url):
        import webdataset

        return webdataset.gopen(url, "rb")
    return open(url, "rb")


def _ends_with_eof_block(path: str, offset: int) -> bool:
    """A complete tar has a zero block where reading stopped; tarfile stops silently on a truncated header."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not any(block)


def iter_tar_records(url: str, counts: Counter[str], count_tar_errors: bool = True) -> Iterator[dict[str, Any]]:
    """Yield raw records ``{"__key__", "__url__", ext: bytes}`` of one shard; a broken tar ends it, counted."""
    current: dict[str, Any] | None = None
    broken = False
    try:
        with _open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if is_unsafe_member_name(member.name):
                    # Keys name output files downstream (sample folders, conversions): never let one escape.
                    counts["unsafe_name"] += 1
                    continue
                split = _split_name(member.name)
                if split is None:
                    continue
                key, ext = split
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            if not _REMOTE_RE.match(url) and getattr(tar.fileobj, "comptype", "tar") == "tar":
                broken = not _ends_with_eof_block(url, tar.offset)
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError):
        broken = True
    if broken:
        # The record being read when the tar broke may be incomplete, so it is dropped with the rest of the shard.
        if count_tar_errors:
            counts["corrupt_tar"] += 1
        return
    if current is not None:
        yield current


def iter_raw_records(urls: Iterable[str], counts: Counter[str]) -> Iterator[dict[str, Any]]:
    for url in urls:
        yield from iter_tar_records(url, counts)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: EXIF rotation applied, transparency composited on white, 16-bit/float scaled to 8 bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif image.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so corruption raises here, not later) and convert to RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (antialiased bicubic), then centre-crop to (size, size)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def prepare_image(image: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> float32 (3, size, size) in [-1, 1], exactly as training batches are prepared."""
    return image_to_tensor(resize_center_crop(to_rgb(image), size))


def _record_text(record: dict[str, Any], counts: Counter[str]) -> tuple[str, dict[str, Any] | None] | None:
    """(caption from txt, attributes from json) of a record, or None (counted) when it has no usable caption."""
    attrs = None
    if "json" in record:
        try:
            attrs = json.loads(record["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            counts["bad_json"] += 1
        if not isinstance(attrs, dict):
            attrs = None
    ext = next((e for e in CAPTION_EXTS if e in record), None)
    if ext is None:
        # Attribute files written by the shapes generator carry the caption too.
        canonical = attrs.get("canonical") if attrs else None
        if isinstance(canonical, str) and canonical.strip():
            return " ".join(canonical.split()), attrs
        counts["no_caption"] += 1
        return None
    try:
        caption = record[ext].decode("utf-8")
    except UnicodeDecodeError:
        counts["bad_utf8"] += 1
        return None
    caption = " ".join(caption.split())
    if not caption:
        counts["empty_caption"] += 1
        return None
    return caption, attrs


_RIGHT_OR_BELOW = re.compile(r"\b(?:right of|below)\b")


def left_first_phrasings(phrasings: list[str]) -> list[str]:
    """The phrasings that name the left (or upper) object first: no "right of" / "below" (all of them when every
    phrasing has one, or none has a relation)."""
    return [p for p in phrasings if not _RIGHT_OR_BELOW.search(p)] or phrasings


def _phrasings(attrs: dict[str, Any] | None) -> list[str]:
    captions = attrs.get("captions") if attrs else None
    if not isinstance(captions, list):
        return []
    return [" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()]


def _record_image(record: dict[str, Any], counts: Counter[str]) -> Image.Image | None:
    ext = next((e for e in IMAGE_EXTS if e in record), None)
    if ext is None:
        counts["no_image"] += 1
        return None
    try:
        return decode_image(record[ext])
    except Exception:
        # PIL raises many exception types for bad bytes (OSError, SyntaxError, ValueError, DecompressionBombError...).
        counts["corrupt_image"] += 1
        return None


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle with a bounded buffer: emit a random element once the buffer is full."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """Samples ``{"pixel_values": (3, H, W) in [-1, 1], "input_ids": (L,), "caption", "key", "skips"}`` from shards.

    Shards are split across distributed ranks and DataLoader workers (or, with fewer shards than consumers, every
    consumer reads all shards and keeps every n-th record). With ``shuffle_buffer > 1`` the shard order is shuffled
    per epoch and samples pass a shuffle buffer; everything is seeded by (seed, epoch, consumer), so a run is
    reproducible. Images are never flipped: a flip would falsify "left of" captions.

    A record with precomputed latents yields ``"latents"`` (and ``"latents_std"``), float32 ``(C, h, w)``, instead of
    ``"pixel_values"``; with ``latent_shape`` set, records of another shape are skipped as ``corrupt_latents``.

    ``skip_batches`` resumes an endless stream: the first that many batches of ``batch_size`` that a DataLoader
    over this dataset would yield (in this process) are replayed without being built. DataLoader hands batch i to
    worker ``i % num_workers``, so each worker takes over a rotated role and skips that role's share; the replay reads and decodes the records (that is
    how bad ones are told apart) but does not resize or tokenize them.
    """

    def __init__(
        self,
        urls: str | list[str],
        tokenizer,
        image_size: int,
        max_length: int,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        repeat: bool = True,
        caption_choice: str = "random",
        text_task_phrasings: str = "all",
        rank: int | None = None,
        world_size: int | None = None,
        skip_batches: int = 0,
        batch_size: int = 1,
        latent_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if caption_choice not in ("random", "txt"):
            raise ValueError(f"caption_choice must be 'random' or 'txt', got {caption_choice!r}")
        if text_task_phrasings not in TEXT_TASK_PHRASINGS:
            raise ValueError(f"text_task_phrasings must be one of {TEXT_TASK_PHRASINGS}, got {text_task_phrasings!r}")
        self.text_task_phrasings = text_task_phrasings
        self.urls = expand_urls(urls)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.caption_choice = caption_choice
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.stats = SkipStats()
        self.skip_batches = skip_batches
        self.batch_size = batch_size
        self.latent_shape = latent_shape

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of a finite (repeat=False) pass; with repeat=True epochs advance by themselves."""
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        """(role, num_workers) of this DataLoader worker. A resumed DataLoader fetches its first batch from worker 0,
        which originally made batch ``skip_batches``, so workers take over the roles rotated by that much."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return (worker + self.skip_batches) % workers, workers

    def _consumer(self) -> tuple[int, int]:
        rank, world = _distributed_rank()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        role, workers = self._worker()
        return rank * workers + role, world * workers

    def _records(self, epoch: int, consumer: int, consumers: int, counts: Counter[str]) -> Iterator[dict[str, Any]]:
        shards = list(self.urls)
        if self.shuffle_buffer > 1:
            # Same shard order on every consumer, so the per-consumer slices partition the shards.
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(shards)
        if len(shards) >= consumers:
            yield from iter_raw_records(shards[consumer::consumers], counts)
            return
        for url in shards:
            # Every consumer reads these shards; only one of them reports a broken tar.
            records = iter_tar_records(url, counts, count_tar_errors=consumer == 0)
            for index, record in enumerate(records):
                if index % consumers == consumer:
                    yield record

    def _samples_to_skip(self) -> int:
        role, workers = self._worker()
        batches = self.skip_batches // workers + (1 if role < self.skip_batches % workers else 0)
        return batches * self.batch_size

    def _select(
        self, record: dict[str, Any], rng: random.Random, counts: Counter[str]
    ) -> tuple[Image.Image | dict[str, torch.Tensor], str] | None:
        """(decoded image or latents, chosen caption) of a usable record, or None (counted); draws from `rng` once
        per usable record with phrasings, so that a replay (resume) stays in step with the original run."""
        text = _record_text(record, counts)
        if text is None:
            return None
        caption, attrs = text
        if LATENTS_EXT in record:
            image = read_latent_record(record, counts, self.latent_shape)
        else:
            image = _record_image(record, counts)
        if image is None:
            return None
        phrasings = _phrasings(attrs)
        if self.caption_choice == "random" and phrasings:
            caption = rng.choice(phrasings)
        text_caption = None
        if self.text_task_phrasings == "left_first":  # every sample gets one, so that any batch can stack them
            text_caption = caption
            if phrasings:  # records without phrasings (a plain .txt caption) keep their caption
                ordered = left_first_phrasings(phrasings)
                text_caption = rng.choice(ordered) if self.caption_choice == "random" else ordered[0]
        return image, caption, text_caption

    def _process(self, record: dict[str, Any], rng: random.Random, counts: Counter[str]) -> dict[str, Any] | None:
        selected = self._select(record, rng, counts)
        if selected is None:
            return None
        image, caption, text_caption = selected
        ids, truncated = encode_captions(self.tokenizer, [caption], self.max_length)
        if bool(truncated[0]):
            counts["truncated"] += 1
        sample = {"input_ids": ids[0], "caption": caption, "key": record["__key__"]}
        if text_caption is not None:
            sample["text_input_ids"] = encode_captions(self.tokenizer, [text_caption], self.max_length)[0][0]
        if isinstance(image, dict):
            return sample | image
        return sample | {"pixel_values": image_to_tensor(resize_center_crop(image, self.image_size))}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self._consumer()
        epoch = self.epoch
        counts: Counter[str] = Counter()
        to_skip = self._samples_to_skip()
        while True:
            rng = random.Random(f"samples-{self.seed}-{epoch}-{consumer}")
            records = self._records(epoch, consumer, consumers, counts)
            if self.shuffle_buffer > 1:
                records = _buffer_shuffle(records, self.shuffle_buffer, rng)
            yielded = 0
            for record in records:
                if to_skip:
                    if self._select(record, rng, counts) is not None:
                        # Counts up to a replayed sample were reported before the checkpoint; later ones are new.
                        to_skip, yielded = to_skip - 1, yielded + 1
                        counts.clear()
                    continue
                sample = self._process(record, rng, counts)
                if sample is None:
                    continue
                sample["skips"] = dict(counts)
                self.stats.accumulate(counts)
                counts.clear()
                yielded += 1
                yield sample
            if not self.repeat:
                break
            if yielded == 0:
                raise RuntimeError(
                    f"consumer {consumer}/{consumers} found no valid sample in {len(self.urls)} shard(s) "
                    f"(skipped: {dict(counts)}); check the shards or use fewer workers"
                )
            epoch += 1
        if counts:
            # Counts after the last sample travel in a sample-less item that collate_batch drops.
            self.stats.accumulate(counts)
            yield {"skips": dict(counts)}


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into ``{"pixel_values": (B, 3, H, W), "input_ids": (B, L), "captions", "keys", "skips"}``.

    Latent samples give ``"latents"`` (and ``"latents_std"``) ``(B, C, h, w)`` instead of pixel values. Skip counts
    of all items are summed; sample-less items (end-of-stream counts) only contribute counts, so the last batch of a
    finite stream may be smaller, even empty (B = 0).
    """
    skips: Counter[str] = Counter()
    real = []
    for sample in samples:
        skips.update(sample.get("skips", {}))
        if "input_ids" in sample:
            real.append(sample)
    batch = {
        "input_ids": torch.stack([s["input_ids"] for s in real]) if real else torch.zeros(0, 0, dtype=torch.long),
        **(
            {"text_input_ids": torch.stack([s["text_input_ids"] for s in real])}
            if real and "text_input_ids" in real[0]
            else {}
        ),
        "captions": [s["caption"] for s in real],
        "keys": [s["key"] for s in real],
        "skips": dict(skips),
    }
    if not real:
        return {"pixel_values": torch.zeros(0, 3, 0, 0), **batch}
    kinds = {"latents" if "latents" in s else "pixel_values" for s in real}
    if len(kinds) > 1:
        raise ValueError("a batch mixes image records and precomputed-latent records: keep them in separate shards")
    names = ["latents", "latents_std"] if "latents" in kinds else ["pixel_values"]
    return {name: torch.stack([s[name] for s in real]) for name in names if all(name in s for s in real)} | batch


def make_dataloader(
    urls: str | list[str],
    tokenizer,
    image_size: int,
    max_length: int,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    repeat: bool = True,
    shuffle_buffer: int = 1000,
    caption_choice: str = "random",
    text_task_phrasings: str = "all",
    drop_last: bool = True,
    skip_batches: int = 0,
    latent_shape: tuple[int, int, int] | None = None,
) -> DataLoader:
    """DataLoader over :class:`ShardDataset` yielding :func:`collate_batch` batches.

    With ``repeat=True`` the stream is endless and every batch has exactly ``batch_size`` samples; it is a pure
    function of (shards, seed, process rank, num_workers), and ``skip_batches=n`` starts it at its n-th batch
    (training resumes this way). With ``repeat=False`` each worker's last batch may be short (or, with
    ``drop_last``, dropped with its skip counts). ``latent_shape`` (C, h, w) is the shape latent records must have.
    """
    if skip_batches and not repeat:
        raise ValueError("skip_batches is only defined for an endless (repeat=True) stream")
    dataset = ShardDataset(
        urls,
        tokenizer,
        image_size,
        max_length,
        shuffle_buffer,
        seed,
        repeat,
        caption_choice,
        text_task_phrasings,
        skip_batches=skip_batches,
        batch_size=batch_size,
        latent_shape=latent_shape,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_batch,
        drop_last=drop_last,
        persistent_workers=False,
    )


def iterate_records(
    urls: str | list[str], stats: SkipStats | None = None, decode: bool = True
) -> Iterator[tuple[str, Image.Image | None, str, dict[str, Any] | None]]:
    """Yield ``(key, RGB image at its own size, txt caption, attributes or None)`` in shard order, for evaluation.

    Bad records are skipped and counted into ``stats``. With ``decode=False`` the image is None (not even checked).
    """
    for url in expand_urls(urls):
        counts: Counter[str] = Counter()
        for record in iter_tar_records(url, counts):
            text = _record_text(record, counts)
            if text is None:
                continue
            image = _record_image(record, counts) if decode else None
            if decode and image is None:
                continue
            yield record["__key__"], image, text[0], text[1]
            if stats is not None:
                stats.accumulate(counts)
                counts.clear()
        if stats is not None:
            stats.accumulate(counts)


def read_captions(urls: str | list[str], stats: SkipStats | None = None) -> list[str]:
    """All captions of the shards: each txt plus every phrasing in a json "captions" list (images not decoded)."""
    captions: list[str] = []
    for _key, _image, caption, attrs in iterate_records(urls, stats=stats, decode=False):
        captions.append(caption)
        captions.extend(_phrasings(attrs))
    return captions
