"""Image-to-text measures on any data: captions generated for images, and the caption NLL bound.

The NLL bound is the MDLM negative ELBO (Sahoo et al. 2024): ``E_t E_{y_t ~ q(.|y_0, t)} [sum_masked CE / t]`` with
t ~ U(0, 1]. It is estimated with ``num_levels`` stratified mask levels per caption (fixed seed, so every model and
guidance scale sees the same masks) and reported in bits per token position, over the L = max_text_length positions
of the padded caption: pad positions count because the model learns where a caption ends (docs/architecture.md,
decision 5).
With ``guidance_scale`` w != 1 the model's prediction is the CFG combination of the logits, ``uncond + w (cond - uncond)``
(w = 0 is the null context, i.e. the unconditional bound on p(text)).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from mmdiff.conditioning.guided import Condition, GuidedModel
from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.policies import caption_policy
from mmdiff.data.tokenizer import encode_captions
from mmdiff.diffusion.masked import mask_tokens, mdlm_loss, sample_mask_levels, suppress_mask_logit


def trained_caption_policy(pipe) -> CaptionPolicy:
    """The caption policy a pipeline's captioner was trained with (its `caption_phrasing` setting, saved in the
    folder's `model_index.json`): its captioner is scored on references phrased as it was taught."""
    return caption_policy({"text_task_phrasings": pipe.config.caption_phrasing})


def nll_references(model, canonical: list[str]) -> tuple[list[str], str]:
    """The reference captions the NLL bound is taken on, and their phrasing: the canonical captions as the model's
    caption policy taught it to phrase them (`CaptionPolicy.reference`: unchanged, "canonical", or e.g. the
    left-first phrasings for `left_first`, which gives "right of"/"below" phrasings little probability, so their NLL
    would measure the phrasing, not the image)."""
    policy = trained_caption_policy(model)
    return [policy.reference(c) for c in canonical], policy.reference_phrasing


@torch.no_grad()
def generate_captions(
    pipe,
    images: list[Image.Image],
    guidance_scale: float = 2.0,
    num_inference_steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    guidance_interval: tuple[float, float] | None = None,
    **sampler_kwargs,
) -> list[str]:
    """Caption images with the image-to-text pipeline over `pipe`'s components (greedy; `sampler_kwargs` choose the
    unmasking sampler, default the folder's text scheduler: low-confidence unmasking on the linear schedule).

    Image i uses generator seed `seed + i`, so a caption does not depend on the batch it fell in.
    """
    from mmdiff.pipelines import as_image_to_text

    i2t = as_image_to_text(pipe)
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = i2t(
            chunk,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            guidance_interval=guidance_interval,
            generator=generators,
            **sampler_kwargs,
        )
        texts.extend(out.text)
    return texts


@torch.no_grad()
def caption_nll(
    pipe,
    images: list[Image.Image] | None,
    captions: list[str],
    guidance_scale: float = 1.0,
    num_levels: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    eps: float = 1e-3,
) -> float:
    """MDLM NLL bound of `captions` in bits per token position (see the module doc).

    images: the conditioning images (one per caption), or None for the null context (unconditional p(text)).
    guidance_scale: w applied to the logits (1 = the conditional model as trained; needs images when != 1).
    """
    transformer, tokenizer = pipe.transformer, pipe.tokenizer
    device = pipe._execution_device
    mask_id = tokenizer.mask_token_id
    ids_all, _ = encode_captions(tokenizer, captions, transformer.config.max_text_length)
    generator = torch.Generator().manual_seed(seed)
    total, rows = 0.0, 0
    for start in range(0, len(captions), batch_size):
        ids = ids_all[start : start + batch_size].to(device)
        n = ids.shape[0]
        if images is None:
            context, context_mask = transformer.null_context("image", n)
        else:
            pixels = pipe.preprocess_images(images[start : start + batch_size])
            context, context_mask = transformer.encode_image(pipe.encode_images(pixels))
        # the unconditional rows use the learned null image context; without images there is nothing to guide
        guided_model = GuidedModel(
            transformer, Condition(context, context_mask), "text", [guidance_scale if images is not None else 1.0]
        )
        for _ in range(num_levels):
            t = sample_mask_levels(n, eps, generator=generator).to(device)
            noisy, is_masked = mask_tokens(ids, t, mask_id, generator)
            logits = guided_model(noisy, t)
            # mdlm_loss averages over the N*L positions of this batch: weight by N to average over all captions
            total += float(mdlm_loss(suppress_mask_logit(logits, mask_id), ids, is_masked, t)) * n
        rows += n
    return total / (rows * num_levels) / math.log(2.0)
