"""diffusers' step-caching hooks (`transformer.enable_cache`) on a tiny 3-block model: exact when nothing is skipped,
close when blocks are skipped, undone by `disable_cache`, and never mixing the rows of different CFG layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import close_at_scale, make_model, relative_error
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

from mmdiff.conditioning.guided import Condition, GuidanceSpec, GuidedModel
from mmdiff.conditioning.prepared import prepare_context
from mmdiff.diffusion.process import GaussianProcess

PROMPTS = ["a small red circle above a large blue square", "there is a small green triangle"]
STEPS = 6
NEVER_PREDICTS = TaylorSeerCacheConfig(disable_cache_before_step=STEPS, taylor_factors_dtype=torch.float32)


@pytest.fixture
def cache_pipe(tokenizer, vae, noise_scheduler):
    from mmdiff.training.stages import build_pipeline

    pipe = build_pipeline(
        make_model(tokenizer, depth=3), vae, GaussianProcess(noise_scheduler).sampling_scheduler(), tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, **kw) -> torch.Tensor:
    kw = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "latent", **kw}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images


def _count_calls(modules) -> list[int]:
    """A one-element counter of the forward calls of `modules`: a submodule of what a hook skips (the hooks replace
    `forward`, so a forward hook on the skipped module itself would still fire)."""
    calls = [0]
    for module in modules:
        module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("config", [FirstBlockCacheConfig(threshold=0.0), NEVER_PREDICTS], ids=["fbc", "taylorseer"])
def test_a_cache_that_skips_nothing_equals_the_plain_run(cache_pipe, config):
    plain = _latents(cache_pipe)
    calls = _count_calls(block.mlp for block in cache_pipe.transformer.blocks)
    cache_pipe.transformer.enable_cache(config)
    assert torch.equal(_latents(cache_pipe), plain)
    assert calls[0] == STEPS * 3


def test_first_block_cache_skips_blocks_and_stays_close(cache_pipe):
    plain = _latents(cache_pipe)
    calls = _count_calls(block.mlp for block in cache_pipe.transformer.blocks)
    cache_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    cached = _latents(cache_pipe)
    assert STEPS < calls[0] < STEPS * 3  # block 0 runs at every step, the other two only at some
    assert not torch.equal(cached, plain) and relative_error(cached, plain) < 0.1


def test_taylorseer_predicts_attention_and_stays_close(cache_pipe):
    plain = _latents(cache_pipe)
    calls = _count_calls(block.attn.qkv for block in cache_pipe.transformer.blocks)  # inside the hooked forward
    config = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32)
    cache_pipe.transformer.enable_cache(config)
    cached = _latents(cache_pipe)
    assert calls[0] < STEPS * 3
    assert not torch.equal(cached, plain) and relative_error(cached, plain) < 0.1


def test_disable_cache_restores_the_plain_output(cache_pipe):
    plain = _latents(cache_pipe)
    cache_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    assert not torch.equal(_latents(cache_pipe), plain)
    cache_pipe.transformer.disable_cache()
    assert torch.equal(_latents(cache_pipe), plain)


def test_unfit_configs_and_captioning_are_refused(cache_pipe, i2t):
    with pytest.raises(ValueError, match="supported cache configs"):
        cache_pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 500))
    i2t.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="image direction only"):
        i2t(torch.zeros(3, 16, 16), num_inference_steps=2)


def test_a_cached_residual_stays_with_its_own_row(tokenizer):
    """Two steps of one CFG batch [null rows; conditional rows]: the second skips blocks 1-2 and reuses the first
    step's residual. Each conditional row gets its own residual: it matches a batch of conditional rows alone,
    while the null rows' output (and residual) differs."""
    model = make_model(tokenizer, depth=3)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    context, mask = model.encode_text(ids)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = [(sample, 0.9), (sample * 0.9, 0.8)]
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # skip whenever a residual is cached

    def run(guided: bool) -> torch.Tensor:
        model._reset_stateful_cache()
        for x, t in steps:
            extra = {"null_rows": 2, "repeat": torch.arange(2)} if guided else {}
            prepared = prepare_context(model, x, mask, context=context, **extra)
            with torch.no_grad(), model.cache_context("rows"):
                out = model(x, t, prepared=prepared)
        return out

    both, cond_only = run(guided=True), run(guided=False)
    assert close_at_scale(both[2:], cond_only)
    assert relative_error(both[:2], both[2:]) > 1e-2


def test_a_new_row_layout_starts_the_cache_anew(tokenizer):
    """With a guidance interval the batch is the conditional rows outside it and null + conditional rows inside:
    the first forward in a new layout runs every block, as without a cache, instead of reusing the residual of
    other rows."""
    model = make_model(tokenizer, depth=3)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    context, mask = model.encode_text(ids)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = GuidanceSpec(scales=(3.0,), interval=(0.2, 0.6))

    def run() -> list[torch.Tensor]:
        guided = GuidedModel(model, Condition(context, mask), "image", spec)
        with torch.no_grad():
            return [guided(sample, t) for t in (0.9, 0.8, 0.5, 0.4, 0.1)]

    plain = run()
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    cached = run()
    for step in (0, 2, 4):  # the first step of each layout
        assert torch.equal(cached[step], plain[step])
    assert not torch.equal(cached[1], plain[1])  # and the cache is in use within a layout
