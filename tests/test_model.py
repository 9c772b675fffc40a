"""The shared MMDiT: shapes, condition dropout, context caching, save/load."""

from __future__ import annotations

import torch
from conftest import make_model

from mmdiff.models.transformer import MMDiTModel
from mmdiff.training.losses import drop_ids


def test_forward_shapes_for_both_tasks(model, tokenizer):
    latents = torch.randn(3, 4, 8, 8)
    ids = torch.randint(0, len(tokenizer), (3, 12))
    text_ctx, text_mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
    image_ctx, image_mask = model.encode_image(latents)
    assert text_ctx.shape == (3, 12, 32) and image_ctx.shape == (3, 16, 32) and image_mask.all()
    assert model(latents, torch.rand(3), text_ctx, text_mask).shape == (3, 4, 8, 8)
    assert model(ids, torch.rand(3), image_ctx, image_mask).shape == (3, 12, len(tokenizer))
    # a non-square latent grid works too (positional embedding computed for the grid)
    assert model(torch.randn(1, 4, 8, 12), 0.5, text_ctx[:1], text_mask[:1]).shape == (1, 4, 8, 12)


def test_init_is_adaln_zero():
    torch.manual_seed(0)
    fresh = MMDiTModel(sample_size=8, vocab_size=20, max_text_length=6, hidden_size=32, depth=2, num_heads=2)
    ctx, mask = fresh.null_context("text", 2)
    assert torch.count_nonzero(fresh(torch.randn(2, 4, 8, 8), 0.3, ctx, mask)) == 0
    assert torch.count_nonzero(fresh(torch.randint(0, 20, (2, 6)), 0.3, ctx, mask)) == 0


def test_padding_keys_are_ignored(model, tokenizer):
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["a", "small", "red", "circle"]) + [0] * 8])
    ctx, mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
    latents = torch.randn(1, 4, 8, 8)
    out = model(latents, 0.5, ctx, mask)
    garbage = ctx.clone()
    garbage[:, 4:] = torch.randn_like(garbage[:, 4:]) * 10
    assert torch.allclose(model(latents, 0.5, garbage, mask), out, atol=1e-5)


def test_condition_dropout_rate_and_null_context(model):
    drops = drop_ids(20000, 0.1, "cpu", torch.Generator().manual_seed(0))
    assert abs(drops.float().mean().item() - 0.1) < 0.01
    assert not drop_ids(100, 0.0, "cpu").any()
    ctx, mask = torch.randn(4, 5, 32), torch.ones(4, 5, dtype=torch.bool)
    which = torch.tensor([True, False, True, False])
    dropped, dmask = model.drop_context(ctx, mask, which, "text")
    null, null_mask = model.null_context("text", 4, 5)
    assert torch.equal(dropped[which], null[which]) and torch.equal(dmask[which], null_mask[which])
    assert torch.equal(dropped[~which], ctx[~which]) and dmask[~which].all()
    assert dmask[0].tolist() == [True, False, False, False, False]
    image_null, _ = model.null_context("image", 1)
    assert not torch.equal(image_null, model.null_context("text", 1)[0])


def test_precomputed_context_kv_equals_recomputing(model):
    ctx, mask = model.encode_image(torch.randn(2, 4, 8, 8))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    kv = model.context_kv(ctx)
    assert torch.equal(model(ids, 0.4, ctx, mask), model(ids, 0.4, context_mask=mask, context_kv=kv))


def test_save_load_identical_outputs(tmp_path, tokenizer):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "transformer")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MMDiTModel.from_pretrained(tmp_path / "transformer").eval()
    latents, ids = torch.randn(2, 4, 8, 8), torch.randint(0, len(tokenizer), (2, 12))
    ctx, mask = model.encode_text(ids)
    assert torch.equal(model(latents, 0.7, ctx, mask), loaded(latents, 0.7, *loaded.encode_text(ids)))


def test_gradient_checkpointing_gives_same_gradients(tokenizer):
    grads = []
    for checkpointing in (False, True):
        model = make_model(tokenizer).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        ctx, mask = model.null_context("text", 2)
        model(torch.ones(2, 4, 8, 8), 0.5, ctx, mask).square().sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
