"""The one way every command opens a pipeline: folder or object, device, dtype, scheduler, compile, progress bar."""

from __future__ import annotations

import os

import torch
from diffusers.utils import logging as diffusers_logging

from .common import MMDiffPipelineBase
from .schedulers import swap_scheduler
from .text_to_image import MMDiffTextToImagePipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str | None) -> str:
    """`device` when this machine has it (else a ValueError saying so); without one, cuda when available."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; give cpu, cuda, cuda:1, mps ...") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise ValueError(f"--device {device!r}: this machine has no {kind} device to run on; try --device cpu")
    return device


def load_pipeline(
    model: str | os.PathLike | MMDiffPipelineBase,
    cls: type[MMDiffPipelineBase] = MMDiffTextToImagePipeline,
    device: str | None = None,
    dtype: str = "float32",
    scheduler: str | None = None,
    compile: bool = False,
    progress: bool = True,
) -> MMDiffPipelineBase:
    """A `cls` pipeline from a saved folder (loaded safely, `MMDiffPipelineBase.from_pretrained`) on `device` in
    `dtype`, or an mmdiff pipeline object turned into a `cls` that shares its components (device and dtype as they
    are). `scheduler` swaps the image scheduler by name (`SCHEDULERS`); `compile` torch.compiles the transformer in
    place (same class, config and weights; the first call compiles); `progress` shows the sampling progress bar."""
    if isinstance(model, MMDiffPipelineBase):
        from .modes import sibling_pipeline

        pipe = sibling_pipeline(model, cls)
    elif isinstance(model, str | os.PathLike):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        target = pick_device(device)
        was_enabled = diffusers_logging.is_progress_bar_enabled()
        if not progress:  # diffusers' "Loading pipeline components" bar is global; restored below
            diffusers_logging.disable_progress_bar()
        try:
            # `dtype` is diffusers 0.42's spelling of `torch_dtype` (the old name still works, with a FutureWarning)
            pipe = cls.from_pretrained(model, dtype=DTYPES[dtype]).to(target)
        finally:
            if was_enabled:
                diffusers_logging.enable_progress_bar()
    else:
        raise TypeError(f"model must be a pipeline folder or an mmdiff pipeline, got {type(model).__name__}")
    pipe.set_progress_bar_config(disable=not progress)
    if compile:
        pipe.transformer.compile()
    if scheduler:
        swap_scheduler(pipe, scheduler)
    return pipe
