"""Reading webdataset shards: shard lists, the records of a tar with bad ones skipped and counted, record fields.

Shards are plain webdataset tars (``key.png``/``key.jpg``/``key.webp`` + ``key.txt`` [+ ``key.json``]; img2dataset's
tars as they are, the caption read from the json when a record has no txt), or latent shards with
precomputed VAE latents (``key.latents.npy``, see ``latents.py``) in place of the image. A shard is read by
webdataset's own tar stages: ``tariterators.tar_file_expander`` turns the tar stream into files and
``tariterators.group_by_keys`` groups them into records ``{"__key__", "__url__", ext: bytes}`` (the key is the path
up to the first dot of the file name); their handlers count what goes wrong instead of raising. Bad records never
crash a run: they are skipped and counted by reason (:data:`SKIP_REASONS`, accumulated in :class:`SkipStats`).

Things webdataset does not do are added around its stages: member names that would escape an extraction folder are
skipped and counted (``select_files``); a shard whose tar ends anywhere but at its end-of-archive block counts as
broken (:class:`_BlockReader`), its last, possibly incomplete record dropped; a shard with no file at all (a 0-byte
file, a tar of only end blocks) is counted as ``empty_shard``; http(s) shards are read with a read timeout and a
bounded retry (``remote.py``), and one that fails for good is a counted ``network_error`` that ends the shard, with a
warning naming the url and the error. Captions are cut to :data:`MAX_CAPTION_BYTES` at read time (counted as
``truncated``) and images larger than ``images.MAX_IMAGE_PIXELS`` are skipped before they are decoded
(``oversized_image``), so no single record can take a process's memory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import webdataset
from PIL import Image
from webdataset import tariterators

from mmdiff.data.images import ImageTooLargeError, decode_image
from mmdiff.data.remote import HttpShard, RemoteOptions, RemoteShardError, is_http_url

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "image")
CAPTION_EXTS = ("txt", "caption", "text")
SKIP_REASONS = tuple(
    "corrupt_image corrupt_tar bad_utf8 empty_caption no_image no_caption bad_json truncated unsafe_name "
    "corrupt_latents network_error oversized_image empty_shard".split()
)
# Bytes of a caption kept at read time (the rest is cut at a word boundary and the record counted as "truncated"):
# far more than any max_length needs, small enough that a hostile 50 MB caption costs nothing to tokenize.
MAX_CAPTION_BYTES = 4096
# A record's attribute json larger than this is ignored and counted as bad_json (its phrasings would be tokenized).
MAX_JSON_BYTES = 1 << 20
# What reading a broken shard raises; anything else (a bug, MemoryError) is not a bad shard and propagates.
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)
_BRACE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
REMOTE_RE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")
_BLOCK = tarfile.BLOCKSIZE
_END_BLOCK = bytes(_BLOCK)


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
    # Not webdataset's expand_urls: it has no folders, globs or missing-file errors, and splits lists on "::".
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    else:
        parts = [str(p) for p in spec]
    if not parts:
        raise ValueError(f"no shards given: {spec!r}")
    urls: list[str] = []
    for part in parts:
        if REMOTE_RE.match(part):
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


def open_shard(url: str, remote: RemoteOptions | None = None):
    """A binary stream of a shard: local paths are opened as files (whatever characters they hold), http(s) urls by
    :class:`~mmdiff.data.remote.HttpShard` (a read timeout and bounded retries, ``remote``), other remote urls
    (``pipe:``, ``s3://``...) by :func:`webdataset.gopen`."""
    if is_http_url(url):
        return HttpShard(url, remote)
    return webdataset.gopen(url, "rb") if REMOTE_RE.match(url) else open(url, "rb")


class _BlockReader:
    """The raw stream of a shard, handed to tarfile one 512-byte block per read, so that the block tarfile read last
    is known. tarfile stops silently at a truncated, empty or invalid header (only one at offset 0 raises), and
    webdataset's ``tar_file_iterator`` keeps the TarFile (whose offset would tell) to itself; a tar is complete only
    when tarfile stopped at an all-zero block, the end-of-archive marker. tarfile's stream buffer (``_Stream``) reads
    whole blocks from here and consumes whole blocks up to every header, so the last block read is that header.
    Compressed tars are passed through in large reads and not checked (their block boundaries are not the file's).
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.compressed: bool | None = None
        self.last = b""
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        if self.compressed:
            data = self.stream.read(size)
            self.bytes_read += len(data)
            return data
        block = self.stream.read(_BLOCK)
        while block and len(block) < _BLOCK:  # a pipe may return less before its end
            more = self.stream.read(_BLOCK - len(block))
            if not more:
                break
            block += more
        self.bytes_read += len(block)
        if self.compressed is None:  # the magic numbers tarfile's "r|*" mode detects
            bz2 = block[:3] == b"BZh" and block[4:10] == b"1AY&SY"
            self.compressed = bz2 or block.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ"))
        self.last = block
        return block

    @property
    def complete(self) -> bool:
        """Whether the tar ended at its end-of-archive block (call once tarfile has stopped reading)."""
        return bool(self.compressed) or self.last == _END_BLOCK


def _keep_first_member(exn: Exception) -> bool:
    """group_by_keys handler: a member name repeated within a record keeps its first copy (it raises ValueError)."""
    if isinstance(exn, ValueError):
        return True
    raise exn


def read_shard(
    url: str,
    counts: Counter[str],
    count_tar_errors: bool = True,
    remote: RemoteOptions | None = None,
    errors: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the raw records ``{"__key__", "__url__", ext: bytes}`` of one shard; bad shards are counted once each.

    A broken tar ends the shard, counted as ``corrupt_tar``; an http(s) shard whose server stalls or fails for good
    (after the timeout and retries of ``remote``) ends it as ``network_error``, with a warning naming the url and the
    error (also appended to ``errors``); a shard with no file at all counts as ``empty_shard``. The shard-level
    counts are left out when ``count_tar_errors`` is false (a shard read by several consumers reports them once).
    Member names that would escape an extraction folder are skipped and counted as ``unsafe_name``.
    """
    broken = ended = False
    stream: _BlockReader | None = None
    network: str | None = None
    seen = 0  # file members of the tar, bad names included

    def on_tar_error(exn: Exception) -> bool:
        nonlocal broken
        if not isinstance(exn, TAR_ERRORS):
            raise exn
        broken = True
        return False  # stop reading this shard

    def select(name: str) -> bool:
        nonlocal seen
        seen += 1
        if is_unsafe_member_name(name):
            # Keys name output files downstream (sample folders, conversions): never let one escape.
            counts["unsafe_name"] += 1
            return False
        return True

    def files(stream: _BlockReader) -> Iterator[dict[str, Any]]:
        nonlocal ended
        source = [{"url": url, "stream": stream}]
        for item in tariterators.tar_file_expander(source, handler=on_tar_error, select_files=select):
            if item:  # webdataset >= 1.0 ends each shard with {}; only one shard is read here
                yield item
        ended = True

    try:
        with open_shard(url, remote) as raw:
            stream = _BlockReader(raw)
            for record in tariterators.group_by_keys(files(stream), handler=_keep_first_member):
                if ended and (broken or not stream.complete):
                    # The record in progress when the tar broke may be incomplete: dropped with the rest of the shard.
                    broken = True
                    break
                yield record
            broken = broken or not stream.complete
            # tarfile may swallow the stream's error and just stop: the stream itself says why it gave up.
            network = getattr(raw, "failure", None)
    except RemoteShardError as err:  # the server could not be reached (or failed on closing)
        network = str(err)
    except OSError:  # opening or closing the shard (a missing file, a failed pipe command)
        broken = True
    if not count_tar_errors:
        return
    if network is not None:
        counts["network_error"] += 1
        if errors is not None:
            errors.append(network)
        warnings.warn(f"{network}; the rest of the shard is skipped (counted as network_error)", RuntimeWarning, 2)
    elif stream is not None and not seen and (stream.bytes_read == 0 or not broken):
        counts["empty_shard"] += 1
    elif broken:
        counts["corrupt_tar"] += 1


def cap_caption_bytes(raw: bytes, limit: int | None = None) -> tuple[bytes, bool]:
    """(the first ``limit`` bytes of a caption at most, whether it was cut); default limit :data:`MAX_CAPTION_BYTES`.

    The cut falls at the last whitespace within the limit, so no word is split; a caption without one is cut at the
    start of a UTF-8 character, so a multi-byte character cut in half never reads as bad UTF-8.
    """
    limit = MAX_CAPTION_BYTES if limit is None else limit
    if len(raw) <= limit:
        return raw, False
    head = raw[:limit]
    if raw[limit : limit + 1].isspace() and head.strip():  # the limit falls between two words
        return head.rstrip(), True
    space = max(head.rfind(c) for c in (b" ", b"\t", b"\n", b"\r"))
    if space > 0 and head[:space].strip():
        return head[:space], True
    end = limit
    while end > 0 and raw[end] & 0xC0 == 0x80:  # a continuation byte: the character began before the cut
        end -= 1
    return raw[:end], True


def _cap_text(text: str) -> str:
    """A caption string cut as :func:`cap_caption_bytes` cuts bytes (phrasings and captions from the json)."""
    if len(text) <= MAX_CAPTION_BYTES // 4:  # no character takes more than 4 bytes in UTF-8
        return text
    return cap_caption_bytes(text.encode("utf-8"))[0].decode("utf-8")


def record_caption(record: dict[str, Any], counts: Counter[str]) -> tuple[str, dict[str, Any] | None] | None:
    """(caption from txt, attributes from json) of a record, or None (counted) when it has no usable caption.

    Without a txt, the json's "canonical" (the shapes generator) or "caption" (img2dataset) is the caption; the json's
    other keys are kept as attributes and otherwise ignored.

    A caption over :data:`MAX_CAPTION_BYTES` is cut there (:func:`cap_caption_bytes`) and counted as ``truncated``
    before it is decoded, so an enormous one costs nothing downstream; an attribute json over
    :data:`MAX_JSON_BYTES` is not parsed (``bad_json``).
    """
    attrs = None
    if "json" in record:
        try:
            if len(record["json"]) > MAX_JSON_BYTES:
                raise ValueError("attribute json too large")
            attrs = json.loads(record["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):  # json.JSONDecodeError is a ValueError
            counts["bad_json"] += 1
        if not isinstance(attrs, dict):
            attrs = None
    ext = next((e for e in CAPTION_EXTS if e in record), None)
    if ext is None:
        # Attribute files carry the caption too: the shapes generator's "canonical", img2dataset's "caption".
        for name in ("canonical", "caption"):
            text = attrs.get(name) if attrs else None
            if isinstance(text, str) and text.strip():
                return " ".join(_cap_text(text).split()), attrs
        counts["no_caption"] += 1
        return None
    raw, cut = cap_caption_bytes(record[ext])
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["bad_utf8"] += 1
        return None
    caption = " ".join(caption.split())
    if not caption:
        counts["empty_caption"] += 1
        return None
    if cut:
        counts["truncated"] += 1
    return caption, attrs


def record_phrasings(attrs: dict[str, Any] | None) -> list[str]:
    """The alternative phrasings of a record's caption: its attributes' ``"captions"`` list, whitespace-normalised
    and each cut to :data:`MAX_CAPTION_BYTES`."""
    captions = attrs.get("captions") if attrs else None
    if not isinstance(captions, list):
        return []
    return [" ".join(_cap_text(c).split()) for c in captions if isinstance(c, str) and c.strip()]


def record_image(record: dict[str, Any], counts: Counter[str]) -> Image.Image | None:
    """The decoded RGB image of a record, or None (counted as ``no_image`` / ``corrupt_image``, or
    ``oversized_image`` when its header gives more than ``images.MAX_IMAGE_PIXELS``: checked before decoding)."""
    ext = next((e for e in IMAGE_EXTS if e in record), None)
    if ext is None:
        counts["no_image"] += 1
        return None
    try:
        return decode_image(record[ext])
    except (ImageTooLargeError, Image.DecompressionBombError):
        counts["oversized_image"] += 1
        return None
    except Exception:
        # PIL raises many exception types for bad bytes (OSError, SyntaxError, ValueError...).
        counts["corrupt_image"] += 1
        return None


def iterate_records(
    urls: str | list[str], stats: SkipStats | None = None, decode: bool = True, remote: RemoteOptions | None = None
) -> Iterator[tuple[str, Image.Image | None, str, dict[str, Any] | None]]:
    """Yield ``(key, RGB image at its own size, txt caption, attributes or None)`` in shard order, for evaluation.

    Bad records are skipped and counted into ``stats``. With ``decode=False`` the image is None (not even checked).
    ``remote``: how http(s) shards are read (timeout, retries; see ``remote.py``).
    """
    for url in expand_urls(urls):
        counts: Counter[str] = Counter()
        for record in read_shard(url, counts, remote=remote):
            text = record_caption(record, counts)
            if text is None:
                continue
            image = record_image(record, counts) if decode else None
            if decode and image is None:
                continue
            yield record["__key__"], image, text[0], text[1]
            if stats is not None:
                stats.accumulate(counts)
                counts.clear()
        if stats is not None:
            stats.accumulate(counts)


def read_captions(
    urls: str | list[str], stats: SkipStats | None = None, remote: RemoteOptions | None = None
) -> list[str]:
    """All captions of the shards: each txt plus every phrasing in a json "captions" list (images not decoded), each
    cut to :data:`MAX_CAPTION_BYTES`."""
    captions: list[str] = []
    for _key, _image, caption, attrs in iterate_records(urls, stats=stats, decode=False, remote=remote):
        captions.append(caption)
        captions.extend(record_phrasings(attrs))
    return captions
