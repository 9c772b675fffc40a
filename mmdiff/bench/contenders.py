"""The two contenders built at matched size from one preset, and their units of work.

mmdiff: `MMDiffTransformer2DModel` with its joint text encoder, in `MMDiffTextToImagePipeline` /
`MMDiffImageToTextPipeline`.
PixArt: diffusers' `PixArtTransformer2DModel` in `PixArtAlphaPipeline`, with a random-init T5 encoder of the same
width, heads and depth as mmdiff's text encoder. Both share one tiny random `AutoencoderKL`, one word-level tokenizer
built here from a few captions (nothing is downloaded) and the same DDIM scheduler config.

What is matched: width, depth, heads, MLP ratio (4, PixArt's fixed FeedForward multiple), patch size, latent grid,
context length (prompts padded to it in both, with a key padding mask), batch, optimizer (AdamW, same settings),
scheduler, steps, guidance scale. What differs by design: mmdiff has one adaLN linear per block (PixArt: one shared
adaLN linear plus a learned table per block), a joint text encoder trained with the model (PixArt: frozen T5, whose
features are given precomputed in training) and a text head; PixArt projects its caption features with a 2-layer MLP
and has separate q/k/v projections.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from ..data.tokenizer import encode_captions, train_word_level_tokenizer
from ..diffusion.flow import FlowSettings, make_flow_scheduler
from ..diffusion.gaussian import make_noise_scheduler, noise_latents, sample_timesteps, timestep_to_t
from ..diffusion.masked import MaskedDiffusionScheduler
from ..diffusion.process import FlowProcess, GaussianProcess
from ..models.transformer import MMDiffTransformer2DModel
from ..models.vae import tiny_vae, vae_downsample_factor
from ..pipelines.image_to_text import MMDiffImageToTextPipeline
from ..pipelines.text_to_image import MMDiffTextToImagePipeline
from ..training.losses import LossWeights, image_task_loss, joint_losses
from ..training.stages import transformer_from_config
from .presets import BenchPreset

PROMPTS = [
    "a small red circle above a large blue square",
    "a large blue square below a small red circle",
    "there is a small green triangle",
    "a large yellow circle to the left of a small purple triangle",
    "a small orange square to the right of a large green circle",
    "a large purple triangle above a small yellow square",
]
NOISE_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def autocast_context(preset: BenchPreset, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when the preset asks for it; float32 everywhere else (CPU bf16 is slower on most CPUs)."""
    if preset.autocast_bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_transformer(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile` a transformer in place (`nn.Module.compile`): the module keeps its class, config and
    state-dict keys, so pipelines, `save_pretrained` and checkpoints work unchanged (what `--compile` does for
    `generate` / `caption` too, in `sampling.load_pipe`)."""
    if enabled:
        model.compile()
    return model


def build_tokenizer():
    return train_word_level_tokenizer(PROMPTS)


def build_vae(preset: BenchPreset, device: torch.device):
    torch.manual_seed(0)
    image_size = preset.latent_size * 2 ** (len(preset.vae_channels) - 1)
    vae = tiny_vae(image_size, preset.in_channels, preset.vae_channels, norm_num_groups=min(8, *preset.vae_channels))
    return vae.to(device).eval().requires_grad_(False)


def build_mmdiff(
    preset: BenchPreset,
    vocab_size: int,
    device: torch.device,
    context_length: int | None = None,
    external_text_dim: int | None = None,
):
    """mmdiff's transformer at the preset's size; `external_text_dim` gives it the projection for a frozen text
    encoder's features (the configuration that trains on precomputed caption features, as PixArt does)."""
    torch.manual_seed(0)
    return transformer_from_config(
        preset.model,
        sample_size=preset.latent_size,
        in_channels=preset.in_channels,
        vocab_size=vocab_size,
        max_text_length=context_length or preset.context_length,
        external_text_dim=external_text_dim,
    ).to(device)


def build_pixart(preset: BenchPreset, device: torch.device) -> PixArtTransformer2DModel:
    """PixArt-alpha's transformer at the preset's size; caption features are `hidden_size` wide (the T5 below)."""
    if preset.model.mlp_ratio != 4.0:
        raise ValueError("PixArt's FeedForward has a fixed 4x width: a matched comparison needs mlp_ratio=4")
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=preset.model.num_heads,
        attention_head_dim=preset.model.hidden_size // preset.model.num_heads,
        in_channels=preset.in_channels,
        out_channels=preset.in_channels,  # no learned sigma: the same output as mmdiff's image head
        num_layers=preset.model.depth,
        cross_attention_dim=preset.model.hidden_size,
        sample_size=preset.latent_size,
        patch_size=preset.model.patch_size,
        caption_channels=preset.model.hidden_size,
        interpolation_scale=1,
        use_additional_conditions=False,
    ).to(device)


def build_t5(preset: BenchPreset, vocab_size: int, device: torch.device) -> T5EncoderModel:
    """A random-init T5 v1.1-style encoder (gated GELU) the size of mmdiff's text encoder; d_ff is 2/3 of 4 D so its
    three FFN matrices cost what mmdiff's two do."""
    torch.manual_seed(0)
    d = preset.model.hidden_size
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d,
        d_kv=d // preset.model.num_heads,
        d_ff=int(round(2 / 3 * preset.model.mlp_ratio * d)),
        num_layers=preset.model.text_encoder_depth,
        num_heads=preset.model.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return T5EncoderModel(config).to(device).eval().requires_grad_(False)


def ddim(config: dict | None = None) -> DDIMScheduler:
    return DDIMScheduler.from_config(make_noise_scheduler(config or NOISE_CONFIG).config, timestep_spacing="trailing")


def caption_ids(tokenizer, batch: int, length: int) -> torch.Tensor:
    """(batch, length) pad-filled ids of the benchmark captions, cycled."""
    return encode_captions(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(batch)], length)[0]


# ---------------------------------------------------------------- training steps


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)


def _train_step(model, optimizer, loss_fn: Callable[[], torch.Tensor], autocast) -> Callable[[], float]:
    def run() -> float:
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def _image_batch(preset: BenchPreset, batch: int, device: torch.device, latent_size: int | None = None):
    """Random clean latents, their noised version, the epsilon target and the timesteps: identical for both sides."""
    g = torch.Generator().manual_seed(0)
    side = latent_size or preset.latent_size
    latents = torch.randn(batch, preset.in_channels, side, side, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = sample_timesteps(batch, NOISE_CONFIG["num_train_timesteps"], "cpu", g)
    noisy, target = noise_latents(make_noise_scheduler(NOISE_CONFIG), latents, noise, timesteps)
    return latents.to(device), noisy.to(device), target.to(device), timesteps.to(device)


def mmdiff_flow_image_step(
    model: MMDiffTransformer2DModel, tokenizer, preset: BenchPreset, batch: int, device, autocast
):
    """mmdiff's text -> image training step with the flow-matching objective (logit-normal sigmas, velocity
    target), otherwise as `mmdiff_image_step`."""
    model.train()
    optimizer = _optimizer(model)
    latents, _, _, _ = _image_batch(preset, batch, device)
    process = FlowProcess(FlowSettings())
    noisy, target, t, sigmas = process.training_inputs(latents, torch.Generator(device).manual_seed(0))
    ids = caption_ids(tokenizer, batch, model.config.max_text_length).to(device)
    drop = torch.arange(batch, device=device) % 10 == 9

    def loss() -> torch.Tensor:
        def encode(rows):
            rows_ids = ids if rows is None else ids[rows]
            return model.encode_text(rows_ids, rows_ids != tokenizer.pad_token_id)

        return image_task_loss(model, noisy, target, t, drop, encode, process, sigmas)

    return _train_step(model, optimizer, loss, autocast)


def mmdiff_image_step(model: MMDiffTransformer2DModel, tokenizer, preset: BenchPreset, batch: int, device, autocast):
    """mmdiff's text -> image training step: the joint text encoder makes the context (it is trained with the
    model), 10% condition dropout to the null context, the image forward, MSE, backward, AdamW."""
    model.train()
    optimizer = _optimizer(model)
    _, noisy, target, timesteps = _image_batch(preset, batch, device)
    ids = caption_ids(tokenizer, batch, model.config.max_text_length).to(device)
    drop = torch.arange(batch, device=device) % 10 == 9
    t = timestep_to_t(timesteps, NOISE_CONFIG["num_train_timesteps"]).to(device)

    def loss() -> torch.Tensor:
        def encode(rows):
            rows_ids = ids if rows is None else ids[rows]
            return model.encode_text(rows_ids, rows_ids != tokenizer.pad_token_id)

        return image_task_loss(model, noisy, target, t, drop, encode)

    return _train_step(model, optimizer, loss, autocast)


def caption_features(preset: BenchPreset, batch: int, channels: int, device):
    """Random precomputed caption features (batch, S, channels) and their key mask: the prompts' word counts."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(batch, preset.context_length, channels, generator=g).to(device)
    lengths = torch.tensor([len(PROMPTS[i % len(PROMPTS)].split()) for i in range(batch)])
    mask = (torch.arange(preset.context_length)[None] < lengths[:, None]).to(device)
    return features, mask


def mmdiff_frozen_image_step(model: MMDiffTransformer2DModel, preset: BenchPreset, batch: int, device, autocast):
    """mmdiff's text -> image training step on precomputed features of a frozen text encoder (the same random
    features and mask as PixArt's step): projection, 10% condition dropout, the image forward, MSE, backward, AdamW."""
    model.train()
    optimizer = _optimizer(model)
    _, noisy, target, timesteps = _image_batch(preset, batch, device)
    features, feature_mask = caption_features(preset, batch, model.config.external_text_dim, device)
    drop = torch.arange(batch, device=device) % 10 == 9
    t = timestep_to_t(timesteps, NOISE_CONFIG["num_train_timesteps"]).to(device)

    def loss() -> torch.Tensor:
        context, mask = model.encode_external_text(features, feature_mask)
        return image_task_loss(
            model, noisy, target, t, drop, lambda rows: (context, mask) if rows is None else (context[rows], mask[rows])
        )

    return _train_step(model, optimizer, loss, autocast)


def mmdiff_joint_step(
    model: MMDiffTransformer2DModel, tokenizer, batch: int, device, autocast, latent_size: int, in_channels: int
):
    """mmdiff's full training step: both directions (`joint_losses`) on one batch of image-caption pairs."""
    model.train()
    optimizer = _optimizer(model)
    process = GaussianProcess(make_noise_scheduler(NOISE_CONFIG))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, in_channels, latent_size, latent_size, generator=g).to(device)
    ids = caption_ids(tokenizer, batch, model.config.max_text_length).to(device)
    weights = LossWeights()

    def loss() -> torch.Tensor:
        losses = joint_losses(model, latents, ids, tokenizer.pad_token_id, tokenizer.mask_token_id, process, weights)
        return losses["loss"]

    return _train_step(model, optimizer, loss, autocast)


def pixart_image_step(model: PixArtTransformer2DModel, preset: BenchPreset, batch: int, device, autocast):
    """PixArt's training step on precomputed caption features (random here, as its T5 is frozen in training):
    forward, MSE, backward, AdamW."""
    model.train()
    optimizer = _optimizer(model)
    _, noisy, target, timesteps = _image_batch(preset, batch, device)
    features, mask = caption_features(preset, batch, model.config.caption_channels, device)
    mask = mask.long()
    added = {"resolution": None, "aspect_ratio": None}

    def loss() -> torch.Tensor:
        pred = model(
            noisy,
            encoder_hidden_states=features,
            timestep=timesteps,
            encoder_attention_mask=mask,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target)

    return _train_step(model, optimizer, loss, autocast)


# ---------------------------------------------------------------- pipelines


def mmdiff_pipelines(model: MMDiffTransformer2DModel, vae, tokenizer):
    """The text-to-image and captioning pipelines over the same components."""
    model.eval()
    components = {
        "transformer": model,
        "vae": vae,
        "scheduler": ddim(),
        "text_scheduler": MaskedDiffusionScheduler(),
        "tokenizer": tokenizer,
    }
    t2i, i2t = MMDiffTextToImagePipeline(**components), MMDiffImageToTextPipeline(**components)
    for pipe in (t2i, i2t):
        pipe.set_progress_bar_config(disable=True)
    return t2i, i2t


def pixart_pipeline(model: PixArtTransformer2DModel, text_encoder: T5EncoderModel, vae, tokenizer):
    model.eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=model, scheduler=ddim()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_runs(preset: BenchPreset, t2i, pixart, autocast) -> dict[str, Callable[[], object]]:
    """One text-to-image call of each contender: same prompts, seed, steps, scheduler and guidance scale."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(preset.sample_batch)]
    size = preset.latent_size * vae_downsample_factor(t2i.vae)
    common = {"num_inference_steps": preset.sample_steps, "guidance_scale": preset.guidance_scale, "output_type": "pt"}

    def run_pixart():
        with autocast:
            return pixart(
                prompts,
                negative_prompt="",
                height=size,
                width=size,
                generator=torch.Generator().manual_seed(0),
                clean_caption=False,
                use_resolution_binning=False,
                max_sequence_length=preset.context_length,
                **common,
            )

    def run_mmdiff(interval: tuple[float, float] | None = None):
        with autocast:
            return t2i(prompts, generator=torch.Generator().manual_seed(0), guidance_interval=interval, **common)

    # the same transformer sampled as a flow-matching model (flow Euler): the objective costs nothing per step
    flow = MMDiffTextToImagePipeline(**{**t2i.components, "scheduler": make_flow_scheduler()})
    flow.set_progress_bar_config(disable=True)

    def run_flow():
        with autocast:
            return flow(prompts, generator=torch.Generator().manual_seed(0), **common)

    return {
        "pixart": run_pixart,
        "mmdiff": run_mmdiff,
        "mmdiff_interval": lambda: run_mmdiff(tuple(preset.guidance_interval)),
        "mmdiff_flow": run_flow,
    }


def caption_run(preset: BenchPreset, i2t, steps: int, cached: bool, autocast) -> Callable[[], object]:
    """One captioning call of `caption_batch` random images with CFG (w = 2), with or without the context K/V cache."""
    size = preset.latent_size * vae_downsample_factor(i2t.vae)
    images = torch.rand(preset.caption_batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run():
        i2t.cache_context_kv = cached
        with autocast:
            return i2t(
                images, num_inference_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
            )

    return run
