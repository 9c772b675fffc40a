"""What lets a killed run continue as if it had never stopped.

A resumed run must end with the same weights as an uninterrupted one. The pieces that make that true:

- all per-step randomness (noise, timesteps, masks, condition dropout, the VAE posterior sample) comes from a
  generator seeded by (seed, rank, batch index), so no global RNG stream has to be restored exactly;
- the data stream is a pure function of the seed and resumes by replaying the batches already consumed;
- optimizer, LR schedule, EMA, step and skip counts live in the checkpoint (safetensors + JSON only);
- `metrics.jsonl` is trimmed back to the checkpoint's step, so a replayed step is not logged twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from ..data.shards import SKIP_REASONS, SkipStats
from .checkpoint import CheckpointError, list_checkpoints, load_training_state


class NonFiniteLossError(FloatingPointError, ValueError):
    """A NaN or Inf loss or gradient with `train.on_nonfinite=stop` (a ValueError too, so the CLI reports it)."""


def step_generator(seed: int, rank: int, batch_index: int, device: torch.device | str) -> torch.Generator:
    """The generator for one micro-batch: a pure function of (seed, rank, batch index), which makes resuming exact.

    Hashing (rather than seed + index) keeps the streams of neighbouring seeds and ranks unrelated.
    """
    digest = hashlib.blake2b(f"mmdiff-{seed}-{rank}-{batch_index}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any; decisions that skip a collective must agree everywhere."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def skip_counts_per_process(accelerator: Accelerator, skips: SkipStats) -> list[list[int]]:
    """Each process's skip counts (rows in `SKIP_REASONS` order), gathered on every process."""
    local = torch.tensor([[skips.counts.get(r, 0) for r in SKIP_REASONS]], dtype=torch.long, device=accelerator.device)
    return accelerator.gather(local).cpu().tolist() if accelerator.num_processes > 1 else local.cpu().tolist()


def total_skips(per_process: list[list[int]]) -> dict[str, int]:
    """Per-kind totals over all processes, only the kinds that occurred."""
    totals = {reason: sum(row[i] for row in per_process) for i, reason in enumerate(SKIP_REASONS)}
    return {reason: n for reason, n in totals.items() if n}


def load_latest_training_state(
    ckpt_root: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer, say
) -> tuple[dict, Path] | tuple[None, None]:
    """Load the newest checkpoint that reads back completely; returns (extra, folder) or (None, None).

    An unreadable checkpoint (a truncated file after a disk fault) is reported and the next older one is tried; a
    checkpoint that does not fit the configured model is an error (CheckpointMismatchError), not skipped.
    """
    for folder in reversed(list_checkpoints(ckpt_root)):
        try:
            return load_training_state(folder / "training_state", model, ema, optimizer), folder
        except CheckpointError as err:
            say(f"warning: cannot resume from {folder}: {err}; trying an older checkpoint")
    return None, None


def trim_metrics(path: Path, keep_through_step: int | None) -> None:
    """Drop metric records after the resumed step (they will be recomputed) and any line cut short by a kill.

    `keep_through_step=None` (a fresh start) empties the log. Rewritten atomically (write, fsync, rename).
    """
    if not path.is_file():
        return
    kept = []
    if keep_through_step is not None:
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= keep_through_step:
                kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.writelines(line + "\n" for line in kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
