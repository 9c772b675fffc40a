"""The pipeline contract a diffusers user relies on, as diffusers' own pipeline tests check it, in this project's words:
`prompt_embeds` and a standalone `encode_prompt`, the step-callback protocol (tensor inputs, `num_timesteps`, a
`guidance_scale` that a callback changes part way, interrupting), attention slicing, layerwise casting, and the offload
hooks (model, sequential, group) seeing every entry point of the transformer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import cpu_offload
from conftest import close_at_scale, make_model

from mmdiff.diffusion.process import GaussianProcess
from mmdiff.models import attention as attention_module
from mmdiff.models.blocks import CrossAttention, SelfAttention
from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline
from mmdiff.training.stages import build_pipeline

PROMPTS = ["a small red circle", "a large blue square"]
STEPS = 4


def _call(pipe, **kwargs):
    kwargs.setdefault("prompt", PROMPTS)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "latent", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def _latents(pipe, **kwargs) -> torch.Tensor:
    return _call(pipe, **kwargs).images


@pytest.fixture
def own_pipe(pipe):
    """`pipe` with components of its own: offload and casting change modules in place, and the VAE fixture is shared
    by the whole session."""
    own = MMDiffTextToImagePipeline(**copy.deepcopy(pipe.components))
    own.set_progress_bar_config(disable=True)
    return own


@pytest.fixture
def frozen_pipe(tmp_path, vae, noise_scheduler, tokenizer):
    """A model conditioned on a frozen CLIP text encoder (its hidden states are the prompt embeddings)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
        )
    ).eval()
    model = make_model(tokenizer, external_text_dim=16, text_encoder_depth=0)
    pipe = build_pipeline(model, vae, GaussianProcess(noise_scheduler).sampling_scheduler(), tokenizer, clip, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- prompt_embeds and encode_prompt


def test_prompt_embeds_give_the_same_images_as_prompts(pipe):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, negative_prompt=["a green one", ""])
    assert negative is not None and embeds.shape[0] == 2
    given = _latents(
        pipe,
        prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
    )
    assert torch.equal(given, _latents(pipe, negative_prompt=["a green one", ""]))
    # without a negative prompt the unconditional branch is the learned null context: no negative embeddings
    assert pipe.encode_prompt(PROMPTS)[2] is None
    # num_images_per_prompt repeats the given embeddings as it repeats prompts
    repeated = _latents(pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, num_images_per_prompt=2)
    assert torch.equal(repeated, _latents(pipe, num_images_per_prompt=2))


def test_an_all_false_mask_row_is_the_unconditional_prompt(pipe):
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS)
    mask[1] = False
    assert torch.equal(
        _latents(pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask),
        _latents(pipe, prompt=[PROMPTS[0], ""]),
    )


def test_frozen_encoder_prompts_encode_without_the_transformer(frozen_pipe):
    components = frozen_pipe.components
    text_only = MMDiffTextToImagePipeline(
        **{k: (v if "text" in k or "tokenizer" in k else None) for k, v in components.items()}
    )
    embeds, mask, _, _ = text_only.encode_prompt(PROMPTS)
    assert embeds.shape[-1] == frozen_pipe.text_encoder.config.hidden_size  # the encoder's hidden states
    no_text = MMDiffTextToImagePipeline(
        **{k: (None if "text" in k or "tokenizer" in k else v) for k, v in components.items()}
    )
    no_text.set_progress_bar_config(disable=True)
    images = _latents(no_text, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask)
    assert torch.equal(images, _latents(frozen_pipe))


def test_joint_encoder_needs_the_transformer_and_embeds_are_checked(pipe):
    without = MMDiffTextToImagePipeline(**{**pipe.components, "transformer": None})
    with pytest.raises(ValueError, match="jointly trained one inside its transformer"):
        without.encode_prompt(PROMPTS)
    with pytest.raises(ValueError, match="prompt or prompt_embeds"):
        pipe(PROMPTS, prompt_embeds=torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="prompt_embeds must be a float tensor"):
        pipe(prompt_embeds=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="attention mask of prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(2, 3, 32), prompt_attention_mask=torch.ones(2, 4))


# ---------------------------------------------------------------- the step-callback protocol


def test_callback_gets_the_tensors_it_asks_for_and_can_replace_them(pipe):
    assert MMDiffTextToImagePipeline._callback_tensor_inputs == ["latents"]
    seen = []

    def zero_at_the_end(p, i, t, tensors):
        seen.append((i, sorted(tensors), p.num_timesteps))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == p.num_timesteps - 1 else tensors

    out = _latents(pipe, callback_on_step_end=zero_at_the_end)
    assert seen == [(i, ["latents"], STEPS) for i in range(STEPS)]
    assert out.abs().sum() == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _latents(pipe, callback_on_step_end=zero_at_the_end, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_callback_changes_guidance_part_way(pipe):
    def raise_w(p, i, t, tensors):
        p._guidance_scale += 1.0
        return tensors

    _latents(pipe, guidance_scale=2.0, callback_on_step_end=raise_w)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps

    def stop_cfg_after_two_steps(p, i, t, tensors):
        if i == 1:
            p._guidance_scale = 1.0  # w = 1: the conditional model alone
        return tensors

    out = _call(pipe, callback_on_step_end=stop_cfg_after_two_steps)
    stopped, n = out.images, len(PROMPTS)
    assert out.num_forward_rows == 2 * (2 * n) + 2 * n  # two guided steps, two conditional-only steps
    assert not pipe.do_classifier_free_guidance
    assert not torch.equal(stopped, _latents(pipe))
    assert not torch.equal(stopped, _latents(pipe, guidance_scale=1.0))
    # an unchanged w is the plain call, also with the guidance interval and another method
    same = _latents(pipe, guidance="apg", guidance_interval=(0.2, 0.9), callback_on_step_end=lambda p, i, t, k: k)
    assert torch.equal(same, _latents(pipe, guidance="apg", guidance_interval=(0.2, 0.9)))


def test_interrupt_skips_the_remaining_steps(pipe):
    def interrupt(p, i, t, tensors):
        p._interrupt = i == 1
        return tensors

    assert _call(pipe, guidance_scale=1.0, callback_on_step_end=interrupt).num_forward_rows == 2 * len(PROMPTS)


def test_caption_callback_protocol(i2t):
    assert MMDiffImageToTextPipeline._callback_tensor_inputs == ["token_ids"]
    image = torch.rand(3, 16, 16) * 2 - 1

    def raise_w(p, i, t, tensors):
        assert list(tensors) == ["token_ids"]
        p._guidance_scale += 1.0
        return tensors

    i2t(image, num_inference_steps=3, guidance_scale=2.0, callback_on_step_end=raise_w)
    assert i2t.num_timesteps == 3 and i2t.guidance_scale == 5.0


# ---------------------------------------------------------------- attention slicing, casting and offload


def test_attention_slicing_computes_the_same_in_slices(pipe, monkeypatch):
    q, k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 7, 4), torch.randn(3, 2, 7, 4)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    whole = attention_module.attention(q, k, v, mask)
    for size in (1, 2, 5):
        assert torch.allclose(attention_module.attention(q, k, v, mask, slice_size=size), whole, atol=1e-6)

    plain = _latents(pipe)
    pipe.enable_attention_slicing("max")
    modules = [m for m in pipe.transformer.modules() if isinstance(m, SelfAttention | CrossAttention)]
    assert modules and all(m.slice_size == 1 for m in modules)
    batches = []
    real_sdpa = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        batches.append(q.shape[0])
        return real_sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    sliced = _latents(pipe)
    assert batches and set(batches) == {1}  # every kernel call saw one (row, head) pair
    assert torch.allclose(sliced, plain, atol=1e-5)
    pipe.disable_attention_slicing()
    assert all(m.slice_size is None for m in modules)
    with pytest.raises(ValueError, match="slice_size"):
        pipe.transformer.set_attention_slice(0)


def test_layerwise_casting_stores_float8_and_runs(own_pipe):
    pipe = own_pipe
    pipe.to(dtype=torch.bfloat16)
    reference = _latents(pipe).float()
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    stored = {p.dtype for p in pipe.transformer.parameters()}
    assert torch.float8_e4m3fn in stored
    assert not pipe.transformer.absorb_pays(1)  # the folded cross-attention reads weights outside forward
    cast = _latents(pipe).float()
    assert torch.isfinite(cast).all()
    assert F.cosine_similarity(cast.flatten(), reference.flatten(), dim=0) > 0.9


def test_model_cpu_offload_hooks_see_every_entry_point(own_pipe):
    pipe = own_pipe
    reference = _latents(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.transformer._hf_hook
    calls = []
    original = hook.pre_forward
    hook.pre_forward = lambda module, *a, **k: (calls.append(module), original(module, *a, **k))[1]
    pipe.transformer.encode_text(torch.ones(1, 3, dtype=torch.long))
    pipe.transformer.null_outputs("text")
    assert len(calls) == 2  # each entry point moved the transformer to the execution device first
    # the same images; under hooks the cross-attention runs on keys and values, not on the folded weights
    assert close_at_scale(_latents(pipe), reference, rel=1e-4)


def test_sequential_offload_gives_the_same_images_and_captions(own_pipe):
    pipe = own_pipe
    i2t = MMDiffImageToTextPipeline(**pipe.components)
    i2t.set_progress_bar_config(disable=True)
    reference, caption = _latents(pipe), i2t(torch.zeros(3, 16, 16), num_inference_steps=3).text
    # what `pipe.enable_sequential_cpu_offload()` installs on a GPU machine, with the CPU as execution device (diffusers
    # itself asks for an accelerator there); every parameter lives on the meta device outside its module's forward
    for name in ("transformer", "vae"):
        cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
    assert pipe.transformer.null_text_context.device.type == "meta"
    assert close_at_scale(_latents(pipe), reference, rel=1e-4)
    assert i2t(torch.zeros(3, 16, 16), num_inference_steps=3).text == caption


def test_group_offload_gives_the_same_images(own_pipe):
    pipe = own_pipe
    reference = _latents(pipe)
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)
    assert close_at_scale(_latents(pipe), reference, rel=1e-4)


# ---------------------------------------------------------------- settings are the pipeline's config


def test_settings_travel_with_the_pipeline(pipe, tmp_path):
    pipe.register_to_config(sample_defaults={**pipe.config.sample_defaults, "num_inference_steps": 3})
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["objective"] == "gaussian" and index["sample_defaults"]["num_inference_steps"] == 3
    assert index["caption_phrasing"] == "all"
    loaded = MMDiffImageToTextPipeline.from_pretrained(tmp_path / "p")
    assert loaded.sample_config.num_inference_steps == 3
    from mmdiff.pipelines.modes import as_text_to_image

    assert as_text_to_image(loaded).sample_config.num_inference_steps == 3
    with pytest.raises(ValueError, match="objective"):
        MMDiffTextToImagePipeline(**pipe.components, objective="epsilon")
    with pytest.raises(ValueError, match="unknown setting"):
        MMDiffTextToImagePipeline(**pipe.components, sample_defaults={"steps": 3})


def test_a_folder_without_settings_reads_its_training_config_once(pipe, tmp_path, monkeypatch):
    import mmdiff.pipelines.common as common

    pipe.save_pretrained(tmp_path / "old")
    index_path = tmp_path / "old" / "model_index.json"
    index = json.loads(index_path.read_text())
    for key in ("objective", "sample_defaults", "caption_phrasing"):
        index.pop(key)
    index_path.write_text(json.dumps(index))
    (tmp_path / "old" / "mmdiff_config.yaml").write_text(
        "sample:\n  guidance_scale: 4.5\ndata:\n  text_task_phrasings: left_first\n"
    )
    reads = []
    real = common.saved_pipeline_config
    monkeypatch.setattr(common, "saved_pipeline_config", lambda folder: reads.append(folder) or real(folder))
    loaded = MMDiffTextToImagePipeline.from_pretrained(tmp_path / "old")
    assert len(reads) == 1
    assert loaded.sample_config.guidance_scale == 4.5 and loaded.config.caption_phrasing == "left_first"
    assert np.isclose(loaded.sample_config.caption_guidance_scale, 2.0)  # unset keys: SampleConfig's defaults
