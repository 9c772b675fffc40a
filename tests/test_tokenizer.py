"""Caption tokenizers: special tokens, round trips, padding/truncation and save/load."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmdiff.data.tokenizer import (
    build_tokenizer,
    clip_bpe_tokenizer,
    decode_captions,
    encode_captions,
    ensure_special_tokens,
    load_tokenizer,
    train_word_level_tokenizer,
)

CAPTIONS = [
    "a small red circle above a large blue square",
    "there is a large green triangle",
    "a small yellow square left of a small purple circle on a plain background",
    "a large orange triangle below a small blue circle",
]


@pytest.fixture(scope="module")
def word_tok():
    return train_word_level_tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def clip_tok():
    return clip_bpe_tokenizer()


def _assert_specials(tok):
    assert tok.pad_token is not None and tok.mask_token is not None
    assert tok.pad_token_id is not None and tok.mask_token_id is not None
    assert tok.pad_token_id != tok.mask_token_id
    assert tok.pad_token_id < len(tok) and tok.mask_token_id < len(tok)


def test_word_level_special_ids_and_vocab(word_tok):
    assert (word_tok.pad_token_id, word_tok.mask_token_id, word_tok.unk_token_id) == (0, 1, 2)
    _assert_specials(word_tok)
    words = {w for c in CAPTIONS for w in c.split()}
    assert len(word_tok) == len(words) + 3
    # Training is deterministic: the same captions give the same vocabulary.
    assert train_word_level_tokenizer(CAPTIONS).get_vocab() == word_tok.get_vocab()


def test_word_level_round_trip_lowercases_and_keeps_punctuation(word_tok):
    ids, truncated = encode_captions(word_tok, CAPTIONS, max_length=20)
    assert not truncated.any()
    assert decode_captions(word_tok, ids) == CAPTIONS
    ids, _ = encode_captions(word_tok, ["A  Small RED circle"], max_length=8)
    assert decode_captions(word_tok, ids) == ["a small red circle"]
    tok = train_word_level_tokenizer(["a red circle, above a blue square."])
    ids, _ = encode_captions(tok, ["A red circle, above a blue square."], max_length=12)
    assert decode_captions(tok, ids) == ["a red circle, above a blue square."]


def test_word_level_unknown_and_min_frequency():
    tok = train_word_level_tokenizer(["red red circle", "red square"], min_frequency=2)
    ids, _ = encode_captions(tok, ["red circle dog"], max_length=4)
    assert ids[0].tolist() == [tok.convert_tokens_to_ids("red"), tok.unk_token_id, tok.unk_token_id, tok.pad_token_id]


def test_clip_bpe_matches_clip_ids_and_round_trips(clip_tok):
    _assert_specials(clip_tok)
    # 49408 CLIP tokens (the last two are start/end of text) plus [PAD] and [MASK].
    assert len(clip_tok) == 49410
    assert clip_tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert {clip_tok.pad_token_id, clip_tok.mask_token_id} == {49408, 49409}
    # Reference ids of OpenAI CLIP's tokenizer for these words.
    ids, _ = encode_captions(clip_tok, ["a small red circle"], max_length=6)
    assert ids[0].tolist() == [320, 2442, 736, 7117, clip_tok.pad_token_id, clip_tok.pad_token_id]
    mixed = ["A Small RED Circle above a LARGE blue square", "There is a   purple triangle", *CAPTIONS]
    ids, truncated = encode_captions(clip_tok, mixed, max_length=24)
    assert not truncated.any()
    assert decode_captions(clip_tok, ids) == [" ".join(c.lower().split()) for c in mixed]


@pytest.mark.parametrize("kind", ["word", "clip_bpe"])
def test_save_load_round_trip(kind, word_tok, clip_tok, tmp_path):
    tok = word_tok if kind == "word" else clip_tok
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    _assert_specials(loaded)
    assert (loaded.pad_token, loaded.mask_token) == (tok.pad_token, tok.mask_token)
    assert (loaded.pad_token_id, loaded.mask_token_id) == (tok.pad_token_id, tok.mask_token_id)
    assert len(loaded) == len(tok)
    a, _ = encode_captions(tok, CAPTIONS, max_length=16)
    b, _ = encode_captions(loaded, CAPTIONS, max_length=16)
    assert torch.equal(a, b)
    assert decode_captions(loaded, b) == CAPTIONS
    assert build_tokenizer("pretrained", path=tmp_path / "tok").get_vocab() == loaded.get_vocab()


def test_encode_pads_exactly_and_reports_truncation(word_tok):
    ids, truncated = encode_captions(word_tok, ["a red circle", CAPTIONS[2], ""], max_length=5)
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert truncated.dtype == torch.bool and truncated.tolist() == [False, True, False]
    pad = word_tok.pad_token_id
    assert ids[0, 3:].tolist() == [pad, pad] and pad not in ids[0, :3].tolist()
    assert ids[1].tolist() == word_tok(CAPTIONS[2], add_special_tokens=False)["input_ids"][:5]
    assert ids[2].tolist() == [pad] * 5
    assert decode_captions(word_tok, ids) == ["a red circle", " ".join(CAPTIONS[2].split()[:5]), ""]


def test_decode_stops_at_pad_and_drops_mask(word_tok, clip_tok):
    for tok in (word_tok, clip_tok):
        ids, _ = encode_captions(tok, ["a small red circle"], max_length=8)
        row = ids[0].tolist()
        row[1] = tok.mask_token_id
        row[6] = tok.convert_tokens_to_ids(tok.tokenize("blue"))[0]
        assert decode_captions(tok, [row]) == ["a red circle"]
        assert decode_captions(tok, torch.tensor([row])) == ["a red circle"]


def test_ensure_special_tokens_adds_missing():
    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert tok.pad_token is None and tok.mask_token is None
    tok = ensure_special_tokens(tok)
    _assert_specials(tok)
    assert {tok.pad_token_id, tok.mask_token_id} == {3, 4}
    # A tokenizer whose mask coincides with its pad gets a distinct mask token.
    same = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="b", mask_token="b")
    same = ensure_special_tokens(same)
    _assert_specials(same)
    assert same.pad_token == "b"


def test_build_tokenizer_dispatch_and_errors(tmp_path):
    assert build_tokenizer("word", captions=CAPTIONS).pad_token_id == 0
    with pytest.raises(ValueError, match="bogus"):
        build_tokenizer("bogus")
    with pytest.raises(ValueError, match="captions"):
        build_tokenizer("word")
    with pytest.raises(ValueError, match="path"):
        build_tokenizer("pretrained")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
