"""Precomputed VAE latents: encode image shards once (``mmdiff data latents``) and train from them.

A latent shard keeps each record's caption (``txt``) and attributes (``json``) and replaces its image by the VAE
posterior of the training crop, in the scaled latent space of :func:`~mmdiff.models.vae.encode_latents`:
``latents.npy`` is the mean ``(mean - shift_factor) * scaling_factor`` and ``latents_std.npy`` the standard deviation
``std * scaling_factor``, both ``(C, h, w)``. The trainer samples ``mean + std * eps`` with the per-batch generator,
drawing ``eps`` exactly as an on-the-fly encode does, or takes the mean (``vae.sample_posterior=false``), so both
paths train on the same latents. ``latents_meta.json`` beside the shards identifies the VAE (config and weights hashes,
scale, shift) and the resolution, and training refuses latents that another VAE or image size produced.

Arrays are written with ``np.save`` and read only with ``np.load(..., allow_pickle=False)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from mmdiff.data.images import prepare_image
from mmdiff.data.shards import SkipStats, expand_urls, iterate_records
from mmdiff.data.writer import ShardSink
from mmdiff.hub import resolve_pretrained
from mmdiff.models.vae import encode_posterior, load_vae, vae_downsample_factor

LATENTS_EXT = "latents.npy"
LATENTS_STD_EXT = "latents_std.npy"
META_FILE = "latents_meta.json"
FORMAT = "mmdiff-latents-1"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


class LatentsMismatchError(ValueError):
    """Precomputed latents made by another VAE, or at another resolution, than the one training uses."""


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a numeric array (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_latent_record(
    record: dict[str, Any], counts: Counter[str], latent_shape: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor] | None:
    """``{"latents": (C, h, w)[, "latents_std": (C, h, w)]}`` (float32) of a raw latent record, or None.

    A record is skipped and counted as ``corrupt_latents`` when a member is not a readable ``.npy`` (pickled object
    arrays included), not a finite 3-d float array, the two shapes differ, or the shape is not ``latent_shape``.
    """
    arrays: dict[str, torch.Tensor] = {}
    for ext, name in ((LATENTS_EXT, "latents"), (LATENTS_STD_EXT, "latents_std")):
        if ext not in record:
            continue
        try:
            array = np.load(io.BytesIO(record[ext]), allow_pickle=False)
        except (ValueError, EOFError, OSError, MemoryError):  # bad header, truncated data, pickled objects
            counts["corrupt_latents"] += 1
            return None
        if array.dtype.kind != "f" or array.ndim != 3 or not np.isfinite(array).all():
            counts["corrupt_latents"] += 1
            return None
        arrays[name] = torch.from_numpy(array.astype(np.float32))
    shape = tuple(arrays["latents"].shape) if "latents" in arrays else None
    std_shape = tuple(arrays["latents_std"].shape) if "latents_std" in arrays else shape
    if shape is None or std_shape != shape or (latent_shape is not None and shape != tuple(latent_shape)):
        counts["corrupt_latents"] += 1
        return None
    return arrays


def latents_from_batch(
    batch: dict[str, Any], device: torch.device | str, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Training latents ``(B, C, h, w)`` from a batch of precomputed latents: a posterior sample or the mean.

    The sample is ``mean + std * eps`` with ``eps`` drawn from ``generator`` with the shape, device and dtype that
    ``encode_latents`` uses, so a run from latents consumes the per-batch generator exactly like a run from images.
    """
    mean = batch["latents"].to(device)
    if not sample:
        return mean
    if "latents_std" not in batch:
        raise ValueError("these latent shards store no latents_std.npy: set vae.sample_posterior=false to use the mean")
    std = batch["latents_std"].to(device)
    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def vae_fingerprint(vae) -> dict[str, Any]:
    """What decides the latents a VAE makes: architecture and weights hashes, scale, shift and latent geometry.

    ``config_sha256`` hashes the public config without the two latent constants, which are compared by value.
    """
    config = {
        k: v for k, v in vae.config.items() if not k.startswith("_") and k not in ("scaling_factor", "shift_factor")
    }
    weights = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    shift = vae.config.shift_factor
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": 0.0 if shift is None else float(shift),
        "latent_channels": int(vae.config.latent_channels),
        "downsample_factor": vae_downsample_factor(vae),
    }


def _expected_shape(fingerprint: dict[str, Any], image_size: int) -> list[int]:
    factor = fingerprint["downsample_factor"]
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
    return [fingerprint["latent_channels"], image_size // factor, image_size // factor]


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@torch.no_grad()
def encode_shards_to_latents(
    src_shards: str | os.PathLike | Iterable[str],
    vae_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int,
    batch_size: int = 64,
    shard_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Encode every usable record of image-caption shards into latent shards ``out_dir/shard-NNNNNN.tar``.

    Images are prepared exactly as training prepares them (:func:`~mmdiff.data.images.prepare_image` at
    ``image_size``) and encoded in batches of ``batch_size`` by the VAE in float32; bad records are skipped and counted
    as the loader counts them. ``shard_size=None`` writes one latent shard per input shard (same record order, so a
    run from latents reads its data in the same order as a run from images); otherwise ``shard_size`` records each.
    ``dtype`` (float16 | float32) is the storage type. ``latents_meta.json`` is written last, so a folder without
    it is incomplete. Returns ``{"written", "skipped", "shards", "latent_shape", "out_dir", ...}``.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    urls = expand_urls(src_shards)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(os.path.isfile(u) and Path(u).resolve().parent == out_dir.resolve() for u in urls):
        # ShardSink clears shard-*.tar in its folder first: that must never be the input.
        raise ValueError(f"--out {out_dir} holds input shards; write the latents to another folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(resolve_pretrained(vae_path, what="VAE")).to(device).requires_grad_(False).eval()
    fingerprint = vae_fingerprint(vae)
    latent_shape = _expected_shape(fingerprint, image_size)
    storage = STORAGE_DTYPES[dtype]

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # an interrupted run must not look complete
    sink = ShardSink(out_dir, shard_size or sys.maxsize)
    stats = SkipStats()
    pending: list[tuple[str, str, dict[str, Any] | None, torch.Tensor]] = []
    bar = tqdm(desc="latents", unit="img", disable=None)

    def encode_pending() -> None:
        if not pending:
            return
        mean, std = encode_posterior(vae, torch.stack([p[3] for p in pending]))  # (B, C, h, w) each
        if list(mean.shape[1:]) != latent_shape:
            raise ValueError(f"the VAE made latents of shape {list(mean.shape[1:])}, expected {latent_shape}")
        for (key, caption, attrs, _), m, s in zip(pending, mean.float().cpu().numpy(), std.float().cpu().numpy()):
            sample = {
                "__key__": key,
                "txt": caption.encode("utf-8"),
                LATENTS_EXT: npy_bytes(m.astype(storage)),
                LATENTS_STD_EXT: npy_bytes(s.astype(storage)),
            }
            if attrs is not None:
                sample["json"] = json.dumps(attrs, sort_keys=True).encode("utf-8")
            sink.add(sample)
        bar.update(len(pending))
        pending.clear()

    for url in urls:
        for key, image, caption, attrs in iterate_records(url, stats):
            pending.append((key, caption, attrs, prepare_image(image, image_size)))
            if len(pending) == batch_size:
                encode_pending()
        if shard_size is None:
            encode_pending()
            sink.flush()
    encode_pending()
    sink.flush()
    bar.close()
    meta = {
        "format": FORMAT,
        "vae": {"path": str(Path(vae_path).resolve()), **fingerprint},
        "image_size": image_size,
        "latent_shape": latent_shape,
        "dtype": dtype,
        "members": {"mean": LATENTS_EXT, "std": LATENTS_STD_EXT},
        "written": sink.count,
        "skipped": stats.as_dict(),
        "shards": [Path(p).name for p in sink.shards],
        "sources": urls,
    }
    _write_json_atomically(out_dir / META_FILE, meta)
    return {k: meta[k] for k in ("written", "skipped", "shards", "latent_shape", "dtype")} | {"out_dir": str(out_dir)}


def read_latents_meta(spec: str | os.PathLike | Iterable[str]) -> dict[str, Any]:
    """The ``latents_meta.json`` of latent shards (a folder, pattern or list, as the loader takes them).

    Every folder the shards are in must hold one, and all must name the same VAE, image size and latent shape.
    Raises FileNotFoundError naming the missing file, ValueError for remote shards or disagreeing folders.
    """
    urls = expand_urls(spec)
    if not all(os.path.isfile(u) for u in urls):
        raise ValueError("precomputed latent shards must be local files (their latents_meta.json is checked)")
    metas = []
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls}):
        path = Path(folder, META_FILE)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: latent shards need the meta file `mmdiff data latents` writes last "
                "(is the folder incomplete, or does it hold image shards?)"
            )
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        metas.append(meta | {"folder": folder})
    identity = ("vae", "image_size", "latent_shape")
    for other in metas[1:]:
        if any(_comparable(other[k]) != _comparable(metas[0][k]) for k in identity):
            raise ValueError(f"latent shards in {metas[0]['folder']} and {other['folder']} come from different VAEs")
    return metas[0]


def _comparable(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "path"} if isinstance(value, dict) else value


def check_latents_match(meta: dict[str, Any], vae, image_size: int, vae_source: str) -> tuple[int, int, int]:
    """Refuse latents that the training VAE ``vae`` (loaded from ``vae_source``) at ``image_size`` would not make.

    Returns the latent shape ``(C, h, w)`` records must have. Raises :class:`LatentsMismatchError` naming both
    VAEs and every difference (scaling factor, shift, architecture or weights hash, latent shape).
    """
    ours = vae_fingerprint(vae)
    theirs = meta["vae"]
    problems = []
    for key in ("scaling_factor", "shift_factor", "config_sha256", "weights_sha256"):
        if theirs.get(key) != ours[key]:
            a, b = (str(v)[:12] if key.endswith("sha256") else v for v in (theirs.get(key), ours[key]))
            problems.append(f"{key} {a} (latents) != {b} (training)")
    expected = _expected_shape(ours, image_size)
    if list(meta["latent_shape"]) != expected:
        problems.append(
            f"latent shape {meta['latent_shape']} at image_size {meta['image_size']} (latents) != {expected} at "
            f"data.image_size={image_size} (training)"
        )
    if problems:
        raise LatentsMismatchError(
            f"the precomputed latents in {meta.get('folder', '?')} were encoded with VAE {theirs.get('path')}, "
            f"but training uses VAE {vae_source}: {'; '.join(problems)}. Re-encode them with `mmdiff data latents "
            f"--shards <image shards> --vae {vae_source} --image-size {image_size} --out <folder>`"
        )
    return tuple(expected)
