"""The mmdiff evaluation encoder (issue 14): trained on the user's own shards, the default feature space of eval.

- `mmdiff eval-encoder --shards TRAIN --val-shards VAL --out DIR` (`train_eval_encoder`, `encoder_train.py`) trains
  a small contrastive image-text model (`ContrastiveEvalEncoder`, `encoder_model.py`) and saves DIR atomically:
  config.json + diffusion_pytorch_model.safetensors, tokenizer/ (transformers save_pretrained) and training.json
  (data fingerprint, losses, vocabulary coverage, held-out image -> text and text -> image retrieval accuracy).
- `load_eval_encoder(DIR)` gives an `EvalEncoder` (`metrics.py`): `image_features` (N, F) for FD / KID /
  precision-recall, `embed_images` / `embed_texts` (N, E) L2-normalised for CLIP score and R-precision.
- Use-time checks, since its features only mean something for data like its training data:
  `check_encoder_fits(encoder, images)` refuses images of a resolution it never saw (see its doc), and
  `text_coverage(encoder, texts)` is the fraction of caption words in its vocabulary (`encoders.py` refuses < 50 %).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import PIL.Image

from .contrastive_model import (
    ContrastiveEvalEncoder,
    MMDiffEvalEncoder,
    _class_name,
    contrastive_loss,
    is_eval_encoder_folder,
)
from .contrastive_training import TOKENIZER_FOLDER, TRAINING_FILE, train_eval_encoder, word_coverage
from .retrieval import retrieval_accuracy

__all__ = [
    "ContrastiveEvalEncoder",
    "MMDiffEvalEncoder",
    "check_encoder_fits",
    "contrastive_loss",
    "is_eval_encoder_folder",
    "load_eval_encoder",
    "retrieval_accuracy",
    "text_coverage",
    "train_eval_encoder",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TRAIN_HINT = "train one with `mmdiff eval-encoder --shards TRAIN --val-shards VAL --out DIR`"


def load_eval_encoder(folder: str | os.PathLike, device: str = "cpu", batch_size: int = 256) -> MMDiffEvalEncoder:
    """An `mmdiff eval-encoder` folder as an `EvalEncoder` on `device` (safetensors only, eval mode).

    FileNotFoundError when the folder does not exist; ValueError naming the problem when it is not an eval encoder
    (no config.json, another model's config such as the `eval-classifier` CNN, no safetensors weights, no tokenizer).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"eval encoder folder not found: {folder}; {TRAIN_HINT}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; an eval encoder is a folder ({TRAIN_HINT})")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not an mmdiff eval encoder: it has no config.json; {TRAIN_HINT}")
    name = _class_name(folder)
    if name != ContrastiveEvalEncoder.__name__:
        what = (
            "the shapes feature classifier of `mmdiff eval-classifier`, which has no text side"
            if name == "ShapesFeatureClassifier"
            else f"a {name or 'unknown'} model"
        )
        raise ValueError(f"{folder} is not an mmdiff eval encoder: its config.json describes {what}; {TRAIN_HINT}")
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights {pickles}" if pickles else "no weights"
        raise ValueError(f"{folder}: {found}; mmdiff loads safetensors only (diffusion_pytorch_model.safetensors)")
    if not (folder / TOKENIZER_FOLDER).is_dir():
        raise ValueError(f"{folder} is an incomplete eval encoder: its {TOKENIZER_FOLDER}/ folder is missing")
    from mmdiff.data.tokenizer import load_tokenizer

    try:
        model = ContrastiveEvalEncoder.from_pretrained(folder, use_safetensors=True)
        tokenizer = load_tokenizer(folder / TOKENIZER_FOLDER)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # a damaged file, shapes that do not match, ...
        raise ValueError(f"{folder}: not a loadable eval encoder ({type(err).__name__}: {err})") from None
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}")
    training_file = folder / TRAINING_FILE
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    return MMDiffEvalEncoder(
        model, tokenizer, f"mmdiff eval encoder ({folder})", device, batch_size, folder=folder, training=training
    )


def _sizes(sides: list[int]) -> str:
    return ", ".join(f"{s} px" for s in sides[:3]) + (f" and {len(sides) - 3} more sizes" if len(sides) > 3 else "")


def check_encoder_fits(encoder, images: list[PIL.Image.Image], allow_resize: bool = False) -> None:
    """Refuse images whose resolution the encoder never saw: ValueError naming both sizes.

    Every image is resized (shorter side) and centre-cropped to the encoder's `image_size` before it is encoded,
    but an encoder trained on 32 px scenes computes different features for a 64 px image brought down to 32 px
    than for the 32 px rendering of the same scene, so an FD between such images and real 32 px ones would measure
    the resize, not the model. An image fits when its shorter side is the encoder's `image_size`, or lies in the
    range of the shorter sides of its training images (which were resized to `image_size` the same way).
    `allow_resize=True` is the deliberate override. Encoders without an `image_size` (open_clip, Inception) take any.
    """
    size = getattr(encoder, "image_size", None)
    if size is None or allow_resize or not images:
        return
    config = getattr(getattr(encoder, "model", None), "config", None)
    low = getattr(config, "source_min_size", None) or size
    high = getattr(config, "source_max_size", None) or size
    sides = Counter(min(image.size) for image in images)
    bad = sorted((s for s in sides if s != size and not low <= s <= high), key=lambda s: -sides[s])
    if not bad:
        return
    trained = f"{size} px" + (
        f" (on {low}-{high} px images resized to {size} px)" if (low, high) != (size, size) else ""
    )
    folder = getattr(encoder, "folder", None) or encoder.name
    raise ValueError(
        f"the eval encoder at {folder} was trained at {trained}; these images are {_sizes(bad)} "
        f"({sum(sides[s] for s in bad)} of {len(images)}): its features would measure the resize, not the images. "
        f"Evaluate images of {size} px, train an encoder at this size (`mmdiff eval-encoder --image-size {bad[0]}`) "
        "or resize deliberately (check_encoder_fits(..., allow_resize=True))"
    )


def text_coverage(encoder, texts: list[str]) -> float:
    """Fraction of the words of `texts` that the encoder's word-level vocabulary knows (1.0 for no words, and for
    encoders with an open vocabulary, which have no word-level tokenizer)."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        return 1.0
    return word_coverage(tokenizer, list(texts))
