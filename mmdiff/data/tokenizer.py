"""Caption tokenizers: transformers fast tokenizers that always carry distinct pad and mask tokens.

The text diffusion process masks tokens with the mask id and supervises pad positions as end-of-caption, so every
builder here guarantees ``tokenizer.pad_token_id`` and ``tokenizer.mask_token_id`` exist and differ. Captions are
encoded without BOS/EOS: the trailing pads are the end marker.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, CLIPTokenizerFast, PreTrainedTokenizerFast

from mmdiff.hub import resolve_pretrained

PAD_TOKEN = "[PAD]"
MASK_TOKEN = "[MASK]"
UNK_TOKEN = "[UNK]"
TOKENIZER_KINDS = ("word", "clip_bpe", "pretrained")

# CLIP's BPE file holds 49152 - 256 - 2 merges after its header line (same slice as OpenAI's and open_clip's code).
_CLIP_NUM_MERGES = 49152 - 256 - 2


def train_word_level_tokenizer(captions: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on ``captions``: lowercased words and punctuation marks are the tokens.

    Ids 0, 1, 2 are "[PAD]", "[MASK]", "[UNK]"; words seen fewer than ``min_frequency`` times map to "[UNK]".
    Captions that give no word at all (none, or none seen often enough) are a ValueError: a tokenizer of only its
    special tokens would turn every caption into "[UNK]"s and train a model on nothing.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # The WordPiece decoder joins tokens with spaces and then removes the space before punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(
        special_tokens=[PAD_TOKEN, MASK_TOKEN, UNK_TOKEN], min_frequency=min_frequency, show_progress=False
    )
    tok.train_from_iterator((c for c in captions), trainer=trainer)
    if tok.get_vocab_size() <= 3:
        seen = f" seen at least {min_frequency} times" if min_frequency > 1 else ""
        raise ValueError(f"the captions hold no word{seen}: a word-level tokenizer needs a vocabulary to train on")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, mask_token=MASK_TOKEN, unk_token=UNK_TOKEN
    )


def open_clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open_clip package.

    Found from the package spec, not by importing open_clip, because that import pulls in torchvision and models.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed; it ships the CLIP BPE vocabulary (pip install open-clip-torch)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"bpe_simple_vocab_16e6.txt.gz not found in {list(spec.submodule_search_locations)}")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character table, so byte-level BPE never sees whitespace/control bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[str, str]:
    """vocab.json and merges.txt contents built exactly as CLIP builds its encoder (49408 entries)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _CLIP_NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False)
    return vocab_json, "#version: 0.2\n" + "\n".join(merges) + "\n"


def clip_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """The CLIP BPE tokenizer (lowercasing, 49408 tokens) from the vocabulary open_clip ships, plus [PAD] and [MASK].

    A dedicated "[PAD]" is added instead of CLIP's default pad "<|endoftext|>", which is also CLIP's unk token.
    """
    vocab_json, merges_txt = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(vocab_json, encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(merges_txt, encoding="utf-8")
        tokenizer = CLIPTokenizerFast.from_pretrained(tmp)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "mask_token": MASK_TOKEN})
    return ensure_special_tokens(tokenizer)


def ensure_special_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Add "[PAD]" / "[MASK]" when the tokenizer lacks a pad or mask token (or they coincide); returns it."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.mask_token is None or tokenizer.mask_token_id == tokenizer.pad_token_id:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.mask_token_id == tokenizer.pad_token_id:
        raise ValueError(f"pad and mask tokens share id {tokenizer.pad_token_id}; fix the tokenizer's special tokens")
    return tokenizer


def load_tokenizer(path: str | Path, revision: str | None = None) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer saved with ``save_pretrained`` from a folder, or from a hub id ("org/name") fetched into
    the Hugging Face cache at ``revision`` (:func:`mmdiff.hub.resolve_pretrained`); a folder is never downloaded to."""
    path = resolve_pretrained(path, revision=revision, what="tokenizer")
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer at {path} is not a fast (tokenizers-backed) tokenizer")
    return ensure_special_tokens(tokenizer)


def build_tokenizer(
    kind: str,
    captions: Iterable[str] | None = None,
    path: str | Path | None = None,
    min_frequency: int = 1,
    revision: str | None = None,
) -> PreTrainedTokenizerFast:
    """Build a tokenizer of ``kind``: "word" (trained on ``captions``), "clip_bpe", or "pretrained" (from ``path``, a
    folder or a hub id at ``revision``)."""
    if kind == "word":
        if captions is None:
            raise ValueError("tokenizer kind 'word' needs captions to train on")
        return train_word_level_tokenizer(captions, min_frequency=min_frequency)
    if kind == "clip_bpe":
        return clip_bpe_tokenizer()
    if kind == "pretrained":
        if path is None:
            raise ValueError("tokenizer kind 'pretrained' needs a path: a tokenizer folder or a hub id")
        return load_tokenizer(path, revision=revision)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")


def encode_captions(
    tokenizer: PreTrainedTokenizerFast, captions: Sequence[str], max_length: int
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Encode without BOS/EOS, truncate to ``max_length`` and right-pad with exactly the pad id.

    Returns ids of shape (N, max_length) and a (N,) flag telling which captions were truncated. The tokenizer itself
    truncates (to one token past ``max_length``, which tells a truncated caption from one that fits), so a long
    caption's ids are never all kept; the data readers also cut captions to ``shards.MAX_CAPTION_BYTES`` first.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("tokenizer has no pad token; call ensure_special_tokens first")
    encoded = tokenizer(
        list(captions), add_special_tokens=False, padding=False, truncation=True, max_length=max_length + 1
    )["input_ids"]
    ids = torch.full((len(encoded), max_length), pad_id, dtype=torch.long)
    truncated = torch.zeros(len(encoded), dtype=torch.bool)
    for row, seq in enumerate(encoded):
        truncated[row] = len(seq) > max_length
        seq = seq[:max_length]
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, truncated


def decode_captions(tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """Decode (N, L) ids: stop at the first pad, drop mask and other special tokens, normalise spacing."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    if rows and not isinstance(rows[0], list):
        raise ValueError("decode_captions expects a batch of id sequences with shape (N, L)")
    pad_id = tokenizer.pad_token_id
    special = set(tokenizer.all_special_ids)
    texts = []
    for row in rows:
        if pad_id in row:
            row = row[: row.index(pad_id)]
        kept = [int(i) for i in row if int(i) not in special]
        text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        texts.append(" ".join(text.split()))
    return texts
