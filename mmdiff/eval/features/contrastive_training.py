"""Training the mmdiff evaluation encoder on image-caption shards, and its held-out retrieval accuracy.

`train_eval_encoder(train_shards, val_shards, out)` reads the training records into memory (images resized to the
encoder's resolution, uint8), trains a word-level tokenizer on every training caption, trains
`ContrastiveEvalEncoder` with AdamW (warm-up, then cosine) on the symmetric InfoNCE loss, measures retrieval on the
validation shards and saves the folder atomically. A record whose `.json` lists several phrasings ("captions", as
the shapes data has) is trained on a phrasing drawn at random each time it is used, any caption otherwise.
The held-out retrieval accuracy is `encoder_retrieval.retrieval_accuracy` on the validation pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmdiff.data.images import resize_center_crop
from mmdiff.data.shards import SkipStats, expand_urls, iterate_records
from mmdiff.data.tokenizer import encode_captions, train_word_level_tokenizer

from .contrastive_model import (
    ContrastiveEvalEncoder,
    MMDiffEvalEncoder,
    contrastive_loss,
    default_channels,
    is_eval_encoder_folder,
)
from .retrieval import retrieval_accuracy

MAX_IMAGE_BYTES = 8 * 2**30  # the training images are held in memory as uint8
MAX_VOCABULARY = 20000  # rarer words become [UNK]: a big vocabulary would dominate the encoder's size
MAX_TEXT_LENGTH = 64
DEFAULT_STEPS = 1000
CURVE_COLUMNS = [
    "step",
    "image_to_text_top1",
    "text_to_image_top1",
    "full_image_to_text_top1",
    "full_text_to_image_top1",
]
TRAINING_FILE = "training.json"
TOKENIZER_FOLDER = "tokenizer"


@dataclass
class PairSet:
    """Image-caption records in shard order: pixels (N, 3, S, S) uint8, each record's caption choices (the first
    is its reference caption: the json "canonical" when there is one, else the txt) and what was skipped."""

    urls: list[str]
    pixels: torch.Tensor
    choices: list[list[str]] = field(default_factory=list)
    source_sizes: tuple[int, int] = (0, 0)  # (min, max) shorter side before resizing
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def captions(self) -> list[str]:
        return [options[0] for options in self.choices]

    def __len__(self) -> int:
        return len(self.choices)


def _caption_choices(caption: str, attrs: dict[str, Any] | None) -> list[str]:
    phrasings = attrs.get("captions") if attrs else None
    phrasings = [" ".join(p.split()) for p in phrasings if isinstance(p, str) and p.strip()] if phrasings else []
    canonical = attrs.get("canonical") if attrs else None
    reference = " ".join(canonical.split()) if isinstance(canonical, str) and canonical.strip() else caption
    # the txt is one drawn phrasing when phrasings exist (shapes); alone it is the only caption
    return list(dict.fromkeys([reference, *phrasings])) if phrasings else list(dict.fromkeys([reference, caption]))


def read_pairs(
    shards: str | list[str], image_size: int | None = None, max_records: int | None = None
) -> tuple[PairSet, int]:
    """The first `max_records` usable records of `shards`, resized to `image_size` (default: the shorter side of
    the first image); returns them and the size used. Bad records are skipped and counted, as in training."""
    urls = expand_urls(shards)
    stats = SkipStats()
    rows: list[torch.Tensor] = []
    choices: list[list[str]] = []
    sides: list[int] = []
    for _key, image, caption, attrs in iterate_records(urls, stats=stats):
        if image_size is None:
            image_size = min(image.size)
        if (len(rows) + 1) * 3 * image_size**2 > MAX_IMAGE_BYTES:
            raise ValueError(
                f"{shards!r}: more than {len(rows)} images at {image_size} px do not fit in "
                f"{MAX_IMAGE_BYTES / 2**30:.0f} GiB; pass --max-records or a smaller --image-size"
            )
        sides.append(min(image.size))
        array = np.asarray(resize_center_crop(image, image_size), dtype=np.uint8)
        rows.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        choices.append(_caption_choices(caption, attrs))
        if max_records is not None and len(rows) >= max_records:
            break
    if not rows:
        raise ValueError(f"no usable image-caption records in {shards!r} (skipped: {stats.summary()})")
    pixels = torch.stack(rows)  # (N, 3, S, S) uint8
    return PairSet(urls, pixels, choices, (min(sides), max(sides)), stats.as_dict()), image_size


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float (N, 3, S, S) in [-1, 1], the same numbers as `loader.image_to_tensor`."""
    return pixels.float().div(127.5).sub(1.0)


def caption_words(tokenizer, text: str) -> list[str]:
    """The words of `text` as the word-level tokenizer sees them (normalised, split on space and punctuation)."""
    backend = tokenizer.backend_tokenizer
    normalised = backend.normalizer.normalize_str(text) if backend.normalizer else text
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalised)]


def word_coverage(tokenizer, texts: list[str]) -> float:
    """Fraction of the words of `texts` that are in the tokenizer's vocabulary (1.0 for no words)."""
    vocab = tokenizer.get_vocab()
    words = [word for text in texts for word in caption_words(tokenizer, text)]
    return sum(word in vocab for word in words) / len(words) if words else 1.0


def build_caption_tokenizer(captions: list[str], max_vocabulary: int = MAX_VOCABULARY):
    """A word-level tokenizer (mmdiff.data.tokenizer) of the captions, keeping at most `max_vocabulary` tokens by
    raising the minimum word frequency; returns it and that minimum frequency."""
    tokenizer = train_word_level_tokenizer(captions)
    if len(tokenizer) <= max_vocabulary:
        return tokenizer, 1
    counts = sorted(Counter(w for c in captions for w in caption_words(tokenizer, c)).values(), reverse=True)
    min_frequency = counts[max_vocabulary - len(tokenizer.all_special_ids) - 1] + 1
    return train_word_level_tokenizer(captions, min_frequency=min_frequency), min_frequency


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr / 10 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def data_fingerprint(pairs: PairSet) -> dict[str, Any]:
    """What a later user needs to tell which data an encoder was trained on: the shard file names, their number,
    the record count and a short hash of (sorted names, file sizes, record count)."""
    names = sorted(os.path.basename(url) for url in pairs.urls)
    sizes = [os.path.getsize(url) if os.path.isfile(url) else None for url in sorted(pairs.urls)]
    digest = hashlib.sha1(json.dumps([names, sizes, len(pairs)]).encode()).hexdigest()[:12]
    shown = names if len(names) <= 64 else [*names[:32], f"... {len(names) - 64} more ...", *names[-32:]]
    return {"fingerprint": digest, "num_shards": len(names), "shard_names": shown, "num_records": len(pairs)}


def check_out_folder(out: str | os.PathLike, is_replaceable) -> Path:
    """`out` as a Path, or FileExistsError when it exists and is neither empty nor `is_replaceable(out)`."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_replaceable(out))):
        raise FileExistsError(f"{out} exists and is not an mmdiff eval encoder folder; choose another --out")
    return out


def write_atomically(out: str | os.PathLike, write, is_replaceable) -> Path:
    """Call `write(folder)` on a temporary sibling of `out`, then rename it to `out`; on any failure nothing is left.

    An existing `out` is replaced only when `is_replaceable(out)` (an older eval encoder) or it is empty, so a
    mistyped `--out` cannot delete other files.
    """
    out = check_out_folder(out, is_replaceable)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def fit(
    model: ContrastiveEvalEncoder,
    tokenizer,
    train: PairSet,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    measure=None,
    eval_every: int = 0,
    progress: bool = True,
) -> tuple[list[list[float]], list[list[float]]]:
    """The training loop: AdamW, warm-up + cosine (`lr_at`), symmetric InfoNCE with same-caption pairs left out of
    each other's negatives, batches drawn epoch by epoch without replacement, each record's caption drawn among its
    phrasings. Returns the loss curve [[step, mean loss]] and, when `measure` and `eval_every` are given, the
    retrieval curve (rows of CURVE_COLUMNS)."""
    device = next(model.parameters()).device
    decayed = {n for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": 0.05},
            {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0},
        ]
    )
    groups = torch.tensor(_group_ids(train.captions))
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    batch = min(batch_size, len(train))
    order, cursor = torch.randperm(len(train), generator=generator), 0
    losses, retrieval_curve, window = [], [], []
    log_every = max(1, steps // 100)
    model.train()
    bar = tqdm(range(steps), desc="eval-encoder", dynamic_ncols=True, disable=not progress)
    for step in bar:
        if cursor + batch > len(train):  # a new epoch: every record once before any twice
            order, cursor = torch.randperm(len(train), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        texts = [rng.choice(train.choices[i]) for i in index.tolist()]
        ids = encode_captions(tokenizer, texts, model.config.max_length)[0]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        image_emb, text_emb = model(to_unit_range(train.pixels[index]).to(device), ids.to(device))  # (B, E) each
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale, groups[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append([step + 1, round(float(np.mean(window)), 4)])
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            window = []
        if measure is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            point = measure()
            figures = [point[k] for k in ("image_to_text_top1", "text_to_image_top1")]
            figures += [point["full_gallery"][k] for k in ("image_to_text_top1", "text_to_image_top1")]
            retrieval_curve.append([step + 1, *(round(x, 4) for x in figures)])
            model.train()
    model.eval()
    return losses, retrieval_curve


def train_eval_encoder(
    train_shards: str | os.PathLike | list[str],
    val_shards: str | os.PathLike | list[str],
    out: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 256,
    image_size: int | None = None,
    lr: float = 2e-3,
    seed: int = 0,
    max_records: int | None = None,
    max_val_records: int = 5000,
    gallery_size: int = 32,
    model_config: dict[str, Any] | None = None,
    eval_every: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an eval encoder on `train_shards`, measure retrieval on `val_shards`, save it to `out`; returns the
    training record (also `out/training.json`).

    image_size: the encoder's resolution (default: the shorter side of the first training image). max_records /
    max_val_records: how many records of each split are read. gallery_size: R of the retrieval galleries (reduced
    to the number of distinct validation captions when there are fewer). model_config: overrides of
    `ContrastiveEvalEncoder`'s arguments. eval_every: also measure the retrieval every that many steps (the
    `retrieval_curve` of training.json: has it plateaued?). `out` gets config.json +
    diffusion_pytorch_model.safetensors, tokenizer/ and training.json, all at once or not at all.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_out_folder(out, is_eval_encoder_folder)  # before minutes of training, not after
    started = time.time()
    train, image_size = read_pairs(train_shards, image_size, max_records)
    val, _ = read_pairs(val_shards, image_size, max_val_records)
    all_captions = [c for options in train.choices for c in options]
    tokenizer, min_frequency = build_caption_tokenizer(all_captions)
    config = {
        "vocab_size": len(tokenizer),
        "image_size": image_size,
        "channels": default_channels(image_size),
        "max_length": min(max(len(caption_words(tokenizer, c)) for c in all_captions), MAX_TEXT_LENGTH),
        "pad_token_id": tokenizer.pad_token_id,
        "source_min_size": train.source_sizes[0],
        "source_max_size": train.source_sizes[1],
    }
    torch.manual_seed(seed)
    model = ContrastiveEvalEncoder(**config | (model_config or {})).to(device)
    encoder = MMDiffEvalEncoder(model, tokenizer, device=device)
    gallery = min(gallery_size, len(set(val.captions)))

    def measure() -> dict[str, Any]:
        image_emb, text_emb = _embed_pixels(encoder, val.pixels), encoder.embed_texts(val.captions)
        return retrieval_accuracy(image_emb, text_emb, val.captions, gallery, seed)

    read_seconds, started = time.time() - started, time.time()
    losses, retrieval_curve = fit(model, tokenizer, train, steps, batch_size, lr, seed, measure, eval_every, progress)
    train_seconds = time.time() - started
    retrieval = measure()
    retrieval["how"] = (
        f"top-1 over {retrieval['num_galleries']} seeded galleries of {gallery} validation pairs with distinct "
        "captions (as R-precision); a hit when the retrieved caption string equals the query's own caption; "
        "full_gallery: top-1 over all validation pairs, same rule"
    )
    record = {
        "kind": "mmdiff eval encoder",
        "train_shards": _shard_spec(train_shards),
        "val_shards": _shard_spec(val_shards),
        "train_data": data_fingerprint(train) | {"skipped": train.skipped, "captions": len(all_captions)},
        "val_data": data_fingerprint(val) | {"skipped": val.skipped},
        "image_size": image_size,
        "source_image_sizes": list(train.source_sizes),
        "steps": steps,
        "batch_size": min(batch_size, len(train)),
        "lr": lr,
        "seed": seed,
        "max_records": max_records,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "read_seconds": round(read_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "final_loss": losses[-1][1] if losses else None,
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "vocabulary": {
            "size": len(tokenizer),
            "min_frequency": min_frequency,
            "max_length": model.config.max_length,
            "train_word_coverage": round(word_coverage(tokenizer, all_captions), 4),
            "val_word_coverage": round(word_coverage(tokenizer, val.captions), 4),
        },
        "retrieval": retrieval,
        "retrieval_curve": {"columns": CURVE_COLUMNS, "rows": retrieval_curve},
        "losses": losses,
    }

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)
        (folder / TRAINING_FILE).write_text(json.dumps(record, indent=1))

    write_atomically(out, write, is_eval_encoder_folder)
    return record


def _shard_spec(shards: str | os.PathLike | list) -> str | list[str]:
    return str(shards) if isinstance(shards, (str, os.PathLike)) else [str(s) for s in shards]


def _group_ids(captions: list[str]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(caption, len(ids)) for caption in captions]


@torch.no_grad()
def _embed_pixels(encoder: MMDiffEvalEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised (N, E) embeddings of uint8 (N, 3, S, S) images already at the encoder's size (the numbers that
    `encoder.embed_images` computes from the same images as PIL images)."""
    out = []
    for start in range(0, len(pixels), encoder.batch_size):
        batch = to_unit_range(pixels[start : start + encoder.batch_size]).to(encoder.device)
        out.append(encoder.model.encode_image(batch).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
