"""Top-1 image-text retrieval of paired embeddings: the held-out accuracy an eval encoder is judged by.

Retrieval is measured over galleries of R pairs (R = 32 by default, seeded), as the R-precision of generated images
is: within a gallery no two pairs share a caption, so each image chooses its caption among R distinct captions
(image -> text) and each caption its image among R images (text -> image); chance is 1 / R. A retrieval is a hit
when the retrieved caption string equals the query's own caption. Top-1 over the whole set is recorded as well, with
the same string rule, since several images may share a caption there (one-object shapes scenes do).
"""

from __future__ import annotations

import random
from typing import Any

import torch


def retrieval_galleries(captions: list[str], size: int, seed: int = 0) -> list[list[int]]:
    """Disjoint galleries of `size` indices whose captions are all distinct, filled greedily in a seeded random
    order; pairs left over (too few distinct captions to complete a gallery) are not used."""
    order = list(range(len(captions)))
    random.Random(seed).shuffle(order)
    open_galleries: list[tuple[set[str], list[int]]] = []
    galleries: list[list[int]] = []
    for index in order:
        for slot, (names, members) in enumerate(open_galleries):
            if captions[index] not in names:
                names.add(captions[index])
                members.append(index)
                if len(members) == size:
                    galleries.append(members)
                    del open_galleries[slot]
                break
        else:
            open_galleries.append(({captions[index]}, [index]))
    return sorted(galleries)


def _top1_hits(scores: torch.Tensor, query_captions: list[str], gallery_captions: list[str]) -> int:
    """(Q, G) scores: a hit when the best-scoring gallery item's caption equals the query's own caption."""
    best = scores.argmax(1).tolist()
    return sum(gallery_captions[j] == query_captions[i] for i, j in enumerate(best))


@torch.no_grad()
def retrieval_accuracy(
    image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], gallery_size: int = 32, seed: int = 0
) -> dict[str, Any]:
    """Top-1 retrieval of N pairs of normalised (N, E) embeddings, `captions[i]` the caption of pair i.

    Over seeded galleries of `gallery_size` pairs with distinct captions (see the module doc) and over all N pairs.
    Returns {"gallery_size", "num_galleries", "num_pairs", "chance", "image_to_text_top1", "text_to_image_top1",
    "full_gallery": {"size", "distinct_captions", "image_to_text_top1", "text_to_image_top1"}}.
    """
    n = len(captions)
    if len(image_emb) != n or len(text_emb) != n:
        raise ValueError(f"retrieval needs one caption per pair, got {len(image_emb)}, {len(text_emb)} and {n}")
    if gallery_size < 2:
        raise ValueError(f"gallery_size must be at least 2, got {gallery_size}")
    galleries = retrieval_galleries(captions, gallery_size, seed)
    if not galleries:
        raise ValueError(f"{len(set(captions))} distinct captions cannot fill one gallery of {gallery_size}")
    image_emb, text_emb = image_emb.float(), text_emb.float()
    i2t = t2i = 0
    for members in galleries:
        names = [captions[i] for i in members]
        scores = image_emb[members] @ text_emb[members].T  # (R, R)
        i2t += _top1_hits(scores, names, names)
        t2i += _top1_hits(scores.T, names, names)
    full_i2t = full_t2i = 0
    for start in range(0, n, 1024):  # chunks keep the (N, N) score matrix out of memory
        rows = slice(start, min(start + 1024, n))
        full_i2t += _top1_hits(image_emb[rows] @ text_emb.T, captions[rows], captions)
        full_t2i += _top1_hits(text_emb[rows] @ image_emb.T, captions[rows], captions)
    used = len(galleries) * gallery_size
    return {
        "gallery_size": gallery_size,
        "num_galleries": len(galleries),
        "num_pairs": used,
        "chance": 1.0 / gallery_size,
        "image_to_text_top1": i2t / used,
        "text_to_image_top1": t2i / used,
        "full_gallery": {
            "size": n,
            "distinct_captions": len(set(captions)),
            "image_to_text_top1": full_i2t / n,
            "text_to_image_top1": full_t2i / n,
        },
    }
