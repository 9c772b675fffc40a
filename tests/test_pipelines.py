"""Both pipelines on a tiny model: determinism, guidance identities, save/load, loading paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import close_at_scale

from mmdiff.diffusion.process import GaussianProcess
from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle above a large blue square", "there is a small green triangle"]
ENTRY_POINTS = [
    ("mmdiff_text_to_image", MMDiffTextToImagePipeline),
    ("mmdiff_image_to_text", MMDiffImageToTextPipeline),
]


def _images(pipe, **kw):
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "np", **kw}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images


def test_text_to_image_shapes_and_determinism(pipe):
    a, b = _images(pipe), _images(pipe)
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)
    pil = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    assert not np.array_equal(a, _images(pipe, guidance_scale=6.0))


def test_w1_equals_conditional_only_at_every_step(pipe):
    # reference: the conditional prediction only, via a callback-free manual loop
    out = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    guided = out.images
    assert out.num_forward_rows == 2 * 4  # no unconditional rows ran
    context, mask = pipe.text_context(*pipe.encode_prompt(PROMPTS)[:2])
    latents = torch.randn(guided.shape, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(4)
    for timestep in pipe.scheduler.timesteps:
        t = timestep / pipe.scheduler.config.num_train_timesteps
        pred = pipe.transformer(pipe.scheduler.scale_model_input(latents, timestep), t, context, mask)
        latents = pipe.scheduler.step(pred, timestep, latents).prev_sample
    assert close_at_scale(guided, latents)


def test_guidance_interval_runs_fewer_rows(pipe):
    full = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="latent").num_forward_rows
    interval = (0.0, 0.5)
    fewer = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, guidance_interval=interval, output_type="latent")
    assert full == 4 * 4 and fewer.num_forward_rows < full


def test_captioning_is_deterministic_and_clean(pipe, tokenizer):
    i2t = MMDiffImageToTextPipeline(**pipe.components)
    i2t.set_progress_bar_config(disable=True)
    images = [PIL.Image.new("RGB", (20, 20), c) for c in ("red", "blue", "white")]
    out = i2t(
        images,
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        return_tokens=True,
    )
    again = i2t(images, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert out.text == again.text and len(out.text) == 3
    assert not (out.token_ids == tokenizer.mask_token_id).any()
    for text in out.text:
        assert "[MASK]" not in text and "[PAD]" not in text
    prefix = i2t(images[:1], prompt="a small red", num_inference_steps=3, return_tokens=True)
    assert prefix.token_ids[0, :3].tolist() == tokenizer.convert_tokens_to_ids(["a", "small", "red"])
    assert i2t(None, num_captions=2, num_inference_steps=3).text.__len__() == 2


def test_save_load_identical_outputs_for_both_pipelines(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    files = {p.name for p in (tmp_path / "pipe").rglob("*")}
    assert "model_index.json" in files and "diffusion_pytorch_model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = MMDiffTextToImagePipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_images(pipe), _images(loaded))
    i2t = MMDiffImageToTextPipeline.from_pretrained(tmp_path / "pipe")
    i2t.set_progress_bar_config(disable=True)
    image = PIL.Image.new("RGB", (16, 16), "red")
    ref = MMDiffImageToTextPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    assert i2t(image, num_inference_steps=4).text == ref(image, num_inference_steps=4).text


def test_both_community_entry_points_load_in_one_process(pipe, tmp_path):
    """What a notebook does: both entry points one after the other, in either order, with a dtype, and after a
    save_pretrained round trip of a pipeline loaded that way; nothing cleared between the loads."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "pipe")
    entry = {cls: str(REPO / "pipelines" / name) for name, cls in ENTRY_POINTS}
    order = [MMDiffTextToImagePipeline, MMDiffImageToTextPipeline, MMDiffTextToImagePipeline, MMDiffImageToTextPipeline]
    for i, cls in enumerate(order):
        folder = tmp_path / "pipe" if i < 2 else tmp_path / f"resaved-{i - 2}"
        loaded = DiffusionPipeline.from_pretrained(
            folder, custom_pipeline=entry[cls], trust_remote_code=True, torch_dtype=torch.bfloat16
        )
        assert type(loaded).__name__ == cls.__name__
        assert loaded.transformer.dtype == torch.bfloat16
        loaded.set_progress_bar_config(disable=True)
        if cls is MMDiffTextToImagePipeline:
            out = loaded(PROMPTS[0], num_inference_steps=2, output_type="latent").images
            assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        else:
            assert len(loaded(PIL.Image.new("RGB", (16, 16), "red"), num_inference_steps=2).text) == 1
        if i < 2:
            loaded.save_pretrained(tmp_path / f"resaved-{i}")


def test_frozen_clip_encoder_pipeline_round_trip(tmp_path, vae, noise_scheduler, tokenizer):
    from conftest import make_model
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmdiff.models.text_encoders import load_frozen_text_encoder
    from mmdiff.training.trainer import build_pipeline

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
    )
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    encoder, enc_tokenizer = load_frozen_text_encoder("clip", str(tmp_path / "clip"))
    model = make_model(tokenizer, external_text_dim=16, text_encoder_depth=0)
    pipe = build_pipeline(
        model, vae, GaussianProcess(noise_scheduler).sampling_scheduler(), tokenizer, encoder, enc_tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = MMDiffTextToImagePipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.text_encoder).__name__ == "CLIPTextModel"
    assert np.array_equal(_images(pipe), _images(loaded))


def test_bad_inputs_name_the_problem(pipe):
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(PROMPTS, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(PROMPTS, num_inference_steps=0)
    with pytest.raises(ValueError, match="height"):
        pipe(PROMPTS, height=15)
    with pytest.raises(ValueError, match="empty list"):
        pipe([])
