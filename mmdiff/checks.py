"""The checks of numbers and files that every public entry point (pipelines, commands, the web page, configs) uses:
each failure is one ValueError/TypeError/FileNotFoundError that names the argument or file and what it accepts."""

from __future__ import annotations

import math
import numbers
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image


def shown_number(value: object) -> str:
    """A number for an error line: as it is, or its first digits and length when it is too long to read (10**400)."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def check_seed(name: str, seed: object, high: int = 2**64 - 1) -> int:
    """A seed in [0, high] as an int (torch.Generator.manual_seed takes up to 2**64 - 1; a caller that adds offsets
    to the seed passes less), or an error whose line stays short for a seed of 400 digits."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {type(seed).__name__}")
    if not 0 <= seed <= high:
        bits = (high + 1).bit_length() - 1
        shown_high = f"2**{bits} - 1" if high + 1 == 2**bits else shown_number(high)
        raise ValueError(f"{name} {shown_number(seed)} is out of range: it must lie in [0, {shown_high}]")
    return int(seed)


def check_text(name: str, text: object, limit: int | None = None) -> str:
    """A text argument as given, or a one-line error naming it: not a string, longer than `limit` characters, or
    holding what no tokenizer reads as text. A lone surrogate is what Python makes of argument bytes that are not
    UTF-8 (`surrogateescape`) and what a JSON request can send ("\\ud800"); tokenizers fail on it with an error that
    names no argument. Control characters other than tab and line breaks are refused too."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be text, got {type(text).__name__}")
    if limit is not None and len(text) > limit:
        raise ValueError(f"{name} is {len(text):,} characters long; at most {limit:,} are taken")
    for index, char in enumerate(text):
        kind = unicodedata.category(char)
        if kind == "Cs":
            raise ValueError(
                f"{name} holds a lone surrogate U+{ord(char):04X} at character {index}, bytes that are not UTF-8 "
                "text: give it as UTF-8 (check the terminal's or the script's encoding)"
            )
        if kind == "Cc" and char not in "\t\n\r":
            raise ValueError(
                f"{name} holds the control character U+{ord(char):04X} at character {index}: type plain text"
            )
    return text


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool: what every numeric pipeline argument accepts."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def finite_number(value: object) -> bool:
    """A real number that is finite (not NaN, not infinite, not an int too large for a float)."""
    return is_number(value) and _finite(value)


def check_number(name: str, value: object, low: float, high: float = math.inf, meaning: str = "") -> float:
    """`value` as a float when it is a finite number in [low, high]; otherwise an error naming the argument."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (_finite(value) and low <= value <= high):
        allowed = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number {allowed}{meaning}, got {value}")
    return float(value)


def check_steps(num_inference_steps: object, max_steps: int | None = None) -> int:
    """A positive whole number of steps (at most `max_steps`), as an int."""
    whole = isinstance(num_inference_steps, numbers.Integral) or (
        is_number(num_inference_steps) and _finite(num_inference_steps) and float(num_inference_steps).is_integer()
    )
    if not whole or isinstance(num_inference_steps, bool | np.bool_) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if max_steps is not None and num_inference_steps > max_steps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is more than the {max_steps} the scheduler can take"
        )
    return int(num_inference_steps)


def check_interval(name: str, interval: object) -> tuple[float, float] | None:
    """(t_low, t_high) with 0 <= t_low <= t_high <= 1 as floats, or None (the guidance interval, the remasking
    window)."""
    if interval is None:
        return None
    if (
        not isinstance(interval, list | tuple)
        or len(interval) != 2
        or not all(is_number(v) and _finite(v) for v in interval)
        or not 0.0 <= interval[0] <= interval[1] <= 1.0
    ):
        raise ValueError(f"{name} must be (t_low, t_high) with 0 <= t_low <= t_high <= 1, got {interval!r}")
    return float(interval[0]), float(interval[1])


def open_image_file(path: str | Path) -> PIL.Image.Image:
    """An image file, decoded in full now, so that a missing, empty, non-image or truncated file is one error naming
    the file (FileNotFoundError or ValueError) here, not a PIL traceback from inside a pipeline later."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give image files (.png, .jpg, ...)")
    if path.stat().st_size == 0:
        raise ValueError(f"image file {path} is empty")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read (a text file, or a format it does not know?)") from None
    except Exception as err:  # PIL raises many types for damaged files: OSError, SyntaxError, EOFError, ...
        raise ValueError(f"image file {path} is damaged: {type(err).__name__}: {err}") from None
    return image


# Sanity caps on sizes, each well above the largest real model so that no real configuration meets one: an absurd
# value (model.hidden_size=10**9) is refused with its key and cap before anything is built, not after gigabytes are
# allocated (10**9 timesteps took 2.3 GB) or inside torch. `mmdiff.config` applies them to training configs,
# `mmdiff.pipelines.loading` to saved folders.
SIZE_CAPS: dict[str, tuple[int, str]] = {
    "width": (65_536, "the widest real transformers are 16 384 (Llama 3.1 405B) and 18 432 (PaLM) wide"),
    "mlp_width": (262_144, "the widest real MLPs are 53 248 (Llama 3.1 405B) and 73 728 (PaLM) wide"),
    "mlp_ratio": (64, "real MLPs are 4 (or 8/3) times the width"),
    "depth": (1_024, "the deepest real transformers have 118 (PaLM) and 126 (Llama 3.1 405B) layers"),
    "heads": (4_096, "real models have at most 128 attention heads"),
    "vocabulary": (1_048_576, "the largest real vocabularies have 262 144 tokens (Gemma 3)"),
    "text_length": (65_536, "diffusion models read 77 (CLIP) to 512 (T5) prompt tokens"),
    "positions": (16_777_216, "the longest real text encoders take 10 485 760 positions (Llama 4 Scout)"),
    "channels": (16_384, "real VAE blocks are at most 512 channels wide, U-Net blocks 1 280, latents 4 to 128"),
    "image_size": (65_536, "real models make images of at most 4 096 pixels a side"),
    "patch_size": (1_024, "real models use patches of 1 to 32 pixels"),
    "timesteps": (100_000, "real noise schedules have 1 000 training steps (4 000 in improved DDPM)"),
    "batch_size": (1_048_576, "the largest real batches, 32 768 (CLIP), are spread over hundreds of GPUs"),
}


def over_cap(key: str, value: Any, kind: str) -> str | None:
    """Why `value` (a number or a list of numbers) of setting `key` exceeds the SIZE_CAPS entry `kind`, or None."""
    cap, real = SIZE_CAPS[kind]
    items = list(enumerate(value)) if isinstance(value, list | tuple) else [(None, value)]
    for index, item in items:
        if isinstance(item, int | float) and not isinstance(item, bool) and not item <= cap:  # NaN fails <= too
            where = key if index is None else f"{key}[{index}]"
            return f"{where}={shown_number(item)} is above the sanity cap {cap}: {real}"
    return None


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval`, written "[low, high)" etc. (see `mmdiff.config.RANGES`)."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return bool(above and below)  # Python ints of any size compare with floats without overflow
