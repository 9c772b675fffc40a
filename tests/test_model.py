"""The shared MMDiT: shapes, condition dropout, context caching, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import close_at_scale, make_model, relative_error

from mmdiff.conditioning.prepared import prepare_context
from mmdiff.models.blocks import AbsorbedContext
from mmdiff.models.transformer import MMDiffTransformer2DModel, select_context_rows
from mmdiff.training.losses import drop_ids


def fast(model, sample, t, mask=None, **prepared):
    """The forward on a context the conditioning layer prepared (a cache, null rows, repeated rows): `prepared` are
    `prepare_context`'s arguments (`ctx` for its `context`)."""
    if "ctx" in prepared:
        prepared["context"] = prepared.pop("ctx")
    return model(sample, t, prepared=prepare_context(model, sample, mask, **prepared))


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


@pytest.mark.parametrize("adaln", ["per_block", "single"])
def test_init_is_adaln_zero(adaln):
    torch.manual_seed(0)
    fresh = MMDiffTransformer2DModel(
        sample_size=8, vocab_size=20, max_text_length=6, hidden_size=32, depth=2, num_heads=2, adaln=adaln
    )
    ctx, mask = fresh.null_context("text", 2)
    assert torch.count_nonzero(fresh(torch.randn(2, 4, 8, 8), 0.3, ctx, mask)) == 0
    assert torch.count_nonzero(fresh(torch.randint(0, 20, (2, 6)), 0.3, ctx, mask)) == 0


def test_adaln_single_shares_one_linear_and_learns_per_block_offsets(tokenizer):
    per_block, single = make_model(tokenizer, adaln="per_block"), make_model(tokenizer, adaln="single")
    d, depth = 32, 2
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # depth linears (D -> 6D) become one shared linear plus a (6, D) table per block
    assert count(per_block) - count(single) == depth * (6 * d * d + 6 * d) - (6 * d * d + 6 * d) - depth * 6 * d
    # one training step moves the shared linear and every block's table; different tables give different blocks
    ctx, mask = single.null_context("text", 2)
    single(torch.randn(2, 4, 8, 8), 0.5, ctx, mask).square().sum().backward()  # zero at init: no gradient yet
    with torch.no_grad():
        for block in single.blocks:
            block.adaLN_table.normal_(std=0.1)
    single.zero_grad()
    ctx, mask = single.null_context("text", 2)  # a fresh graph: the first backward freed the old one
    single(torch.randn(2, 4, 8, 8), 0.5, ctx, mask).square().sum().backward()
    assert single.adaLN_single[-1].weight.grad.abs().sum() > 0
    assert all(block.adaLN_table.grad.abs().sum() > 0 for block in single.blocks)
    with pytest.raises(ValueError, match="adaln='layer' is not one of"):
        make_model(tokenizer, adaln="layer")


def test_padding_keys_are_ignored(model, tokenizer):
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["a", "small", "red", "circle"]) + [0] * 8])
    ctx, mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
    latents = torch.randn(1, 4, 8, 8)
    out = model(latents, 0.5, ctx, mask)
    garbage = ctx.clone()
    garbage[:, 4:] = torch.randn_like(garbage[:, 4:]) * 10
    assert close_at_scale(model(latents, 0.5, garbage, mask), out)


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
    assert torch.equal(model(ids, 0.4, ctx, mask), fast(model, ids, 0.4, mask, kv=kv))


def test_save_load_identical_outputs(tmp_path, tokenizer):
    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "transformer")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MMDiffTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    latents, ids = torch.randn(2, 4, 8, 8), torch.randint(0, len(tokenizer), (2, 12))
    ctx, mask = model.encode_text(ids)
    assert torch.equal(model(latents, 0.7, ctx, mask), loaded(latents, 0.7, *loaded.encode_text(ids)))


def test_saved_model_without_adaln_key_loads_as_per_block(tmp_path, tokenizer):
    # models saved before adaLN-single existed have no "adaln" in config.json: they must load as the per-block
    # layout they were trained with (all weights used, same outputs), not as the training config's new default
    model = make_model(tokenizer, adaln="per_block")
    model.save_pretrained(tmp_path / "transformer")
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    del config["adaln"]
    config_path.write_text(json.dumps(config))
    loaded = MMDiffTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    assert loaded.config.adaln == "per_block" and loaded.adaLN_single is None
    latents, ids = torch.randn(2, 4, 8, 8), torch.randint(0, len(tokenizer), (2, 12))
    ctx, mask = model.encode_text(ids)
    assert torch.equal(model(latents, 0.7, ctx, mask), loaded(latents, 0.7, *loaded.encode_text(ids)))


def test_gradient_checkpointing_gives_same_gradients(tokenizer):
    grads = []
    for checkpointing in (False, True):
        model = make_model(tokenizer).train()
        with torch.no_grad():  # off the zero init, so that the gradients are not all zero
            generator = torch.Generator().manual_seed(0)
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        if checkpointing:
            model.enable_gradient_checkpointing()
        ctx, mask = model.null_context("text", 2)
        model(torch.ones(2, 4, 8, 8), 0.5, ctx, mask).square().sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and close_at_scale(grads[0], grads[1])


@pytest.mark.parametrize("null_length", [1, 3])
def test_null_rows_equal_attending_to_the_null_context(tokenizer, null_length):
    # null_rows=k conditions the first k rows on the null context without K/V for them; a one-token null context
    # takes the constant-output shortcut, a longer one is attended to: both must equal the explicit null context
    model = make_model(tokenizer, null_context_length=null_length)
    with torch.no_grad():  # move off adaLN-Zero's zero init so that every branch (cross-attention too) matters
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(0, len(tokenizer), (3, 12))
    text_ctx, text_mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
    image_ctx, image_mask = model.encode_image(torch.randn(3, 4, 8, 8))
    t = torch.rand(5)
    for sample, ctx, mask, kind in (
        (torch.randn(5, 4, 8, 8), text_ctx, text_mask, "text"),
        (torch.randint(0, len(tokenizer), (5, 12)), image_ctx, image_mask, "image"),
    ):
        null, null_mask = model.null_context(kind, 2, ctx.shape[1])
        explicit = model(sample, t, torch.cat([null, ctx]), torch.cat([null_mask, mask]))
        assert close_at_scale(fast(model, sample, t, mask, ctx=ctx, null_rows=2), explicit)
        precomputed = model.null_outputs(kind)  # once per sampling call: a constant or the null K/V per block
        per_block_shape = (1, 32) if null_length == 1 else (2, 1, 2, null_length, 16)
        assert len(precomputed) == 2 and all(tuple(p.shape) == per_block_shape for p in precomputed)
        shortcut = fast(model, sample, t, mask, ctx=ctx, null_rows=2, null_outputs=precomputed)
        assert close_at_scale(shortcut, explicit)
        assert (
            relative_error(fast(model, sample, t, mask[[1, 0, 2]], ctx=ctx[[1, 0, 2]], null_rows=2), explicit) > 0.001
        )
    with pytest.raises(ValueError, match="null_rows=1 plus the context's 3 rows"):
        fast(model, torch.randn(5, 4, 8, 8), t, text_mask, ctx=text_ctx, null_rows=1)


@pytest.mark.parametrize("grad", [False, True])
def test_repeat_rows_equal_the_repeated_batch(tokenizer, grad):
    # repeat_rows=idx: the batch is cat([sample[idx], sample]) (a CFG batch's unconditional rows repeat the latents);
    # the first block's self-attention runs once per distinct row and must give what the repeated batch gives, with
    # the null-row shortcut and with explicit contexts, for both tasks, with and without autograd
    model = make_model(tokenizer)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(0, len(tokenizer), (3, 12))
    text_ctx, text_mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
    image_ctx, image_mask = model.encode_image(torch.randn(3, 4, 8, 8))
    idx = torch.tensor([2, 0])
    t = torch.rand(3)
    with torch.set_grad_enabled(grad):
        for sample, ctx, mask in (
            (torch.randn(3, 4, 8, 8), text_ctx, text_mask),
            (torch.randint(0, len(tokenizer), (3, 12)), image_ctx, image_mask),
        ):
            full, t_full = torch.cat([sample[idx], sample]), torch.cat([t[idx], t])
            # null rows: the repeated rows on the null context
            explicit = fast(model, full, t_full, mask, ctx=ctx, null_rows=2)
            assert close_at_scale(fast(model, sample, t, mask, ctx=ctx, null_rows=2, repeat=idx), explicit)
            # explicit contexts for every row (a negative prompt) and a scalar timestep
            ctx5, mask5 = torch.cat([ctx[[1, 1]], ctx]), torch.cat([mask[[1, 1]], mask])
            explicit = model(full, 0.3, ctx5, mask5)
            assert close_at_scale(fast(model, sample, 0.3, mask5, ctx=ctx5, repeat=idx), explicit)
            wrong = fast(model, sample, 0.3, mask5, ctx=ctx5, repeat=torch.tensor([0, 2]))
            assert relative_error(wrong, explicit) > 0.001
    with pytest.raises(ValueError, match="repeat must index the 3 rows"):
        fast(model, torch.randn(3, 4, 8, 8), t, text_mask, ctx=text_ctx, null_rows=1, repeat=torch.tensor([3]))


def test_absorbed_context_equals_keys_and_values(tokenizer, monkeypatch):
    # context_kv(..., absorb=True) folds the query/output projections and the key mask into the fixed context: the
    # forward must equal the keys/values path for both tasks, padded keys, null rows, repeated rows and row subsets
    model = make_model(tokenizer)  # width 32, 2 heads
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(4, len(tokenizer), (3, 12))
    ids[0, 5:] = tokenizer.pad_token_id  # a padded row: its masked keys must get no weight
    text_ctx, text_mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
    image_ctx, image_mask = model.encode_image(torch.randn(3, 4, 8, 8))
    idx, t = torch.tensor([2, 0]), torch.rand(3)
    with torch.no_grad():
        for sample, ctx, mask in (
            (torch.randn(3, 4, 8, 8), text_ctx, text_mask),
            (torch.randint(0, len(tokenizer), (3, 12)), image_ctx, image_mask),
        ):
            kv, absorbed = model.context_kv(ctx), model.context_kv(ctx, mask, absorb=True)
            assert isinstance(absorbed[0], AbsorbedContext) and absorbed[0].weight.shape == (3, 32, 2 * ctx.shape[1])
            reference = fast(model, sample, t, mask, kv=kv)
            assert close_at_scale(fast(model, sample, t, kv=absorbed), reference)
            guided = dict(null_rows=2, repeat=idx)
            assert close_at_scale(
                fast(model, sample, t, kv=absorbed, **guided),
                fast(model, sample, t, mask, kv=kv, **guided),
            )
            for rows in (slice(1, None), torch.tensor([2, 0])):
                assert close_at_scale(
                    fast(model, sample[rows], t[rows], kv=select_context_rows(absorbed, rows)),
                    fast(model, sample[rows], t[rows], mask[rows], kv=select_context_rows(kv, rows)),
                )
            # the mask is folded in: without it the padded keys of the first text row would take weight
            if not mask.all():
                loose = model.context_kv(ctx, None, absorb=True)
                assert relative_error(fast(model, sample, t, kv=loose), reference) > 0.0001
    # training: the same loss and the same gradients for the projections that were folded (and the text encoder)
    sample = torch.randn(3, 4, 8, 8)
    grads = []
    for absorb in (False, True):
        model.zero_grad()
        ctx, mask = model.encode_text(ids, ids != tokenizer.pad_token_id)
        fast(model, sample, t, mask, kv=model.context_kv(ctx, mask, absorb=absorb)).square().sum().backward()
        block = model.blocks[1].cross_attn
        grads.append([p.grad.clone() for p in (block.q.weight, block.q.bias, block.kv.weight, block.proj.weight)])
        grads[-1].append(model.token_embed.weight.grad.clone())
    assert all(g.abs().sum() > 0 and close_at_scale(g, h) for g, h in zip(*grads, strict=True))
    # what pays: cached for a sampling call, heads x S < D; folded every forward, S x (D + T x heads) < T x D
    assert model.absorb_pays(12) and not model.absorb_pays(16)
    assert model.absorb_pays(12, query_tokens=64) and not model.absorb_pays(12, query_tokens=16)
    folds = []
    original = AbsorbedContext.__new__
    monkeypatch.setattr(AbsorbedContext, "__new__", lambda cls, *a: folds.append(1) or original(cls, *a))
    model(torch.randn(1, 4, 8, 8), 0.5, text_ctx[:1], text_mask[:1])  # 16 image tokens, a 12-token context
    assert not folds
    model(torch.randn(1, 4, 8, 8), 0.5, text_ctx[:1, :2], text_mask[:1, :2])  # 2 x (32 + 32) < 16 x 32
    assert len(folds) == len(model.blocks)
    monkeypatch.undo()
    # auto: absorb when heads x context length < width (2 x 12 < 32 for this text context, 2 x 16 = 32 for the image)
    assert isinstance(model.context_kv(text_ctx, text_mask, absorb=None)[0], AbsorbedContext)
    assert not isinstance(model.context_kv(image_ctx, image_mask, absorb=None)[0], AbsorbedContext)
    longer = make_model(tokenizer, null_context_length=3)
    assert not isinstance(longer.context_kv(text_ctx, text_mask, absorb=None)[0], AbsorbedContext)
    with pytest.raises(ValueError, match="3-token null context is attended to"):
        prepare_context(
            longer, torch.randn(5, 4, 8, 8), kv=longer.context_kv(text_ctx, text_mask, absorb=True), null_rows=2
        )


def test_text_context_is_trimmed_to_the_longest_caption_exactly(model, tokenizer):
    # dynamic padding: the context keeps only the positions some row uses, and a caption encoded in a padded batch
    # gives the same context and the same image prediction as the caption encoded alone without padding
    short = tokenizer.convert_tokens_to_ids(["a", "small", "red", "circle"])
    long = tokenizer.convert_tokens_to_ids(
        ["a", "large", "blue", "square", "left", "of", "a", "small", "red", "circle"]
    )
    pad = tokenizer.pad_token_id
    batch = torch.tensor([short + [pad] * 8, long + [pad] * 2])
    ctx, mask = model.encode_text(batch, batch != pad)
    assert ctx.shape[1] == 10 and mask.shape == (2, 10) and mask[0].sum() == 4
    alone_ids = torch.tensor([short + [pad] * 8])
    alone, alone_mask = model.encode_text(alone_ids, alone_ids != pad)
    assert alone.shape[1] == 4 and alone_mask.all()
    assert close_at_scale(ctx[0, :4], alone[0])
    latents = torch.randn(1, 4, 8, 8)
    assert close_at_scale(model(latents, 0.5, ctx[:1], mask[:1]), model(latents, 0.5, alone, alone_mask))
    # frozen-encoder features are trimmed the same way
    projecting = make_model(tokenizer, external_text_dim=16)
    features = torch.randn(2, 12, 16)
    projected, projected_mask = projecting.encode_external_text(features, batch != pad)
    assert projected.shape == (2, 10, 32) and torch.equal(projected_mask, mask)
