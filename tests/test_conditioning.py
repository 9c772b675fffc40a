"""The conditioning-and-guidance layer: the guided denoiser and the dropout forward equal the plain computation."""

from __future__ import annotations

import pytest
import torch
from conftest import close_at_scale, make_model

from mmdiff.conditioning import Condition, GuidanceSpec, GuidedModel, TextConditioner, forward_with_dropout
from mmdiff.data.tokenizer import encode_captions
from mmdiff.diffusion.guidance import classifier_free_guidance

PROMPTS = ["a small red circle", "there is a small green triangle", "a large blue square above a red circle"]


@pytest.fixture()
def model(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():  # move off adaLN-Zero's zero init so that cross-attention matters
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _explicit(model, sample, t, context, mask, uncond, uncond_mask, w, float_logits):
    """Two plain forwards and the CFG rule: what the guided denoiser must return."""
    cond = model(sample, t, context, mask)
    free = model(sample, t, uncond, uncond_mask)
    if float_logits:
        cond, free = cond.float(), free.float()
    return classifier_free_guidance(cond, free, w)


@torch.no_grad()
def test_guided_denoiser_equals_two_plain_forwards(model, tokenizer):
    ids, _ = encode_captions(tokenizer, PROMPTS, 12)
    text_ctx, text_mask = TextConditioner(tokenizer).context(model, ids)
    image_ctx, image_mask = model.encode_image(torch.randn(3, 4, 8, 8))
    t = torch.tensor(0.6)
    for modality, sample, ctx, mask, null_modality in (
        ("image", torch.randn(3, 4, 8, 8), text_ctx, text_mask, "text"),
        ("text", torch.randint(0, len(tokenizer), (3, 12)), image_ctx, image_mask, "image"),
    ):
        null, null_mask = model.null_context(null_modality, 3, ctx.shape[1])
        expected = _explicit(model, sample, t, ctx, mask, null, null_mask, 3.0, modality == "text")
        guided = GuidedModel(model, Condition(ctx, mask), modality, [3.0])
        assert close_at_scale(guided(sample, t), expected)
        assert guided.num_forward_rows == 6
        # w = 1 and outside the guidance interval: the conditional forward alone
        plain = model(sample, t, ctx, mask)
        plain = plain.float() if modality == "text" else plain
        assert close_at_scale(GuidedModel(model, Condition(ctx, mask), modality, [1.0])(sample, t), plain)
        outside = GuidedModel(model, Condition(ctx, mask), modality, GuidanceSpec((3.0,), interval=(0.0, 0.5)))
        assert close_at_scale(outside(sample, t), plain) and outside.num_forward_rows == 3
    # a sweep: S groups in one forward equal S separate guided models; a negative context replaces the null context
    sample = torch.randn(3, 4, 8, 8)
    negative = TextConditioner(tokenizer).context(model, encode_captions(tokenizer, ["blue"] * 3, 12)[0])
    length = max(text_ctx.shape[1], negative[0].shape[1])
    pad = lambda c, m: (  # noqa: E731
        torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1])),
        torch.nn.functional.pad(m, (0, length - m.shape[1]), value=False),
    )
    ctx, mask = pad(text_ctx, text_mask)
    neg = pad(*negative)
    for negative_branch in (None, neg):
        sweep = GuidedModel(model, Condition(ctx, mask, negative=negative_branch), "image", [1.0, 2.0, 4.0])
        together = sweep(sample.repeat(3, 1, 1, 1), t)
        for g, w in enumerate([1.0, 2.0, 4.0]):
            alone = GuidedModel(model, Condition(ctx, mask, negative=negative_branch), "image", [w])(sample, t)
            assert close_at_scale(together[3 * g : 3 * (g + 1)], alone)
    expected = _explicit(model, sample, t, ctx, mask, *neg, 2.0, False)
    assert close_at_scale(GuidedModel(model, Condition(ctx, mask, negative=neg), "image", [2.0])(sample, t), expected)


@pytest.mark.parametrize("dropped", [[False, False, False], [True, False, True], [True, True, True]])
def test_forward_with_dropout_equals_the_null_context(model, tokenizer, dropped):
    # dropped rows run as null rows, first in the batch: the same predictions as encoding every row and replacing
    # the dropped ones by the null context, for both streams
    dropped = torch.tensor(dropped)
    ids, _ = encode_captions(tokenizer, PROMPTS, 12)
    latents = torch.randn(3, 4, 8, 8)
    t = torch.rand(3)
    cases = (
        (
            torch.randn(3, 4, 8, 8),
            lambda rows: model.encode_text(ids[rows], ids[rows] != tokenizer.pad_token_id),
            "text",
        ),
        (torch.randint(0, len(tokenizer), (3, 12)), lambda rows: model.encode_image(latents[rows]), "image"),
    )
    for sample, encode_rows, kind in cases:
        encode = lambda rows, f=encode_rows: f(slice(None) if rows is None else rows)  # noqa: E731
        prediction, order = forward_with_dropout(model, sample, t, dropped, encode)
        plain = model(sample, t, *model.drop_context(*encode(None), dropped, kind))
        assert close_at_scale(prediction, plain if order is None else plain[order])
        assert (order is None) == (not dropped.any() or dropped.all())
