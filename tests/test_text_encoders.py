"""Frozen text encoders (CLIP, T5, open_clip) loaded from local folders: freezing, fidelity, shapes, padding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

import mmdiff.conditioning.text
from mmdiff.conditioning.text import tokenize_for_frozen_encoder
from mmdiff.models.text_encoders import (
    OpenCLIPTextEncoder,
    encode_with_frozen_encoder,
    frozen_encoder_dim,
    load_frozen_text_encoder,
)

WORDS = "a an the small large red green blue circle square triangle above below left of right".split()
PROMPTS = ["a small red circle", "the large blue square above a green triangle left of a circle"]
MAX_LENGTH = 16


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``WORDS``: ids 0-3 are pad, unk, bos, eos; bos/eos wrap every prompt."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_clip() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config)


def tiny_t5() -> T5EncoderModel:
    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0)
    return T5EncoderModel(config)


def tiny_open_clip() -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder(vocab_size=64, context_length=MAX_LENGTH, width=32, heads=2, layers=2, output_dim=16)


def reference_outputs(kind: str, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original (unfrozen, in-memory) model's per-token outputs, called the model's own way."""
    with torch.no_grad():
        if kind == "open_clip":
            return model(ids, mask)
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize(
    ("kind", "build"), [("clip", tiny_clip), ("t5", tiny_t5), ("open_clip", tiny_open_clip)], ids=["clip", "t5", "oc"]
)
def test_frozen_encoder_roundtrip(tmp_path, kind, build):
    torch.manual_seed(0)
    model = build().eval()
    tokenizer = tiny_tokenizer()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")), "weights must be saved as safetensors"

    encoder, loaded_tokenizer = load_frozen_text_encoder(kind, tmp_path)
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert frozen_encoder_dim(encoder) == 32

    ids, mask = tokenize_for_frozen_encoder(loaded_tokenizer, PROMPTS, MAX_LENGTH)
    assert ids.shape == mask.shape == (2, MAX_LENGTH)
    assert mask[0].tolist() == [1] * 6 + [0] * (MAX_LENGTH - 6)  # bos + 4 words + eos, then padding
    assert ids[0, 0].item() == 2 and ids[0, 5].item() == 3

    hidden = encode_with_frozen_encoder(encoder, ids, mask)
    assert hidden.shape == (2, MAX_LENGTH, 32)
    assert not hidden.requires_grad
    torch.testing.assert_close(hidden, reference_outputs(kind, model, ids, mask))

    # Padding is respected: what sits in padded positions, and how much padding there is, does not change real tokens.
    real = mask.bool()
    garbage = torch.where(real, ids, torch.randint_like(ids, 4, 64))
    torch.testing.assert_close(encode_with_frozen_encoder(encoder, garbage, mask)[real], hidden[real])
    short_ids, short_mask = tokenize_for_frozen_encoder(loaded_tokenizer, PROMPTS[:1], 8)
    short = encode_with_frozen_encoder(encoder, short_ids, short_mask)
    torch.testing.assert_close(short[0, :6], hidden[0, :6], rtol=1e-4, atol=1e-5)


def test_open_clip_encoder_is_diffusers_component(tmp_path):
    torch.manual_seed(0)
    model = tiny_open_clip().eval()
    model.save_pretrained(tmp_path / "text_encoder")
    reloaded = OpenCLIPTextEncoder.from_pretrained(tmp_path / "text_encoder")
    assert reloaded.config.width == 32 and reloaded.config.output_dim == 16
    ids = torch.randint(0, 64, (3, MAX_LENGTH))
    torch.testing.assert_close(reloaded(ids), model(ids))
    # Full attention mask == open_clip's own TextTransformer token output (ln_final before pooling).
    model.text.output_tokens = True
    torch.testing.assert_close(model(ids), model.text(ids)[1])


def test_open_clip_without_tokenizer_falls_back_to_clip_bpe(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_open_clip().eval()
    model.save_pretrained(tmp_path / "text_encoder")  # pipeline layout, no tokenizer anywhere
    encoder, tokenizer = load_frozen_text_encoder("open_clip", tmp_path)
    assert tokenizer is None

    # Stand in for the CLIP BPE builder so the test checks the wiring without the real 49k vocabulary (7 s to build).
    monkeypatch.setattr(mmdiff.conditioning.text, "clip_bpe_tokenizer", tiny_tokenizer)
    ids, mask = tokenize_for_frozen_encoder(None, PROMPTS, MAX_LENGTH)
    expected_ids, expected_mask = tokenize_for_frozen_encoder(tiny_tokenizer(), PROMPTS, MAX_LENGTH)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert encode_with_frozen_encoder(encoder, ids, mask).shape == (2, MAX_LENGTH, 32)


def test_open_clip_pad_ids_outside_vocab_are_masked_away():
    torch.manual_seed(0)
    model = tiny_open_clip().eval()
    ids = torch.randint(4, 64, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    out_of_vocab = ids.masked_fill(mask == 0, 1000)  # e.g. a pad token added after the pretrained vocabulary
    torch.testing.assert_close(
        encode_with_frozen_encoder(model, out_of_vocab, mask)[:, :5],
        encode_with_frozen_encoder(model, ids, mask)[:, :5],
    )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode_with_frozen_encoder(model, out_of_vocab, torch.ones_like(mask))


def test_open_clip_from_open_clip_checkpoint(tmp_path):
    import open_clip
    from open_clip.transformer import text_global_pool

    torch.manual_seed(0)
    model_config = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": MAX_LENGTH, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    }
    clip = open_clip.model.CLIP(**model_config).eval()
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights)

    encoder = OpenCLIPTextEncoder.from_open_clip_checkpoint(model_config, weights)
    assert encoder.config.quick_gelu and encoder.config.output_dim == 16
    ids = torch.randint(4, 63, (2, MAX_LENGTH))
    ids[:, -1] = 63  # argmax pooling picks the highest id, CLIP's end-of-text token
    with torch.no_grad():
        tokens = encoder(ids)
        pooled = text_global_pool(tokens, ids, pool_type="argmax") @ encoder.text.text_projection
        torch.testing.assert_close(pooled, clip.encode_text(ids))

    encoder.save_pretrained(tmp_path / "converted")
    frozen, _ = load_frozen_text_encoder("open_clip", tmp_path / "converted")
    torch.testing.assert_close(encode_with_frozen_encoder(frozen, ids, torch.ones_like(ids)), tokens)

    with pytest.raises(ValueError, match="unsupported open_clip text_cfg"):
        OpenCLIPTextEncoder.from_open_clip_checkpoint({"text_cfg": {"bogus_option": 1}}, weights)


def test_errors_name_kind_and_path(tmp_path):
    with pytest.raises(ValueError, match=r"'bert'.*clip, t5, open_clip"):
        load_frozen_text_encoder("bert", tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_frozen_text_encoder("clip", missing)
    tiny_t5().save_pretrained(tmp_path / "t5_no_tokenizer")
    with pytest.raises(FileNotFoundError, match="t5_no_tokenizer"):
        load_frozen_text_encoder("t5", tmp_path / "t5_no_tokenizer")
