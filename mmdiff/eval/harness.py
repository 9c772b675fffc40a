"""The skeleton every evaluation command shares (`mmdiff eval`, `sweep`, `eval-samplers`): the records read from
the shards, the benchmark they belong to, the pipeline, its sample settings filled from the folder, the feature spaces
and the header each JSON record starts with. `EvalRun.open` builds it once; each command adds only its own work.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipelines.factory import load_pipeline
from .benchmarks import Benchmark, find_benchmark
from .features.spaces import resolve_encoders
from .records import EvalRecords, load_eval_records, require_records


@dataclass
class EvalRun:
    """One evaluation run: what it was given (`model`, `val_shards`) and what it loaded from them.

    model: the pipeline folder (or pipeline object) evaluated; pipe: the loaded pipeline. records: the shards' first
    records (as many as the run needs); benchmark: the dataset benchmark they belong to, or None (generic metrics
    only). spaces / notes: the feature spaces (`feature_spaces`) and what resolving them had to say.
    """

    model: Any
    val_shards: str | list[str]
    records: EvalRecords
    benchmark: Benchmark | None
    pipe: Any
    started: float = field(default_factory=time.time)
    spaces: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        model,
        val_shards: str | list[str],
        num_records: int,
        required: int | None = None,
        what: str = "",
        device: str | None = None,
        scheduler: str | None = None,
    ) -> EvalRun:
        """Read `num_records` records (at least `required` of them, or a ValueError naming `what`), find their
        benchmark and load the pipeline (`load_pipeline`: a folder, hub id or pipeline object)."""
        started = time.time()
        records = load_eval_records(val_shards, num_records)
        if required is not None:
            require_records(records, required, what)
        benchmark = find_benchmark(records)
        pipe = load_pipeline(model, device=device, scheduler=scheduler, progress=False)
        return cls(model, val_shards, records, benchmark, pipe, started)

    def sample_settings(self, **given) -> dict[str, Any]:
        """The sample settings given, those left unset filled from the folder's saved ones (recorded resolved)."""
        return self.pipe.fill_sample_settings(**given)

    def caption_sampler(self, caption_steps: int | None, given: dict[str, Any] | None) -> dict[str, Any]:
        return effective_caption_sampler(self.pipe, caption_steps, given)

    def feature_spaces(self, encoder, clip, inception, images, prompts) -> dict[str, Any]:
        """Resolve the feature spaces of the generic metrics (`resolve_encoders`: the given encoder, open_clip and
        Inception, else the benchmark's shipped encoder) for images of the pipeline's size; kept for the header."""
        self.spaces, self.notes = resolve_encoders(
            encoder, clip, inception, self.benchmark, str(self.pipe._execution_device), self.pipe.image_size,
            images, prompts,
        )  # fmt: skip
        return self.spaces

    def header(self) -> dict[str, Any]:
        """What every record starts with: the model, the command line, the data, the benchmark, the feature spaces,
        the notes, the records skipped and the library versions."""
        return {
            "model": model_name(self.model),
            "command": shlex.join(sys.argv),
            "val_shards": self.val_shards,
            "benchmark": self.benchmark.name if self.benchmark else None,
            "encoders": {name: enc.name for name, enc in self.spaces.items()},
            "notes": self.notes,
            "skipped_records": self.records.skipped,
            "versions": versions(),
        }

    def seconds(self) -> float:
        return round(time.time() - self.started, 1)


def model_name(model) -> str:
    """The folder a model was loaded from, or the pipeline class when an object was passed."""
    return str(model) if isinstance(model, str | os.PathLike) else type(model).__name__


def effective_caption_sampler(pipe, caption_steps: int | None, given: dict[str, Any] | None) -> dict[str, Any]:
    """The caption sampler a run uses, for its record: the options given, else the K-step schedule when caption steps
    are given, else the text scheduler's configured sampler with its parameter."""
    if given:
        return dict(given)
    if caption_steps is not None:
        return {"sampler": "schedule", "num_inference_steps": caption_steps}
    config = pipe.text_scheduler.config
    parameter = {"entropy": "entropy_bound", "threshold": "threshold"}.get(config.sampler)
    sampler = {"sampler": config.sampler, **({parameter: config[parameter]} if parameter else {})}
    if config.sampler == "schedule":
        sampler["num_inference_steps"] = pipe.default_caption_steps()
    return sampler


def check_counts(**counts: int) -> None:
    """Every sample count must be a positive integer (a count of 0 would divide by zero in the averages)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Strict JSON (NaN and infinities become null, numpy scalars plain numbers), parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(value), indent=1, default=_json_default, allow_nan=False))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def versions() -> dict[str, str]:
    """The versions of torch, diffusers and mmdiff, for a record."""
    from importlib.metadata import PackageNotFoundError, version

    import diffusers

    try:
        mmdiff_version = version("mmdiff")
    except PackageNotFoundError:  # run from a source tree that is not installed
        mmdiff_version = ""
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "mmdiff": mmdiff_version,
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
