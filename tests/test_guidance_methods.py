"""Guidance methods beyond CFG (diffusers' guiders) and autoguidance, in both pipelines and the guided denoiser."""

from __future__ import annotations

import copy

import PIL.Image
import pytest
import torch
from conftest import close_at_scale

from mmdiff.conditioning import Condition, GuidanceSpec, GuidedModel
from mmdiff.conditioning.guided import WeakBranch
from mmdiff.diffusion.guidance import GUIDANCE_METHODS, Guidance
from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline

PROMPTS = ["a small red circle", "a large blue square above a red circle"]


def _perturbed(module, seed: int, scale: float = 0.05):
    module = copy.deepcopy(module)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return module.eval()


@pytest.fixture
def t2i(pipe):
    """The test pipeline with weights off adaLN-Zero's zero init (guidance then changes the prediction)."""
    t2i = MMDiffTextToImagePipeline(**{**pipe.components, "transformer": _perturbed(pipe.transformer, 0)})
    t2i.set_progress_bar_config(disable=True)
    return t2i


@pytest.fixture
def weak(t2i):
    """A weaker model of the same setup: the same VAE and tokenizer, other transformer weights."""
    weak = MMDiffTextToImagePipeline(**{**t2i.components, "transformer": _perturbed(t2i.transformer, 1, 0.02)})
    weak.set_progress_bar_config(disable=True)
    return weak


def _latents(t2i, **kwargs):
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return t2i(PROMPTS, num_inference_steps=3, generator=g, output_type="latent", **kwargs).images


@pytest.mark.parametrize("method", ["apg", "cfg_zero_star", "tcfg"])
def test_each_method_is_the_diffusers_guider_on_the_two_predictions(t2i, method):
    # one place computes each formula: the denoiser hands the conditional and null-context predictions to diffusers'
    # guider; w = 1 is the conditional prediction exactly, as for CFG
    model = t2i.transformer
    context, mask = t2i.text_context(*t2i.encode_prompt(PROMPTS)[:2])
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor(0.7)
    with torch.no_grad():
        cond = model(sample, t, context, mask)
        null, null_mask = model.null_context("text", 2, context.shape[1])
        uncond = model(sample, t, null, null_mask)
        reference = Guidance(method, 3.0)(cond, uncond, step=2)
        guided = GuidedModel(model, Condition(context, mask), "image", GuidanceSpec((3.0,), method))
        guided._step = 2  # the third step of a call (CFG-Zero* zeroes the first ones)
        assert close_at_scale(guided(sample, t), reference)
        assert relative(reference, cond) > 1e-3
        one = GuidedModel(model, Condition(context, mask), "image", GuidanceSpec((1.0,), method))(sample, t)
        assert close_at_scale(one, cond)
    assert torch.equal(_latents(t2i, guidance=method, guidance_scale=1.0), _latents(t2i, guidance_scale=1.0))
    assert not torch.equal(_latents(t2i, guidance=method, guidance_scale=3.0), _latents(t2i, guidance_scale=3.0))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_cfg_method_is_the_default_and_sweeps_equal_separate_calls(t2i):
    assert torch.equal(_latents(t2i, guidance="cfg", guidance_scale=3.0), _latents(t2i, guidance_scale=3.0))
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    sweep = t2i.guidance_sweep(
        PROMPTS, [1.0, 3.0], num_inference_steps=3, generator=g, output_type="latent", guidance="apg"
    )
    for w, images in zip(sweep.guidance_scales, sweep.images, strict=True):
        assert close_at_scale(images, _latents(t2i, guidance="apg", guidance_scale=w))


def test_autoguidance_guides_against_the_weak_model(t2i, weak):
    model = t2i.transformer
    context, mask = t2i.text_context(*t2i.encode_prompt(PROMPTS)[:2])
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor(0.5)
    with torch.no_grad():
        strong = model(sample, t, context, mask)
        weak_context, weak_mask = weak.text_context(*weak.encode_prompt(PROMPTS)[:2])
        weak_pred = weak.transformer(sample, t, weak_context, weak_mask)
        branch = WeakBranch(weak.transformer, weak_context, weak_mask)
        spec = GuidanceSpec((2.5,), "autoguidance", weak_model=weak)
        guided = GuidedModel(model, Condition(context, mask, weak=branch), "image", spec)
        assert close_at_scale(guided(sample, t), weak_pred + 2.5 * (strong - weak_pred))
        assert guided.num_forward_rows == 4
    # the pipelines: a weak pipeline object or a folder; w = 1 is the strong model alone
    auto = _latents(t2i, guidance="autoguidance", weak_model=weak, guidance_scale=2.0)
    assert not torch.equal(auto, _latents(t2i, guidance_scale=2.0))
    assert torch.equal(
        _latents(t2i, guidance="autoguidance", weak_model=weak, guidance_scale=1.0), _latents(t2i, guidance_scale=1.0)
    )
    i2t = MMDiffImageToTextPipeline(**t2i.components)
    i2t.set_progress_bar_config(disable=True)
    image = PIL.Image.new("RGB", (16, 16), "red")
    out = i2t(
        image, guidance="autoguidance", weak_model=MMDiffImageToTextPipeline(**weak.components), guidance_scale=2.0
    )
    assert len(out.text) == 1


def test_bad_guidance_requests_are_clear_errors(t2i, weak, tmp_path):
    with pytest.raises(ValueError, match="guidance must be one of"):
        _latents(t2i, guidance="pag")
    with pytest.raises(ValueError, match="needs weak_model"):
        _latents(t2i, guidance="autoguidance")
    with pytest.raises(ValueError, match="only it takes one"):
        _latents(t2i, weak_model=weak)
    with pytest.raises(ValueError, match="guidance='apg'"):
        _latents(t2i, guidance="apg", guidance_params={"no_such_argument": 1})
    i2t = MMDiffImageToTextPipeline(**t2i.components)
    with pytest.raises(ValueError, match="cfg_zero_star' does not apply to captions"):
        i2t(PIL.Image.new("RGB", (16, 16)), guidance="cfg_zero_star", guidance_scale=2.0)
    # a weak model of another setup: another VAE, another vocabulary
    other_vae = MMDiffTextToImagePipeline(**{**weak.components, "vae": _perturbed(weak.vae, 2)})
    with pytest.raises(ValueError, match="weak_model cannot guide this model: it has a different VAE"):
        _latents(t2i, guidance="autoguidance", weak_model=other_vae)
    other_tok = copy.deepcopy(weak.tokenizer)
    other_tok.add_tokens(["hexagon"])
    with pytest.raises(ValueError, match="a different tokenizer vocabulary"):
        _latents(
            t2i,
            guidance="autoguidance",
            weak_model=MMDiffTextToImagePipeline(**{**weak.components, "tokenizer": other_tok}),
        )
    assert set(GUIDANCE_METHODS) == {"cfg", "apg", "cfg_zero_star", "tcfg", "autoguidance"}
