"""How mmdiff's models meet diffusers' and accelerate's hooks (offload, layerwise casting), which wrap `forward` only."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn


def offload_entry_point(method):
    """Let diffusers' and accelerate's offload hooks see a model method other than `forward`.

    The pipelines call `encode_text`, `context_kv`, `null_outputs`, ... directly, and those read the model's own
    parameters (position tables, null contexts). Offload hooks only wrap `forward`: model CPU offload would leave the
    model on the CPU, sequential offload would leave its root parameters on the meta device. Like diffusers'
    `apply_forward_hook` (which does this for `AutoencoderKL.encode`/`decode`), this runs the model's accelerate hook
    first, and onloads the root group of diffusers' group offloading. Submodules keep their own hooks, which their
    `forward` runs.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)
        registry = getattr(self, "_diffusers_hook", None)
        group = registry.get_hook("group_offloading") if registry is not None else None
        if group is not None and getattr(group, "group", None) is not None:
            group.group.onload_()
        return method(self, *args, **kwargs)

    return wrapper


# diffusers' step-caching hooks (`enable_cache`) skip or reuse a block's computation but leave its weights alone
CACHE_HOOK_PREFIXES = ("fbc_", "taylorseer_")


def weights_under_hooks(module: nn.Module) -> bool:
    """Whether diffusers' or accelerate's hooks manage `module`'s weights (layerwise casting, any offload): its
    weights are then in their compute dtype and on the device only inside each submodule's `forward`. A registry
    that holds only cache hooks (or none, after `disable_cache`) does not count."""
    return any(_manages_weights(m) for m in module.modules())


def _manages_weights(module: nn.Module) -> bool:
    if hasattr(module, "_hf_hook"):
        return True
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and any(not name.startswith(CACHE_HOOK_PREFIXES) for name in registry.hooks)


def input_device(module: torch.nn.Module, tensor: torch.Tensor) -> torch.device:
    """Where `module`'s inputs go: its device, or where `tensor` already is while offload hooks hold its weights off
    the device (sequential offload keeps them on the meta device and moves inputs itself)."""
    device = module.device
    return tensor.device if device.type == "meta" else device
