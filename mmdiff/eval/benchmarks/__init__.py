"""Dataset-specific benchmarks: exact scores where a dataset's attributes are known, on top of the generic metrics.

`mmdiff eval` and `mmdiff sweep` always compute the generic metrics (any image-caption data) and add the scores of
the first benchmark whose `matches(records)` is true. To add one, write a `Benchmark` subclass in a folder of its
own here (see `shapes/`: the benchmark with its detector, diversity and caption scores beside it) and add an instance
to the tuple in `find_benchmark`. A benchmark may import the harness (`mmdiff.eval`) and the feature spaces
(`mmdiff.eval.features`); neither imports a benchmark, except the harness through `find_benchmark`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from PIL import Image

from ..records import EvalRecords


class Benchmark(ABC):
    """The interface of a dataset-specific benchmark; every method but `matches` may keep its default."""

    name: str = ""
    # a folder (relative to the repository) holding an eval encoder trained on this dataset: the default feature
    # space for the generic metrics when the user gives none
    default_encoder: str | None = None

    @abstractmethod
    def matches(self, records: EvalRecords) -> bool:
        """Whether these records belong to the benchmark's dataset (every record must, for exact scores)."""

    def image_metrics(
        self, images: list[Image.Image], prompts: list[str], image_size: int, seed: int, samples_per_prompt: int = 1
    ) -> dict[str, Any]:
        """Exact text -> image scores of images[i] drawn for prompts[i]; with samples_per_prompt = K the images come
        as K consecutive samples per prompt (a sweep), which allows per-prompt diversity."""
        return {}

    def diversity_metrics(self, by_prompt: dict[str, list[Image.Image]], image_size: int, seed: int) -> dict[str, Any]:
        """Scores over several samples of each prompt (`mmdiff eval` draws them when `wants_diversity_samples`)."""
        return {}

    wants_diversity_samples: bool = False

    def caption_metrics(self, captions: list[str], records: EvalRecords) -> dict[str, Any]:
        """Exact image -> text scores of captions[i] for records[i]."""
        return {}

    def caption_probes(self, pipe, records: EvalRecords, model, batch_size: int) -> dict[str, Any]:
        """Extra image -> text probes that need the model (teacher-forced questions)."""
        return {}

    def nll_references(self, model, records: EvalRecords) -> tuple[list[str], str]:
        """The captions the NLL bound is taken on and their name (default: each record's prompt)."""
        return list(records.prompts), "prompts"


def find_benchmark(records: EvalRecords) -> Benchmark | None:
    """The first benchmark that matches the records, or None (generic metrics only)."""
    from .shapes import ShapesBenchmark

    for benchmark in (ShapesBenchmark(),):
        if benchmark.matches(records):
            return benchmark
    return None


__all__ = ["Benchmark", "find_benchmark"]
