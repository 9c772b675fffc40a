"""Evaluation records from any image-caption shards: images, the prompt of each, and every reference caption.

This is the one place where `mmdiff eval` and `mmdiff sweep` read data, so they work on any shards that
`mmdiff data folder` (or the shapes generator, or any webdataset writer) produced: a record needs an image and a
caption (`.txt`, or a `.json` with a "canonical" caption). Where the `.json` lists several phrasings of the same
image ("captions"), all of them are references for the caption scores; the prompt is the "canonical" one when given,
else the `.txt`. Bad records are skipped and counted by reason, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mmdiff.data.shards import SkipStats, iterate_records


@dataclass
class EvalRecords:
    """N evaluation records in shard order. references[i] starts with prompts[i] and holds no duplicates."""

    shards: str | list[str]
    keys: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    attributes: list[dict[str, Any] | None] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> EvalRecords:
        """The first n records."""
        return self.slice(0, n)

    def slice(self, start: int, stop: int) -> EvalRecords:
        """Records start..stop-1 (the real-vs-real floor uses records after the evaluated ones)."""
        rows = range(start, min(stop, len(self)))
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        return EvalRecords(
            self.shards,
            pick(self.keys),
            pick(self.images),
            pick(self.prompts),
            pick(self.references),
            pick(self.attributes),
            dict(self.skipped),
        )


def _references(prompt: str, caption: str, attrs: dict[str, Any] | None) -> list[str]:
    phrasings = attrs.get("captions") if attrs else None
    extra = (
        [" ".join(p.split()) for p in phrasings if isinstance(p, str) and p.strip()]
        if isinstance(phrasings, list)
        else []
    )
    return list(dict.fromkeys([prompt, caption, *extra]))


def load_eval_records(shards: str | list[str], num: int | None = None) -> EvalRecords:
    """The first `num` usable records of `shards` (all of them with None).

    Raises ValueError naming the shards and what was skipped when no record has both a readable image and a caption
    (FileNotFoundError when the shards do not exist).
    """
    stats = SkipStats()
    records = EvalRecords(shards)
    for key, image, caption, attrs in iterate_records(shards, stats=stats):
        canonical = attrs.get("canonical") if attrs else None
        prompt = " ".join(canonical.split()) if isinstance(canonical, str) and canonical.strip() else caption
        records.keys.append(key)
        records.images.append(image)
        records.prompts.append(prompt)
        records.references.append(_references(prompt, caption, attrs))
        records.attributes.append(attrs)
        if num is not None and len(records) >= num:
            break
    records.skipped = {k: v for k, v in stats.counts.items() if v}
    if not records.images:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(records.skipped.items())) or "none"
        raise ValueError(
            f"{shards!r} holds no usable image-caption records (each needs an image and a .txt caption; skipped: "
            f"{skipped})"
        )
    return records


def require_records(records: EvalRecords, needed: int, what: str) -> None:
    """A clear error when the shards hold fewer records than a run asks for."""
    if len(records) < needed:
        raise ValueError(
            f"{records.shards!r} holds {len(records)} usable records; {what} needs {needed} (lower the counts or "
            "give more shards)"
        )
