"""The blocks' cross-attention contexts for one forward of a classifier-free-guidance batch, prepared in one place.

The model's plain `forward(sample, t, context, mask)` is the reference computation. Everything that makes guidance
cheap is decided here and handed to it as one `PreparedContext`, so each block still reads `x = block(x, c, context)`:
- cached keys/values (or the absorbed form, `AbsorbedContext`) of a context that is fixed for a sampling call;
- null rows: the first rows of the batch are on the learned null context; with a one-token null context their
  cross-attention output is one constant per block, with a longer one its keys/values are merged with the others';
- repeated rows: the batch is `cat([sample[repeat], sample])`, so what comes before the first cross-attention runs once
  per distinct row.
Each fast path equals the plain computation (tests/test_model.py pins every one of them).
"""

from __future__ import annotations

import torch

from ..models.blocks import AbsorbedContext, BlockContext
from ..models.transformer import ContextCache, MMDiffTransformer2DModel, PreparedContext


def prepare_context(
    model: MMDiffTransformer2DModel,
    sample: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    *,
    context: torch.Tensor | None = None,
    kv: list[ContextCache] | None = None,
    null_rows: int = 0,
    null_outputs: list[torch.Tensor] | None = None,
    repeat: torch.Tensor | None = None,
) -> PreparedContext:
    """The `PreparedContext` for `model(sample, t, prepared=...)`.

    Args:
        sample: the noisy stream of the forward (its distinct rows when `repeat` is given); float latents are the image
            task (their condition is text), token ids the text task (conditioned on images).
        context_mask: (M, S) key mask of the context rows.
        context: (M, S, D) the context of the rows that are not null rows; or `kv`, its `model.context_kv(...)` cache.
        null_rows: how many rows come first on the learned null context (M + null_rows rows in all).
        null_outputs: `model.null_outputs(kind)` computed once per sampling call (computed here otherwise).
        repeat: (K,) indices into `sample`: the batch is `cat([sample[repeat], sample])`.
    """
    batch = sample.shape[0]
    if repeat is not None:
        repeat = torch.as_tensor(repeat, dtype=torch.long).reshape(-1)
        # checked on the host only: on an accelerator the check would sync every sampling step (indexing still fails
        # there on a bad index, less readably)
        if repeat.device.type == "cpu" and repeat.numel():
            if not (0 <= int(repeat.min()) and int(repeat.max()) < batch):
                raise ValueError(f"repeat must index the {batch} rows of sample, got {repeat.tolist()}")
        repeat = repeat.to(sample.device)
        batch += repeat.numel()
    if kv is None:
        if context is None:
            raise ValueError("prepare_context needs the context or its context_kv cache")
        kv = model.context_kv(
            context, context_mask, absorb=model.absorb_pays(context.shape[1], query_tokens(model, sample))
        )
    per_block = [None] * len(model.blocks)
    if null_rows:
        kv, context_mask, per_block = _with_null_rows(model, sample, null_rows, batch, kv, context_mask, null_outputs)
    blocks = [BlockContext(entry, context_mask, null) for entry, null in zip(kv, per_block, strict=True)]
    blocks[0].repeat = repeat
    return PreparedContext(blocks, repeat)


def query_tokens(model: MMDiffTransformer2DModel, sample: torch.Tensor) -> int:
    """Tokens the noisy stream has in the blocks: caption length, or latent patches."""
    if not torch.is_floating_point(sample):
        return sample.shape[1]
    p = model.config.patch_size
    return (sample.shape[-2] // p) * (sample.shape[-1] // p)


def _with_null_rows(
    model: MMDiffTransformer2DModel,
    sample: torch.Tensor,
    null_rows: int,
    batch: int,
    kv: list[ContextCache],
    context_mask: torch.Tensor | None,
    null_outputs: list[torch.Tensor] | None,
) -> tuple[list[ContextCache], torch.Tensor | None, list[torch.Tensor | None]]:
    """K/V, mask and per-block null outputs for a batch whose first `null_rows` rows use the null context."""
    rows = kv[0][0].shape[0]
    if not isinstance(null_rows, int) or null_rows < 0 or null_rows + rows != batch:
        raise ValueError(
            f"null_rows={null_rows} plus the context's {rows} rows must equal the batch of {batch} samples"
        )
    kind = "image" if not torch.is_floating_point(sample) else "text"  # captions are conditioned on images
    per_block = null_outputs or model.null_outputs(kind)
    n_null = (model.null_text_context if kind == "text" else model.null_image_context).shape[0]
    if n_null == 1:  # the shortcut: one constant per block
        return kv, context_mask, per_block
    if isinstance(kv[0], AbsorbedContext):
        raise ValueError(
            f"a {n_null}-token null context is attended to with the other rows' keys and values; build the cache "
            "with context_kv(..., absorb=False)"
        )
    # a longer null context: attended to like any other context, its K/V (one row, expanded) before the others
    length = kv[0][0].shape[2]
    if context_mask is None:
        context_mask = torch.ones(rows, length, dtype=torch.bool, device=kv[0][0].device)
    width = max(length, n_null)

    def padded(t: torch.Tensor, num: int) -> torch.Tensor:  # (R, H, num, d) -> (R, H, width, d)
        return torch.nn.functional.pad(t, (0, 0, 0, width - num)) if width > num else t

    merged = [
        tuple(
            torch.cat([padded(null_kv[i].expand(null_rows, -1, -1, -1), n_null), padded(entry[i], length)])
            for i in (0, 1)
        )
        for null_kv, entry in zip(per_block, kv, strict=True)
    ]
    null_mask = torch.zeros(null_rows, width, dtype=torch.bool, device=context_mask.device)
    null_mask[:, :n_null] = True
    mask = torch.cat([null_mask, torch.nn.functional.pad(context_mask, (0, width - length), value=False)])
    return merged, mask, [None] * len(model.blocks)
