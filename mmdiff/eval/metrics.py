"""Generic evaluation metrics on features, embeddings and strings: any encoder, any image-caption data.

Everything here takes tensors or lists of strings and returns plain floats (in dicts) ready for JSON, so any
`EvalEncoder` (an mmdiff eval encoder, open_clip, InceptionV3, ...) can supply the features. Which library computes
what (one place per formula):

- FD, KID, precision/recall (text -> image, distribution): torch-fidelity's feature-level functions
  (`fid_features_to_statistics` + `fid_statistics_to_metric`, `kid_features_to_metric`, `prc_features_to_metric`
  for the k-NN manifolds of Kynkäänniemi et al. 2019; `prc` needs torch-fidelity >= 0.4). FID "as papers report it"
  is `frechet_distance` on the 2048-d pool features of `pretrained.InceptionEncoder`.
- BLEU-1..4, CIDEr-D, ROUGE-L (image -> text): pycocoevalcap's `Bleu`, `Cider` (coco-caption's CIDEr-D: clipped
  counts, Gaussian length penalty sigma = 6, x10) and `Rouge`. Their PTB tokenizer needs Java, so captions are
  tokenised by `tokenize_caption` here instead.
- CLIP score and R-precision (text <-> image alignment): written here, a cosine and a top-1 retrieval over
  embeddings the encoder has already computed. torchmetrics' CLIPScore only accepts a transformers CLIP model it
  loads itself; `clip_score` follows its convention (see there). No library draws R-precision's distractors.

Every function checks its minimum sample count and raises a ValueError naming the metric and the minimum rather than
return NaN.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal, Protocol

import numpy as np
import PIL.Image
import torch

# rows of the pairwise-distance blocks precision/recall holds at once: (PRC_BATCH, N) float64 stays ~0.4 GB at N=50k
PRC_BATCH = 1000


class EvalEncoder(Protocol):
    """A feature space for evaluation: an mmdiff eval encoder, an open_clip model, InceptionV3, ..."""

    name: str  # recorded in the JSON reports, e.g. "open_clip:ViT-B-32 (/models/clip/open_clip_model.safetensors)"
    image_size: int | None  # the resolution it expects / was trained at (None: any; it resizes images itself)
    has_text: bool  # whether embed_images / embed_texts exist (InceptionV3 has no text side)

    def image_features(self, images: list[PIL.Image.Image]) -> torch.Tensor: ...  # (N, F) for FD / KID / PR

    def embed_images(self, images: list[PIL.Image.Image]) -> torch.Tensor: ...  # (N, E), L2-normalised

    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...  # (N, E), L2-normalised


# ---------------------------------------------------------------- input checks


def _need(metric: str, minimum: int, *counts: int) -> None:
    if min(counts) < minimum:
        got = " and ".join(map(str, counts))
        raise ValueError(f"{metric} needs at least {minimum} samples per set, got {got}")


def _features(metric: str, *sets: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
    """Each set as a CPU float64 (N, F) tensor; every set must have the same F and only finite values."""
    out = [torch.as_tensor(np.asarray(s, dtype=np.float64)) for s in sets]
    for s in out:
        if s.dim() != 2:
            raise ValueError(f"{metric} takes (N, F) feature matrices, got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"{metric}: the features contain NaN or inf")
    if len({s.shape[1] for s in out}) > 1:
        raise ValueError(f"{metric}: feature widths differ ({', '.join(str(s.shape[1]) for s in out)})")
    return out


# ---------------------------------------------------------------- text -> image: distributions


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F), in float64.

    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), by torch-fidelity. Needs >= 2 samples per set (a covariance);
    with N < F the covariances are singular and the value is biased upwards, so compare FDs at equal N only.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a, b = _features("FD", feats_a, feats_b)
    _need("FD", 2, len(a), len(b))
    stats = fid_features_to_statistics(a), fid_features_to_statistics(b)
    value = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    # the eigenvalue route to Tr((S_a S_b)^(1/2)) lands a rounding error below 0 for identical sets
    return max(float(value), 0.0)


def kernel_inception_distance(
    feats_a: torch.Tensor | np.ndarray,
    feats_b: torch.Tensor | np.ndarray,
    subset_size: int = 100,
    subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between (N_a, F) and (N_b, F) with the cubic polynomial kernel
    (x.y / F + 1)^3, averaged over `subsets` random subsets of `subset_size` from each set (seeded), by torch-fidelity.

    Returns {"kid": mean, "kid_std": std over subsets}. 2 <= subset_size <= min(N_a, N_b). Unbiased: it can be
    slightly negative, and KID of a set with itself is ~0, not exactly 0.
    """
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = _features("KID", feats_a, feats_b)
    _need("KID", 2, len(a), len(b))
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(f"KID subset size must lie in [2, {min(len(a), len(b))}] (the smaller set), got {subset_size}")
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return {"kid": float(out["kernel_inception_distance_mean"]), "kid_std": float(out["kernel_inception_distance_std"])}


def precision_recall(
    real_feats: torch.Tensor | np.ndarray, fake_feats: torch.Tensor | np.ndarray, k: int = 3
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated (N_f, F) against real (N_r, F) features.

    Each set's manifold is the union of balls around its samples reaching their k-th nearest neighbour. Precision:
    the fraction of generated samples inside the real manifold (fidelity); recall: the fraction of real samples
    inside the generated one (coverage). By torch-fidelity's `prc`; needs > k samples per set.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = _features("precision/recall", real_feats, fake_feats)
    _need(f"precision/recall with k = {k}", k + 1, len(real), len(fake))
    # torch-fidelity's convention: features_1 generated, features_2 real; save_cpu_ram computes the distance matrix
    # in row blocks (same result) so that memory stays O(PRC_BATCH * N)
    out = prc_features_to_metric(
        fake, real, prc_neighborhood=k, prc_batch_size=PRC_BATCH, save_cpu_ram=True, verbose=False
    )
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}


# ---------------------------------------------------------------- text <-> image: alignment


def _paired(metric: str, image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image_emb, text_emb = torch.as_tensor(image_emb).double().cpu(), torch.as_tensor(text_emb).double().cpu()
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"{metric} needs paired (N, E) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    _need(metric, 1, len(image_emb))
    return image_emb, text_emb


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP score of N image-text pairs, (N, E) embeddings each: max(100 * mean_i cos(image_i, text_i), 0).

    This is what torchmetrics' CLIPScore computes (it clamps the *mean* at 0, although its docstring writes the
    clamp per pair; Hessel et al. 2021 clamp each pair and weight by 2.5 instead). Cosines are taken in float64, so
    inputs need not be exactly normalised.
    """
    image_emb, text_emb = _paired("CLIP score", image_emb, text_emb)
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)  # (N,)
    return max(100.0 * float(cosine.mean()), 0.0)


def r_precision(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    texts: list[str],
    R: int = 32,
    seed: int = 0,
    direction: Literal["image_to_text", "text_to_image"] = "image_to_text",
) -> dict[str, Any]:
    """R-precision (as in AttnGAN / CLIP-R-precision): top-1 retrieval among R candidates, (N, E) embeddings each.

    image_to_text: each image i (generated from `texts[i]`) is asked to pick its own text among R candidates, its own
    and R - 1 distractors. text_to_image: each text i picks image i among it and R - 1 distractor images. The
    distractors are R - 1 *distinct strings* drawn uniformly without replacement (random.Random(seed)) from the texts
    of the set that differ from `texts[i]` as strings, so a repeated prompt is never its own distractor; for
    text_to_image each drawn string stands for one of its images, chosen uniformly. A hit needs the own candidate's
    cosine to be strictly the largest (ties are misses, so a collapsed encoder scores 0, not 1). Chance is 1 / R.

    Returns {"r_precision", "R", "num", "chance", "seed", "direction", "distractors"} ("distractors" says how they
    were drawn). Needs R >= 2 and at least R distinct texts.
    """
    image_emb, text_emb = _paired("R-precision", image_emb, text_emb)
    if len(texts) != len(image_emb):
        raise ValueError(f"R-precision needs one text per pair, got {len(image_emb)} pairs and {len(texts)} texts")
    if direction not in ("image_to_text", "text_to_image"):
        raise ValueError(f"R-precision direction must be image_to_text or text_to_image, got {direction!r}")
    members: dict[str, list[int]] = {}  # each distinct string -> the indices that carry it, in first-seen order
    for i, text in enumerate(texts):
        members.setdefault(text, []).append(i)
    distinct = list(members)
    position = {text: j for j, text in enumerate(distinct)}
    if R < 2 or len(distinct) < R:
        raise ValueError(f"R-precision with R = {R} needs R >= 2 and at least R distinct texts, got {len(distinct)}")
    queries, candidates = (image_emb, text_emb) if direction == "image_to_text" else (text_emb, image_emb)
    rng = random.Random(seed)
    hits = 0
    for i, text in enumerate(texts):
        own = position[text]
        # R - 1 of the other distinct strings: sample from range(D - 1) and skip over the own position, O(R) per query
        drawn = [j + (j >= own) for j in rng.sample(range(len(distinct) - 1), R - 1)]
        rows = [i, *(rng.choice(members[distinct[j]]) for j in drawn)]
        scores = candidates[rows] @ queries[i]  # (R,)
        hits += bool(scores[0] > scores[1:].max())
    return {
        "r_precision": hits / len(texts),
        "R": R,
        "num": len(texts),
        "chance": 1.0 / R,
        "seed": seed,
        "direction": direction,
        "distractors": "R - 1 distinct other texts of the set (never equal to the own text as strings), drawn "
        "uniformly without replacement per query; text_to_image: a uniformly chosen image of each",
    }


# ---------------------------------------------------------------- image -> text: n-gram scores

_NON_WORD = re.compile(r"[^\w\s]")


def tokenize_caption(text: str) -> str:
    """Lower case, every character that is not a letter, digit or white space replaced by a space, white space
    collapsed: "A red circle, left." -> "a red circle left".

    Stands in for coco-caption's PTBTokenizer (Stanford CoreNLP, needs Java), which also lower-cases and drops
    punctuation tokens; it differs on contractions ("don't": PTB "do n't", here "don t") and hyphens, which are rare
    in captions, so scores match coco-caption's closely but not to the last digit on such text.
    """
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4, CIDEr-D and ROUGE-L of candidates[i] against every caption of references[i], by pycocoevalcap.

    BLEU: coco-caption's corpus BLEU (counts pooled over the set, brevity penalty from the closest reference length).
    CIDEr-D: its document frequencies are those of this set's references, as in coco-caption, so the score depends
    on the set and it needs at least 2 images (with one, every n-gram has idf 0 and the score is always 0); compare
    figures over the same references only. A caption identical to all of its references scores 10 when it has >= 4
    words and is unlike the other images' references. ROUGE-L: the LCS F-measure (beta 1.2) with the best reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(candidates) != len(references):
        raise ValueError(f"caption scores: got {len(candidates)} captions for {len(references)} reference sets")
    _need("caption scores (CIDEr-D's idf)", 2, len(candidates))
    if any(not refs for refs in references):
        raise ValueError("caption scores: every caption needs at least one reference caption")
    res = {i: [tokenize_caption(c)] for i, c in enumerate(candidates)}
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    return out | {"cider_d": float(cider), "rouge_l": float(rouge)}
