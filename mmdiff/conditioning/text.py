"""Text conditioning: captions -> the context the image stream cross-attends to, for sampling and training alike.

A model is trained either with the jointly trained text encoder (the transformer's own, on the caption tokenizer's
ids) or with a frozen pretrained encoder (CLIP, T5, open_clip) whose hidden states the transformer projects. That
choice is made here once (`TextConditioner.frozen`); a dropped or empty prompt becomes the learned null context
through `MMDiffTransformer2DModel.drop_context`, in the pipeline and in
`guided.forward_with_dropout`.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ..data.tokenizer import clip_bpe_tokenizer, encode_captions
from ..models.text_encoders import encode_with_frozen_encoder
from ..models.transformer import MMDiffTransformer2DModel


def tokenize_for_frozen_encoder(
    tokenizer: PreTrainedTokenizerBase | None, prompts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts for a frozen encoder, padded/truncated to ``max_length``.

    ``tokenizer=None`` means the CLIP BPE tokenizer (the open_clip default vocabulary).

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(N, max_length)`` int64.
    """
    if tokenizer is None:
        tokenizer = clip_bpe_tokenizer()
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set one before tokenizing")
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def frozen_token_budget(text_encoder: torch.nn.Module, text_encoder_tokenizer=None) -> int:
    """Token budget of a frozen text encoder: its position limit, capped by its tokenizer's."""
    config = text_encoder.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "context_length", None) or 512
    if text_encoder_tokenizer is not None:
        limit = min(limit, text_encoder_tokenizer.model_max_length)
    return limit


class TextConditioner:
    """Captions -> text context (N, S, D) with its key mask (N, S).

    Args:
        tokenizer: the caption tokenizer (the jointly trained encoder reads its ids).
        text_encoder, text_encoder_tokenizer: a frozen encoder and its tokenizer (None: the joint encoder).
        frozen_max_length: tokens given to the frozen encoder (default: its own budget, `frozen_token_budget`).
    """

    def __init__(self, tokenizer, text_encoder=None, text_encoder_tokenizer=None, frozen_max_length: int | None = None):
        self.tokenizer = tokenizer
        self.text_encoder, self.text_encoder_tokenizer = text_encoder, text_encoder_tokenizer
        if text_encoder is not None and frozen_max_length is None:
            frozen_max_length = frozen_token_budget(text_encoder, text_encoder_tokenizer)
        self.frozen_max_length = frozen_max_length

    @property
    def frozen(self) -> bool:
        return self.text_encoder is not None

    @torch.no_grad()
    def frozen_hidden(self, captions: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder's hidden states (N, S, E) and attention mask (N, S) on `device` (no gradient: the
        encoder is frozen; training computes these outside the DDP-wrapped model)."""
        ids, mask = tokenize_for_frozen_encoder(self.text_encoder_tokenizer, captions, self.frozen_max_length)
        hidden = encode_with_frozen_encoder(self.text_encoder, ids.to(device), mask.to(device))
        return hidden, mask.to(device)

    def context(
        self,
        model: MMDiffTransformer2DModel,
        input_ids: torch.Tensor | None = None,
        frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context from caption ids (joint encoder) or from `frozen_hidden`'s output (frozen encoder)."""
        if frozen is not None:
            return model.encode_external_text(frozen[0].to(model.dtype), frozen[1])
        if input_ids is None:
            raise ValueError("a text context needs caption ids (joint encoder) or frozen hidden states")
        return model.encode_text(input_ids, input_ids != self.tokenizer.pad_token_id)

    @torch.no_grad()
    def joint_context(
        self, model: MMDiffTransformer2DModel, prompts: list[str], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> the joint encoder's context (N, S, D) and key mask (N, S) for sampling (the pipeline gives the
        rows without a real token the null context, `MMDiffTextToImagePipeline.text_context`)."""
        ids, _ = encode_captions(self.tokenizer, prompts, model.config.max_text_length)
        return self.context(model, ids.to(device))
