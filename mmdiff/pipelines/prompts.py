"""Prompts and prompt embeddings as the text-to-image pipeline takes them: lists, given encoder outputs and their
masks, repeated and padded rows."""

from __future__ import annotations

import torch


def as_prompt_list(prompt: str | list[str] | None, batch: int | None = None, name: str = "prompt") -> list[str]:
    """None -> [""] * batch (unconditional), a string -> [prompt] * batch, a non-empty list of strings as is; with
    `batch` given, a list must have exactly `batch` entries."""
    if prompt is None:
        return [""] * (batch or 1)
    if isinstance(prompt, str):
        return [prompt] * (batch or 1)
    if not isinstance(prompt, list | tuple) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{name} is an empty list; pass None or '' for unconditional samples")
    if batch is not None and len(prompt) != batch:
        raise ValueError(f"{name} has {len(prompt)} entries for {batch} prompts")
    return list(prompt)


def check_embeds(name: str, embeds: object, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Given text-encoder outputs: a finite float (B, S, E) tensor and a (B, S) mask (all ones when not given)."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.ndim != 3:
        shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name} must be a float tensor (batch, tokens, width), got {shape}")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{name} must be finite: it holds NaN or inf")
    if mask is None:
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"the attention mask of {name} must have shape {tuple(embeds.shape[:2])}, got {shape}")
    return embeds, mask.bool()


def repeat_rows(embeds: torch.Tensor, mask: torch.Tensor, times: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row `times` times in a row (prompt i's images are rows i*times..(i+1)*times-1)."""
    if times == 1:
        return embeds, mask
    return embeds.repeat_interleave(times, dim=0), mask.repeat_interleave(times, dim=0)


def pad_context(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a context (N, S, D) and its key mask (N, S) to `length` with masked-out zeros."""
    pad = length - context.shape[1]
    if pad <= 0:
        return context, mask
    return torch.nn.functional.pad(context, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad), value=False)
