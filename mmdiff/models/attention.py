"""Attention kernels: PyTorch SDPA by default, xformers when installed and usable, one call signature."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "math")
_backend = "sdpa"


def set_attention_backend(name: str) -> str:
    """Select the attention kernel for every mmdiff model in this process.

    "xformers" falls back to "sdpa" with a warning when the package is missing or has no kernels for this machine
    (its kernels are CUDA-only). Returns the backend actually in use.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "xformers" and not xformers_usable():
        logger.warning("xformers is not installed or has no CUDA device here; falling back to SDPA attention")
        name = "sdpa"
    _backend = name
    return _backend


def get_attention_backend() -> str:
    return _backend


def xformers_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # an ImportError, or a binary built for another torch
        return False
    return True


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """Multi-head attention.

    Args:
        q: (N, H, T, d) queries. k, v: (N, H, S, d).
        key_mask: (N, S) bool, True where the key may be attended to (a key padding mask), or None.
        slice_size: attention slicing (diffusers' `enable_attention_slicing`): the N x H (row, head) pairs are computed
            `slice_size` at a time, so the score matrix held at once is `slice_size` x T x S instead of N x H x T x S.
            None computes all at once. The result is the same either way.
    Returns:
        (N, H, T, d).
    """
    n, h = q.shape[:2]
    if slice_size is None or slice_size >= n * h:
        return _attention(q, k, v, key_mask)
    # (N, H, ...) -> (N*H, 1, ...): one "row" per (row, head) pair, each with its row's key mask
    flat = [x.reshape(n * h, 1, *x.shape[2:]) for x in (q, k, v)]
    mask = None if key_mask is None else key_mask.repeat_interleave(h, dim=0)  # (N*H, S)
    parts = [
        _attention(*(x[i : i + slice_size] for x in flat), None if mask is None else mask[i : i + slice_size])
        for i in range(0, n * h, slice_size)
    ]
    return torch.cat(parts).reshape(q.shape)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """`attention` without slicing, on the selected backend."""
    if _backend == "xformers" and q.is_cuda:
        return _xformers_attention(q, k, v, key_mask)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, S), broadcast over heads/queries
    if _backend == "math":
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _xformers_attention(q, k, v, key_mask):
    import xformers.ops as xops

    # xformers wants (N, T, H, d) and an additive bias
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    bias = None
    if key_mask is not None:
        n, s = key_mask.shape
        # the bias' last dim must be 8-aligned in memory for the cutlass kernels: allocate padded, then slice
        padded = (s + 7) // 8 * 8
        full = q.new_zeros(n, q.shape[2], q.shape[1], padded)
        full[..., :s] = torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :].to(q.dtype)
        bias = full[..., :s]
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return out.transpose(1, 2)
