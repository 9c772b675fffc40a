"""The shapes benchmark's image -> text scores: attribute accuracy and exact match of generated captions, and the
relation-direction probe.

Attribute accuracy parses both the generated caption and the reference with `mmdiff.data.shapes.parse_caption`, so
any phrasing of the right scene counts; the per-attribute rules are those of `detector.compare_scenes`. An
unparseable caption is wrong on every attribute.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mmdiff.data.shapes import parse_caption
from mmdiff.data.tokenizer import encode_captions

from .detector import ATTRIBUTES, compare_scenes


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
