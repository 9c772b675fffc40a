"""The generic metrics of one evaluation, for any image-caption data, in every feature space the user gave.

Feature spaces (`EvalEncoder`s, see `mmdiff/eval/metrics.py`): the mmdiff eval encoder trained on the user's own
shards (`mmdiff eval-encoder`; the default), an open_clip checkpoint (`--clip DIR`: CLIP score as papers report it)
and InceptionV3 (`--inception FILE`: FID as papers report it). Each gives, for text -> image, FD, KID and
precision/recall between generated and real images, and where it has a text side, CLIP score and R-precision; for
image -> text, the CLIP score of each caption with its image. The caption n-gram scores (BLEU-4, CIDEr-D, ROUGE-L)
need no encoder. The first space is the primary one, whose figures are also reported without a prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .metrics import (
    EvalEncoder,
    caption_scores,
    clip_score,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    r_precision,
)

# R for CLIP R-precision: the image's own prompt among R prompts of the evaluated set
R_PRECISION_R = 32
KID_SUBSET = 100
PR_NEIGHBOURS = 3


def has_text_side(encoder: EvalEncoder) -> bool:
    return bool(getattr(encoder, "has_text", True))


def _distinct(prompts: list[str]) -> int:
    return len(set(prompts))


def image_space_metrics(
    encoder: EvalEncoder,
    generated: list[Image.Image],
    real: list[Image.Image],
    prompts: list[str],
    floor_real: list[Image.Image] | None = None,
    seed: int = 0,
    real_features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Text -> image figures of N generated images (generated[i] drawn for prompts[i]) against N real images, in one
    encoder's space. `floor_real`: other real images, for the real-vs-real FD floor at the same sample size."""
    n = len(generated)
    fake = encoder.image_features(generated)
    ref = real_features if real_features is not None else encoder.image_features(real)
    out: dict[str, Any] = {"num": n}
    skipped: dict[str, str] = {}
    if min(n, len(ref)) >= 2:
        out["fd"] = frechet_distance(fake, ref)
        if floor_real and len(floor_real) >= 2:
            out["fd_real_floor"] = frechet_distance(encoder.image_features(floor_real), ref)
        subset = min(KID_SUBSET, n, len(ref))
        out.update(kernel_inception_distance(fake, ref, subset_size=subset, subsets=50, seed=seed))
        out["kid_subset_size"] = subset
    else:
        skipped["fd, kid"] = "need at least 2 generated and 2 real images"
    if min(n, len(ref)) > PR_NEIGHBOURS:
        out.update(precision_recall(ref, fake, k=PR_NEIGHBOURS))
    else:
        skipped["precision, recall"] = f"need more than k = {PR_NEIGHBOURS} images per set"
    if has_text_side(encoder):
        image_emb, text_emb = encoder.embed_images(generated), encoder.embed_texts(prompts)
        out["clip_score"] = clip_score(image_emb, text_emb)
        r = min(R_PRECISION_R, _distinct(prompts))
        if r >= 2:
            rp = r_precision(image_emb, text_emb, prompts, R=r, seed=seed)
            out.update({"r_precision": rp["r_precision"], "r_precision_R": r})
        else:
            skipped["r_precision"] = "needs at least 2 distinct prompts"
    if skipped:
        out["not_computed"] = skipped
    return out


def caption_space_metrics(encoder: EvalEncoder, images: list[Image.Image], captions: list[str]) -> dict[str, Any]:
    """Image -> text figures in one encoder's joint space: the CLIP score of each generated caption with its image."""
    if not has_text_side(encoder):
        return {}
    return {"clip_score": clip_score(encoder.embed_images(images), encoder.embed_texts(captions))}


def generic_caption_metrics(captions: list[str], references: list[list[str]]) -> dict[str, Any]:
    """BLEU-4, CIDEr-D and ROUGE-L of each caption against every reference caption of its image (CIDEr-D's document
    frequencies come from the set, so it needs at least 2 images)."""
    if len(captions) < 2:
        return {"not_computed": {"bleu4, cider_d, rouge_l": "need at least 2 captions (CIDEr-D's idf is over the set)"}}
    scores = caption_scores(captions, references)
    return {key: scores[key] for key in ("bleu4", "cider_d", "rouge_l")}


def spaces_report(per_space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The primary (first) space's figures flat, every space's under "by_encoder"."""
    if not per_space:
        return {"by_encoder": {}}
    primary = next(iter(per_space))
    return {**per_space[primary], "feature_space": primary, "by_encoder": per_space}
