"""The training state a checkpoint carries besides weights and optimizer, and the hooks a caller passes in.

`TrainState` saves itself into a checkpoint's JSON (`to_checkpoint`) and loads itself back (`from_checkpoint`):
the step, the micro-batches consumed (where the data stream resumes), images seen, non-finite batches skipped and
the per-reason counts of skipped records on every process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.shards import SKIP_REASONS, SkipStats


@dataclass
class TrainState:
    step: int = 0
    batches_consumed: int = 0
    images_seen: int = 0
    nonfinite_skipped: int = 0
    skips: SkipStats = field(default_factory=SkipStats)

    def to_checkpoint(
        self, lr_scheduler: torch.optim.lr_scheduler.LRScheduler, skips_per_process: list[list[int]]
    ) -> dict:
        """The JSON part of a checkpoint (`skips_per_process`: every process's counts, `skip_counts_per_process`)."""
        return {
            "step": self.step,
            "lr_scheduler": lr_scheduler.state_dict(),
            "batches_consumed": self.batches_consumed,
            "images_seen": self.images_seen,
            "nonfinite_skipped": self.nonfinite_skipped,
            "num_processes": len(skips_per_process),
            "skip_reasons": list(SKIP_REASONS),
            "skips_per_process": skips_per_process,
        }

    @classmethod
    def from_checkpoint(cls, extra: dict, rank: int, world_size: int, grad_accum_steps: int) -> TrainState:
        """The state of process `rank` of `world_size` from a checkpoint's JSON; with another process count than
        the checkpoint's, rank 0 carries the skip totals."""
        step = extra["step"]
        return cls(
            step=step,
            batches_consumed=extra.get("batches_consumed", step * grad_accum_steps),
            images_seen=extra.get("images_seen", 0),
            nonfinite_skipped=extra.get("nonfinite_skipped", 0),
            skips=restore_skip_counts(extra, rank, world_size),
        )


def restore_skip_counts(extra: dict, rank: int, world_size: int) -> SkipStats:
    """This process's skip counts from a checkpoint; on a different process count rank 0 carries the totals."""
    stats = SkipStats()
    rows = extra.get("skips_per_process") or []
    reasons = extra.get("skip_reasons", list(SKIP_REASONS))
    if len(rows) == world_size:
        stats.accumulate(dict(zip(reasons, rows[rank], strict=True)))
    elif rank == 0:
        stats.accumulate({r: sum(row[i] for row in rows) for i, r in enumerate(reasons)})
    return stats


class TrainerHooks:
    """Points where a caller can watch or steer a run (tests use them to kill a run mid-save, or to compare the
    weights of DDP processes); the defaults do nothing. Pass an instance to `train(..., hooks=...)`."""

    def during_save(self, step: int, partial_checkpoint: Path, output_dir: Path) -> None:
        """Called after the training state of checkpoint `step` is written to its temporary folder and before its
        pipeline folder is."""

    def after_training(self, model: torch.nn.Module, rank: int) -> None:
        """Called on every process with the final (unwrapped) weights."""

    def make_evaluator(self, cfg, device: str) -> Callable[[object], dict] | None:
        """The in-training evaluation of `train.eval_encoder`, built once on the main process: called with the EMA
        weights' pipeline at every evaluation, it returns figures to log. The training core does not evaluate
        images itself: `mmdiff train` passes `mmdiff.eval.in_training.TrainingEvalHooks`, which builds one."""
        return None
