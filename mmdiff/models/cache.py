"""diffusers' step-caching hooks on the DiT blocks (`transformer.enable_cache(...)`).

Two of diffusers' configs fit this model: `FirstBlockCacheConfig` (run block 0; when its residual barely changed
since the last full step, reuse the other blocks' residual) and `TaylorSeerCacheConfig` (refresh the attention outputs
every few steps, extrapolate them in between). Both find `model.blocks` by diffusers' own identifiers ("blocks");
first-block cache also needs the block's signature in diffusers' `TransformerBlockRegistry`, registered here.
Pyramid attention broadcast and FasterCache look for diffusers' `Attention` classes, which this model does not use:
they would hook nothing, so `check_cache_config` refuses them.

The hooks keep one state per `cache_context` name and compare tensors row by row, so a cached residual belongs to
the batch layout it was taken in; `CacheScope` names each forward's layout and resets the state when it changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

from .blocks import DiTBlock

SUPPORTED_CACHE_CONFIGS = (FirstBlockCacheConfig, TaylorSeerCacheConfig)


@dataclass
class _DiTBlockMetadata(TransformerBlockMetadata):
    """`DiTBlock.forward(x, cond, context)` returns the new x. First-block cache asks for its input by the literal
    name "hidden_states" (not `hidden_states_argument_name`): that name reads the block's `x`. The field is declared
    here too because diffusers before 0.37 has no `hidden_states_argument_name`."""

    hidden_states_argument_name: str = "x"

    def _get_parameter_from_args_kwargs(self, identifier: str, args=(), kwargs=None):
        if identifier == "hidden_states":
            identifier = self.hidden_states_argument_name
        return super()._get_parameter_from_args_kwargs(identifier, args, kwargs)


def register_blocks_for_cache() -> None:
    """Register `DiTBlock` with diffusers' block registry (again is harmless; the registry's first use imports
    diffusers' transformers, a few seconds, so it happens at `enable_cache`, not at import)."""
    TransformerBlockRegistry.register(
        model_class=DiTBlock,
        metadata=_DiTBlockMetadata(return_hidden_states_index=0),
    )


def check_cache_config(config) -> None:
    """Refuse a diffusers cache config whose hooks do not fit this model's blocks."""
    if not isinstance(config, SUPPORTED_CACHE_CONFIGS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_CACHE_CONFIGS)
        raise ValueError(
            f"{type(config).__name__} does not fit MMDiffTransformer2DModel (it looks for diffusers' attention or "
            f"block classes, and would hook nothing); the supported cache configs are {names}"
        )


class CacheScope:
    """The `cache_context` of each forward of one sampling call, named by the batch's row layout.

    A hook's cached tensors hold one row per batch row; when the layout changes (a guidance interval adds or drops the
    unconditional rows) they belong to other rows, so the hooks' state is reset and starts anew in the new layout.
    A new scope (one per sampling call) also starts anew. Without an enabled cache it does nothing.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layout: Hashable | None = None

    def __call__(self, layout: Hashable) -> contextlib.AbstractContextManager:
        """layout: what fixes the rows of this forward (e.g. the batch size and the unconditional rows)."""
        if not getattr(self.model, "is_cache_enabled", False):
            return contextlib.nullcontext()
        if layout != self.layout:
            self.model._reset_stateful_cache()  # diffusers' own pipelines reset it so, after each call
            self.layout = layout
        return self.model.cache_context(f"rows={layout}")
