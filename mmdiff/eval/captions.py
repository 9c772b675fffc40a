"""Image-to-text metrics: attribute accuracy and exact match of generated captions, and the caption NLL bound.

Attribute accuracy parses both the generated caption and the reference with :func:`parse_caption`, so any phrasing
of the right scene counts; the per-attribute rules are those of :func:`mmdiff.eval.benchmarks.shapes.detector.compare_scenes`. An
unparseable caption is wrong on every attribute.

The NLL bound is the MDLM negative ELBO (Sahoo et al. 2024): ``E_t E_{y_t ~ q(.|y_0, t)} [sum_masked CE / t]`` with
t ~ U(0, 1]. It is estimated with ``num_levels`` stratified mask levels per caption (fixed seed, so every model and
guidance scale sees the same masks) and reported in bits per token position, over the L = max_text_length positions
of the padded caption: pad positions count because the model learns where a caption ends (docs/architecture.md,
decision 5).
With ``guidance_scale`` w != 1 the denoiser is the CFG combination of the logits, ``uncond + w (cond - uncond)``
(w = 0 is the null context, i.e. the unconditional bound on p(text)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from mmdiff.conditioning.guided import GuidedDenoiser
from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.policies import caption_policy
from mmdiff.data.shapes import parse_caption
from mmdiff.data.tokenizer import encode_captions
from mmdiff.diffusion.masked import mask_tokens, mdlm_loss, sample_mask_levels, suppress_mask_logit

from .benchmarks.shapes.detector import ATTRIBUTES, compare_scenes


def _normalise_text(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def caption_metrics(predicted: list[str], references: list[dict[str, Any]], canonical: list[str]) -> dict[str, Any]:
    """Accuracy of N generated captions against N reference scenes (normalised, as :func:`parse_caption` returns).

    Returns {"count", "colors", "shapes", "sizes", "relation": per-attribute accuracy, "all": every attribute right
    (the scenes are equal), "exact_match": the caption equals `canonical[i]` (case and spacing ignored),
    "parse_rate": fraction of parseable captions, "num": N}.
    """
    if not (len(predicted) == len(references) == len(canonical)):
        raise ValueError(f"got {len(predicted)} captions, {len(references)} references and {len(canonical)} canonicals")
    totals = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    parsed = exact = 0
    for text, reference, canon in zip(predicted, references, canonical):
        scene = parse_caption(text)
        parsed += scene is not None
        exact += _normalise_text(text) == _normalise_text(canon)
        for key, ok in compare_scenes(scene, reference).items():
            totals[key] += ok
    n = max(len(predicted), 1)
    return {**{k: v / n for k, v in totals.items()}, "exact_match": exact / n, "parse_rate": parsed / n, "num": n}


_OPPOSITE_WORD = {"left": "right", "right": "left", "above": "below", "below": "above"}


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
def relation_direction(pipe, images: list[Image.Image], canonical: list[str], batch_size: int = 64) -> dict[str, Any]:
    """Does the captioner bind each object to its position? A teacher-forced probe on the two-object scenes.

    Each canonical caption ("a small red circle left of a large blue square") is given with only its relation word
    masked, at mask level t = 1/L, and the model chooses between the true word and its opposite (left/right,
    above/below) from its logits: the objects and the axis are given, so only the direction is asked. Chance is 0.5;
    the same probe with the null image context shows what the caption text alone gives away.

    Returns {"num", "accuracy", "left_right", "above_below", "null_accuracy", "mean_margin"} (margin: the true word's
    logit minus the opposite's, image context); records whose relation word is not one token are left out.
    """
    transformer, tokenizer = pipe.transformer, pipe.tokenizer
    device = pipe._execution_device
    length = transformer.config.max_text_length
    vocab = tokenizer.get_vocab()
    if not all(word in vocab for word in _OPPOSITE_WORD):
        return {"num": 0}
    relation_words = {vocab[word]: word for word in _OPPOSITE_WORD}  # token id -> relation word
    rows = []  # (image index, position, true id, opposite id, horizontal)
    ids_all, _ = encode_captions(tokenizer, canonical, length)
    for index, ids in enumerate(ids_all.tolist()):
        position = next((pos for pos, token in enumerate(ids) if token in relation_words), None)
        if position is not None:
            word = relation_words[ids[position]]
            rows.append((index, position, ids[position], vocab[_OPPOSITE_WORD[word]], word in ("left", "right")))
    if not rows:
        return {"num": 0}
    margins = {"image": [], "null": []}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        index = torch.tensor([r[0] for r in chunk])
        position = torch.tensor([r[1] for r in chunk], device=device)
        ids = ids_all[index].to(device)
        ids[torch.arange(len(chunk), device=device), position] = tokenizer.mask_token_id
        t = torch.full((len(chunk),), 1.0 / length, device=device)
        pixels = pipe.preprocess_images([images[r[0]] for r in chunk])
        contexts = {
            "image": transformer.encode_image(pipe.encode_images(pixels)),
            "null": transformer.null_context("image", len(chunk)),
        }
        for name, (context, mask) in contexts.items():
            logits = transformer(ids, t, context, mask).float()[torch.arange(len(chunk), device=device), position]
            true = logits[torch.arange(len(chunk)), torch.tensor([r[2] for r in chunk])]
            opposite = logits[torch.arange(len(chunk)), torch.tensor([r[3] for r in chunk])]
            margins[name].extend((true - opposite).tolist())
    image, null = torch.tensor(margins["image"]), torch.tensor(margins["null"])
    horizontal = torch.tensor([r[4] for r in rows])

    def accuracy(values: torch.Tensor) -> float:
        return float((values > 0).float().mean()) if len(values) else float("nan")

    return {
        "num": len(rows),
        "accuracy": accuracy(image),
        "left_right": accuracy(image[horizontal]),
        "above_below": accuracy(image[~horizontal]),
        "null_accuracy": accuracy(null),
        "mean_margin": float(image.mean()),
    }


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
        denoiser = GuidedDenoiser(
            transformer, context, context_mask, "text", [guidance_scale if images is not None else 1.0]
        )
        for _ in range(num_levels):
            t = sample_mask_levels(n, eps, generator=generator).to(device)
            noisy, is_masked = mask_tokens(ids, t, mask_id, generator)
            logits = denoiser(noisy, t)
            # mdlm_loss averages over the N*L positions of this batch: weight by N to average over all captions
            total += float(mdlm_loss(suppress_mask_logit(logits, mask_id), ids, is_masked, t)) * n
        rows += n
    return total / (rows * num_levels) / math.log(2.0)
