"""Timing and memory measurement: contenders alternated after warm-up, medians, peak memory of one step."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Contender:
    """One side of a comparison: `run()` does one unit of work (a training step, a sampling call) on `device`.

    units: how many images (or captions) one `run()` produces, for the per-second rate.
    flops: model FLOPs of one `run()` (see `flops.py`), or None when not counted.
    """

    name: str
    run: Callable[[], object]
    units: int
    device: torch.device
    flops: float | None = None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a wall-clock interval covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(contenders: list[Contender], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per `run()` of each contender: `warmup` untimed runs each, then `repeats` rounds of one timed run each.

    The contenders take turns inside every round, and the order is reversed on odd rounds, so that a slow drift of
    the machine (another process, clock boost, thermal) hits every contender alike instead of whichever ran last.
    """
    for contender in contenders:
        for _ in range(warmup):
            contender.run()
        synchronize(contender.device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for round_index in range(repeats):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            synchronize(contender.device)
            start = time.perf_counter()
            contender.run()
            synchronize(contender.device)
            times[contender.name].append(time.perf_counter() - start)
    return times


def paired_ratio(base_seconds: list[float], seconds: list[float]) -> float:
    """Median over rounds of base time / contender time within one round (how much faster the contender is).

    The contenders alternate inside every round, so a slow drift of the machine hits both halves of a pair alike;
    the ratio of the two medians (the headline) does not pair them and moves more with such noise. Reported next to
    it as a check: when the two disagree, the run was noisy."""
    if len(base_seconds) != len(seconds) or not seconds:
        raise ValueError(f"paired_ratio needs the same number of rounds, got {len(base_seconds)} and {len(seconds)}")
    return statistics.median(b / s for b, s in zip(base_seconds, seconds, strict=True))


def summarize(contender: Contender, seconds: list[float]) -> dict:
    """Median seconds, units per second, the spread, and achieved FLOP/s when the contender's FLOPs are counted
    (`mmdiff bench` adds the utilisation once the device's peak is measured)."""
    median = statistics.median(seconds)
    record = {
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "times_s": seconds,
        "per_s": contender.units / median,
    }
    if contender.flops is not None:
        record["tflops_per_s"] = contender.flops / median / 1e12
    return record


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one `run()` above what was allocated before it, in MiB.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (tensor memory, exact). CPU: the rise of the process' peak
    resident set (VmHWM) over the RSS before the call. Freed heap memory that glibc keeps would hide the rise, so it
    is returned to the OS first (`malloc_trim`), and the kernel's peak counter is reset through /proc/self/clear_refs;
    where that is not allowed, a sampling thread polls the RSS instead (it can miss short spikes).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _malloc_trim()
    before = _rss_bytes()
    if _reset_peak_rss():
        run()
        return max(_peak_rss_bytes() - before, 0) / 2**20
    with _RssSampler() as sampler:
        run()
    return max(sampler.peak - before, 0) / 2**20


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks (up to 32 MiB each) for reuse instead of unmapping them; True when applied.

    PyTorch's CPU allocator takes tensors straight from malloc, and glibc serves large blocks with mmap and unmaps
    them on free, so each step faults its activations in again. How many depends on the order of allocations, not on
    the work: in cpu-small training steps this varied from 1,400 to 12,600 minor faults per step between runs and
    contenders, enough to move a ratio by 5%. With the thresholds raised both contenders reuse their memory and the
    count drops to ~0 after warm-up. A no-op off glibc (macOS, musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to clear_refs); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _peak_rss_bytes() <= _rss_bytes() + 1024 * 1024
    except OSError:
        return False


class _RssSampler:
    """Polls the RSS every millisecond in a thread (torch kernels release the GIL, so it runs during them)."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
