"""Text-to-image in full: schedulers, guidance identities, the context cache, batching, seeds, sweeps, callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import close_at_scale, relative_error

from mmdiff.diffusion.guidance import classifier_free_guidance
from mmdiff.pipelines import SCHEDULERS, swap_scheduler

PROMPTS = ["a small red circle above a large blue square", "there is a small green triangle"]


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_gives_finite_deterministic_images_with_v_prediction(v_pipe, name):
    swap_scheduler(v_pipe, name)
    assert v_pipe.scheduler.config.prediction_type == "v_prediction"
    assert v_pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "np"}
    a = v_pipe(PROMPTS, generator=_seed(), **kw).images
    b = v_pipe(PROMPTS, generator=_seed(), **kw).images
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all() and np.array_equal(a, b)
    # the sampler starts from pure noise: the first timestep is the last training one
    assert int(v_pipe.scheduler.timesteps[0]) == v_pipe.scheduler.config.num_train_timesteps - 1


@torch.no_grad()
def test_batched_cfg_with_cached_kv_equals_two_separate_forwards_recomputing_context(v_pipe, monkeypatch):
    pipe = v_pipe
    steps, w = 3, 2.5
    calls = []
    original = pipe.transformer.context_kv
    monkeypatch.setattr(
        pipe.transformer, "context_kv", lambda c, *a, **k: calls.append(c.shape) or original(c, *a, **k)
    )
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=w, output_type="latent", generator=_seed()).images
    assert len(calls) == 1  # K/V of cond and uncond computed once for the whole call
    monkeypatch.undo()

    cond, cond_mask = pipe.text_context(*pipe.encode_prompt(PROMPTS)[:2])
    null, null_mask = pipe.transformer.null_context("text", 2, cond.shape[1])
    latents = torch.randn(out.shape, generator=_seed())
    pipe.scheduler.set_timesteps(steps)
    for timestep in pipe.scheduler.timesteps:
        t = timestep / pipe.scheduler.config.num_train_timesteps
        x = pipe.scheduler.scale_model_input(latents, timestep)
        # two forwards, each recomputing the context K/V from the context itself
        pred_cond = pipe.transformer(x, t, context=cond, context_mask=cond_mask)
        pred_uncond = pipe.transformer(x, t, context=null, context_mask=null_mask)
        pred = classifier_free_guidance(pred_cond, pred_uncond, w)
        latents = pipe.scheduler.step(pred, timestep, latents).prev_sample
    assert latents.abs().max() > 0.1 and close_at_scale(out, latents)
    unguided = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="latent", generator=_seed())
    assert relative_error(out, unguided.images) > 1e-3


def _np(pipe, prompt, **kw):
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "np", "generator": _seed(), **kw}
    return pipe(prompt, **kw).images


def _latents(pipe, prompt, **kw):
    """Two routes to the same samples are compared on the latents, at their scale (see conftest.relative_error):
    decoded and clipped pixels hide how far apart they are."""
    return _np(pipe, prompt, output_type="latent", **kw)


def test_unconditional_and_negative_prompts(pipe):
    assert np.array_equal(_np(pipe, None), _np(pipe, ""))
    assert not np.allclose(_np(pipe, ""), _np(pipe, PROMPTS[0]), atol=1e-4)
    # an empty negative prompt is the null context; a real one replaces it
    assert close_at_scale(_latents(pipe, PROMPTS, negative_prompt=""), _latents(pipe, PROMPTS))
    neg = _np(pipe, PROMPTS, negative_prompt="a large yellow circle")
    assert not np.allclose(neg, _np(pipe, PROMPTS), atol=1e-4)
    neg_latents = _latents(pipe, PROMPTS, negative_prompt="a large yellow circle")
    assert close_at_scale(neg_latents, _latents(pipe, PROMPTS, negative_prompt=["a large yellow circle"] * 2))
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2"):
        _np(pipe, PROMPTS, negative_prompt=["x"] * 3)


def test_prompt_list_times_images_per_prompt_with_one_generator_per_image(pipe):
    gens = [_seed(s) for s in range(6)]
    batch = _latents(pipe, PROMPTS, num_images_per_prompt=3, generator=gens)
    assert batch.shape == (6, 4, 8, 8)
    # image 4 is prompt 1's second image, drawn from generator 4 alone
    single = _latents(pipe, PROMPTS[1], generator=_seed(4))
    assert close_at_scale(batch[4], single[0])
    assert relative_error(batch[3], batch[4]) > 1e-3  # different seeds, same prompt
    assert _np(pipe, PROMPTS, num_images_per_prompt=3, generator=gens).shape == (6, 16, 16, 3)
    with pytest.raises(ValueError, match="list of 2 generators for a batch of 6"):
        _np(pipe, PROMPTS, num_images_per_prompt=3, generator=gens[:2])


def test_output_types_progress_bar_and_callback(pipe, capsys):
    assert _np(pipe, PROMPTS, output_type="pt").shape == (2, 3, 16, 16)
    assert _np(pipe, PROMPTS, output_type="latent").shape == (2, 4, 8, 8)
    pipe.set_progress_bar_config(disable=False)
    _np(pipe, PROMPTS)
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    _np(pipe, PROMPTS)
    assert capsys.readouterr().err == ""

    seen = []

    def zero_latents(p, i, t, tensors):
        seen.append((i, tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = _np(pipe, PROMPTS, output_type="latent", callback_on_step_end=zero_latents)
    assert seen == [(0, ("latents",)), (1, ("latents",)), (2, ("latents",))] and not out.abs().any()
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _np(pipe, PROMPTS, callback_on_step_end=zero_latents, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_guidance_sweep_is_one_batched_call_matching_separate_calls(pipe):
    scales = [1.0, 2.0, 5.0]
    sweep = pipe.guidance_sweep(PROMPTS, scales, num_inference_steps=3, generator=_seed(), output_type="latent")
    rows = sweep.num_forward_rows
    assert sweep.guidance_scales == scales and sweep.prompts == PROMPTS and len(sweep.images) == 3
    separate_rows = 0
    for w, images in zip(scales, sweep.images, strict=True):
        assert images.shape == (2, 4, 8, 8)
        separate = pipe(PROMPTS, num_inference_steps=3, guidance_scale=w, generator=_seed(), output_type="latent")
        assert close_at_scale(images, separate.images)
        separate_rows += separate.num_forward_rows
    # cond rows for every scale, uncond rows only for w != 1: 3 steps x (6 + 4)
    assert rows == separate_rows == 3 * 10
    pil = pipe.guidance_sweep(PROMPTS[0], [2.0, 4.0], num_inference_steps=2, num_images_per_prompt=2).images
    assert len(pil) == 2 and len(pil[0]) == 2 and pil[0][0].size == (16, 16)
    with pytest.raises(ValueError, match="guidance_scales"):
        pipe.guidance_sweep(PROMPTS, [])
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.guidance_sweep(PROMPTS, [2.0, -1.0])
