"""The training and evaluation data stream: shards split over ranks and workers, shuffled, decoded and batched.

Each DataLoader worker of each process is one *consumer* and reads its own webdataset pipeline
(:class:`webdataset.DataPipeline`): the shard list (:class:`webdataset.SimpleShardList`, seeded per epoch), this
consumer's share of it (:func:`split_by_consumer`), the records of those shards (:func:`shard_records`, webdataset's
tar stages with bad records counted, see ``shards.py``) and a seeded shuffle buffer (:func:`buffer_shuffle`).
Bad records never crash a run: their counts cross DataLoader worker processes inside the samples themselves (each
sample carries the counts since the previous one) and :func:`collate_batch` sums them into ``batch["skips"]``.
http(s) shards are read with a read timeout and bounded retries (``remote``, a :class:`RemoteOptions`): a stalled or
dead server costs the rest of that shard (``network_error``, with a warning naming the url), never a hung run.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.images import image_to_tensor, resize_center_crop
from mmdiff.data.latents import LATENTS_EXT, read_latent_record
from mmdiff.data.remote import RemoteOptions, RemoteShardError
from mmdiff.data.shards import (
    SkipStats,
    expand_urls,
    read_shard,
    record_caption,
    record_image,
    record_phrasings,
)
from mmdiff.data.tokenizer import encode_captions

# Tokenizers warns (and disables itself) when a process forks after it used its thread pool; DataLoader workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@webdataset.pipelinefilter
def split_by_consumer(sources: Iterator[dict[str, Any]], consumer: int, consumers: int) -> Iterator[dict[str, Any]]:
    """Pipeline stage: this consumer's shards (``{"url"}`` items) out of every consumer's same shard list.

    Consumer ``c`` of ``n`` (rank x DataLoader workers) takes shards ``c, c + n, ...``, as webdataset's
    ``split_by_node`` / ``split_by_worker`` do, but in one step and with the consumer index the resume needs (a
    resumed DataLoader's workers take over rotated roles, see ``ShardDataset._worker``). With fewer shards than
    consumers every consumer reads every shard and keeps every n-th record of each (``"share"``), so no consumer
    stays empty.
    """
    shards = list(sources)
    if len(shards) >= consumers:
        yield from shards[consumer::consumers]
        return
    for shard in shards:
        yield {**shard, "share": (consumer, consumers)}


@webdataset.pipelinefilter
def shard_records(
    sources: Iterator[dict[str, Any]],
    counts: Counter[str],
    remote: RemoteOptions | None = None,
    errors: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: the raw records of the shards, bad ones counted into ``counts`` and network failures appended
    to ``errors`` (see :func:`read_shard`)."""
    for source in sources:
        share = source.get("share")
        if share is None:
            yield from read_shard(source["url"], counts, remote=remote, errors=errors)
            continue
        consumer, consumers = share
        # Every consumer reads a shared shard; only one of them reports a broken, empty or unreachable shard.
        shard = read_shard(source["url"], counts, count_tar_errors=consumer == 0, remote=remote, errors=errors)
        for index, record in enumerate(shard):
            if index % consumers == consumer:
                yield record


@webdataset.pipelinefilter
def buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Pipeline stage: approximate shuffle with a bounded buffer, emitting a random element once the buffer is full.

    Not ``webdataset.shuffle``: that one picks with its own buffer policy (an initial fill, two items taken per
    step), so it would reorder every existing run's data stream; this one keeps batches bit-identical to runs (and
    checkpoints) made before, and shares ``rng`` with the caption policy in the same order as they did.
    """
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
    """Samples ``{"pixel_values": (3, H, W) in [-1, 1], "input_ids": (L,), "target_ids": (L,), "caption", "key",
    "skips"}`` from shards.

    ``caption_policy`` chooses each record's captions (default: :class:`CaptionPolicy`, a random phrasing for both
    tasks): ``input_ids`` encode the caption the text -> image task conditions on (``"caption"``), ``target_ids``
    the caption the image -> text task learns to generate (the same ids under the default policy).

    Shards are split across distributed ranks and DataLoader workers (or, with fewer shards than consumers, every
    consumer reads all shards and keeps every n-th record). With ``shuffle_buffer > 1`` the shard order is shuffled
    per epoch and samples pass a shuffle buffer; everything is seeded by (seed, epoch, consumer), so a run is
    reproducible. Images are never flipped: a flip would falsify captions that name positions.

    A record with precomputed latents yields ``"latents"`` (and ``"latents_std"``), float32 ``(C, h, w)``, instead of
    ``"pixel_values"``; with ``latent_shape`` set, records of another shape are skipped as ``corrupt_latents``.

    ``remote`` sets how http(s) shards are read (read timeout, retries, backoff; default :class:`RemoteOptions`).

    ``skip_batches`` resumes an endless stream: the first that many batches of ``batch_size`` that a DataLoader
    over this dataset would yield (in this process) are replayed without being built. DataLoader hands batch i to
    worker ``i % num_workers``, so each worker takes over a rotated role and skips that role's share; the replay
    reads and decodes the records (that is how bad ones are told apart) and asks the caption policy (whose draws
    share the stream's rng), but does not resize or tokenize them.
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
        caption_policy: CaptionPolicy | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        skip_batches: int = 0,
        batch_size: int = 1,
        latent_shape: tuple[int, int, int] | None = None,
        remote: RemoteOptions | None = None,
    ) -> None:
        super().__init__()
        if caption_policy is not None and not isinstance(caption_policy, CaptionPolicy):
            raise TypeError(f"caption_policy must be a CaptionPolicy, got {caption_policy!r}")
        self.caption_policy = caption_policy or CaptionPolicy()
        self.urls = expand_urls(urls)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.stats = SkipStats()
        self.skip_batches = skip_batches
        self.batch_size = batch_size
        self.latent_shape = latent_shape
        self.remote = remote or RemoteOptions()

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

    def _records(
        self,
        epoch: int,
        consumer: int,
        consumers: int,
        counts: Counter[str],
        rng: random.Random,
        errors: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """One epoch of this consumer's raw records, as a webdataset pipeline (shards given up for a network error
        are appended to ``errors``)."""
        shuffle = self.shuffle_buffer > 1
        # Same shard order on every consumer, so the per-consumer slices partition the shards.
        stages = [
            webdataset.SimpleShardList(self.urls, seed=f"shards-{self.seed}-{epoch}" if shuffle else None),
            split_by_consumer(consumer, consumers),
            shard_records(counts, self.remote, errors),
        ]
        if shuffle:
            stages.append(buffer_shuffle(self.shuffle_buffer, rng))
        return iter(webdataset.DataPipeline(*stages))

    def _samples_to_skip(self) -> int:
        role, workers = self._worker()
        batches = self.skip_batches // workers + (1 if role < self.skip_batches % workers else 0)
        return batches * self.batch_size

    def _select(
        self, record: dict[str, Any], rng: random.Random, counts: Counter[str]
    ) -> tuple[Image.Image | dict[str, torch.Tensor], str, str] | None:
        """(decoded image or latents, input caption, target caption) of a usable record, or None (counted); the
        caption policy draws from `rng` for usable records only, so that a replay (resume) stays in step."""
        text = record_caption(record, counts)
        if text is None:
            return None
        caption, attrs = text
        if LATENTS_EXT in record:
            image = read_latent_record(record, counts, self.latent_shape)
        else:
            image = record_image(record, counts)
        if image is None:
            return None
        return image, *self.caption_policy.choose(caption, record_phrasings(attrs), rng)

    def _process(self, record: dict[str, Any], rng: random.Random, counts: Counter[str]) -> dict[str, Any] | None:
        cut_before = counts["truncated"]
        selected = self._select(record, rng, counts)
        if selected is None:
            return None
        image, caption, target = selected
        ids, truncated = encode_captions(self.tokenizer, [caption], self.max_length)
        if bool(truncated[0]) and counts["truncated"] == cut_before:  # a caption cut at read time counts once
            counts["truncated"] += 1
        target_ids = ids[0] if target == caption else encode_captions(self.tokenizer, [target], self.max_length)[0][0]
        sample = {"input_ids": ids[0], "target_ids": target_ids, "caption": caption, "key": record["__key__"]}
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
            yielded, network_errors = 0, []
            for record in self._records(epoch, consumer, consumers, counts, rng, network_errors):
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
                found = f"consumer {consumer}/{consumers} found no valid sample in {len(self.urls)} shard(s)"
                if network_errors:
                    raise RemoteShardError(
                        f"{found}: {network_errors[-1]}; check the network and the shard server "
                        f"(skipped: {dict(counts)})"
                    )
                raise RuntimeError(f"{found} (skipped: {dict(counts)}); check the shards or use fewer workers")
            epoch += 1
        if counts:
            # Counts after the last sample travel in a sample-less item that collate_batch drops.
            self.stats.accumulate(counts)
            yield {"skips": dict(counts)}


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into ``{"pixel_values": (B, 3, H, W), "input_ids": (B, L), "target_ids": (B, L), "captions",
    "keys", "skips"}``.

    ``input_ids`` are what the text -> image task conditions on, ``target_ids`` what the image -> text task learns
    to generate (see :class:`~mmdiff.data.captions.CaptionPolicy`). Latent samples give ``"latents"`` (and
    ``"latents_std"``) ``(B, C, h, w)`` instead of pixel values. Skip counts of all items are summed; sample-less
    items (end-of-stream counts) only contribute counts, so the last batch of a finite stream may be smaller, even
    empty (B = 0).
    """
    skips: Counter[str] = Counter()
    real = []
    for sample in samples:
        skips.update(sample.get("skips", {}))
        if "input_ids" in sample:
            real.append(sample)
    empty_ids = torch.zeros(0, 0, dtype=torch.long)
    batch = {
        "input_ids": torch.stack([s["input_ids"] for s in real]) if real else empty_ids,
        "target_ids": torch.stack([s.get("target_ids", s["input_ids"]) for s in real]) if real else empty_ids,
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
    caption_policy: CaptionPolicy | None = None,
    drop_last: bool = True,
    skip_batches: int = 0,
    latent_shape: tuple[int, int, int] | None = None,
    remote: RemoteOptions | None = None,
) -> DataLoader:
    """DataLoader over :class:`ShardDataset` yielding :func:`collate_batch` batches.

    With ``repeat=True`` the stream is endless and every batch has exactly ``batch_size`` samples; it is a pure
    function of (shards, seed, caption policy, process rank, num_workers), and ``skip_batches=n`` starts it at its
    n-th batch (training resumes this way). With ``repeat=False`` each worker's last batch may be short (or, with
    ``drop_last``, dropped with its skip counts). ``caption_policy`` chooses the captions of each task (default: a
    random phrasing for both; see ``policies.caption_policy`` for the configured one). ``latent_shape`` (C, h, w) is
    the shape latent records must have. ``remote`` (a :class:`RemoteOptions`) sets the read timeout and retries of
    http(s) shards.
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
        caption_policy,
        skip_batches=skip_batches,
        batch_size=batch_size,
        latent_shape=latent_shape,
        remote=remote,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_batch,
        drop_last=drop_last,
        persistent_workers=False,
    )
