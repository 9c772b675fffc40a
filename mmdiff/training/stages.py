"""The stages before the DiT (tokenizer, tiny VAE) and the builders of the model and its sampling pipeline.

Each stage writes its folder in `train.output_dir` atomically on the main process and is skipped when that folder
exists, so a restarted run reuses them; the other processes wait for it and then load the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from ..config import Config, ModelConfig
from ..data.dataset import make_dataloader
from ..data.shards import SkipStats, expand_urls, read_captions
from ..data.tokenizer import build_tokenizer, load_tokenizer
from ..hub import resolve_pretrained
from ..models.text_encoders import load_frozen_text_encoder
from ..models.transformer import MMDiffTransformer2DModel
from ..models.vae import load_vae, tiny_vae, vae_downsample_factor
from .checkpoint import atomic_dir
from .vae_trainer import train_vae


def prepare_tokenizer(cfg: Config, out: Path, accelerator: Accelerator):
    """The caption tokenizer in `out/tokenizer`, built on the main process on first use. A word tokenizer is trained
    on the captions of `data.train_shards`; shards that give none (empty tars, no usable caption) are refused with
    one line naming them and what was skipped, rather than a tokenizer of special tokens only."""
    folder = out / "tokenizer"
    if not folder.is_dir():
        if accelerator.is_main_process:
            captions = None
            if cfg.tokenizer.kind == "word":
                urls, stats = expand_urls(cfg.data.train_shards), SkipStats()
                captions = read_captions(urls, stats)
                if not captions:
                    raise ValueError(
                        f"data.train_shards={cfg.data.train_shards!r}: no usable caption in {len(urls)} shard(s) "
                        f"(skipped: {stats.summary()}), so tokenizer.kind=word has no vocabulary to build"
                    )
            tokenizer = build_tokenizer(
                cfg.tokenizer.kind, captions=captions, path=cfg.tokenizer.path, revision=cfg.tokenizer.revision
            )
            with atomic_dir(folder) as tmp:
                tokenizer.save_pretrained(tmp)
        accelerator.wait_for_everyone()
    return load_tokenizer(folder)


def prepare_vae(cfg: Config, out: Path, tokenizer, accelerator: Accelerator):
    """The configured pretrained VAE (a folder or a hub id), or the tiny VAE in `out/vae`, trained on the main
    process on first use."""
    if cfg.vae.pretrained_path:
        return load_vae(
            resolve_pretrained(cfg.vae.pretrained_path, revision=cfg.vae.revision, what="vae.pretrained_path")
        )
    folder = out / "vae"
    if not folder.is_dir():
        if accelerator.is_main_process:
            loader = make_dataloader(
                cfg.data.train_shards,
                tokenizer,
                cfg.data.image_size,
                cfg.data.max_length,
                cfg.vae.batch_size,
                num_workers=cfg.data.num_workers,
                seed=cfg.train.seed + 1,
                shuffle_buffer=cfg.data.shuffle_buffer,
            )
            vae = tiny_vae(cfg.data.image_size, cfg.vae.latent_channels, tuple(cfg.vae.block_out_channels))
            stats = train_vae(
                vae,
                (b["pixel_values"] for b in loader),
                cfg.vae.train_steps,
                lr=cfg.vae.lr,
                kl_weight=cfg.vae.kl_weight,
                out_dir=folder,
                device=accelerator.device,
                seed=cfg.train.seed,
            )
            print(f"VAE trained: {json.dumps(stats)}")
        accelerator.wait_for_everyone()
    return load_vae(folder)


def load_text_encoder(cfg: Config, device) -> tuple:
    """The configured frozen text encoder and its tokenizer on `device` (`text_encoder.path`: a folder or a hub id at
    `text_encoder.revision`), or (None, None) for the joint encoder."""
    if cfg.text_encoder.kind == "joint":
        return None, None
    folder = resolve_pretrained(cfg.text_encoder.path, revision=cfg.text_encoder.revision, what="text_encoder.path")
    encoder, tokenizer = load_frozen_text_encoder(cfg.text_encoder.kind, folder)
    return encoder.to(device), tokenizer


def build_model(cfg: Config, tokenizer, vae, external_text_dim: int | None) -> MMDiffTransformer2DModel:
    """The MMDiT sized for the configured data, tokenizer and VAE latents."""
    m = cfg.model
    factor = vae_downsample_factor(vae)
    if cfg.data.image_size % (factor * m.patch_size):
        raise ValueError(
            f"data.image_size={cfg.data.image_size} is not divisible by VAE factor {factor} x patch {m.patch_size}"
        )
    return transformer_from_config(
        m,
        sample_size=cfg.data.image_size // factor,
        in_channels=vae.config.latent_channels,
        vocab_size=len(tokenizer),
        max_text_length=cfg.data.max_length,
        external_text_dim=external_text_dim,
        interval_conditioning=cfg.diffusion.prediction_type == "meanflow",
        timestep_scale=1.0 if cfg.diffusion.prediction_type == "meanflow" else 1000.0,
        guidance_embeds=cfg.diffusion.meanflow_guidance_range is not None,
    )


# modules that start as "adds nothing" (zero-initialised output layers), so a model fine-tuned from weights
# without them starts as that model: a MeanFlow interval or a guidance input added to a trained model
ZERO_INIT_MODULES = ("interval_embedder.", "guidance_embedder.")


def init_transformer_from(model: MMDiffTransformer2DModel, source: str) -> str:
    """Load `train.init_from`'s transformer weights (a pipeline folder or hub id, safetensors) into `model`.

    Every weight of the source must fit the model in name and shape; the model may have more, only among
    `ZERO_INIT_MODULES`. Returns a line saying what was loaded and what kept its init. A mismatch is one ValueError
    naming the first key."""
    from safetensors.torch import load_file

    folder = resolve_pretrained(source, subfolder="transformer", what="train.init_from")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"train.init_from={source}: no transformer weights at {weights} (a saved pipeline folder)")
    loaded = load_file(str(weights))
    own = model.state_dict()
    unexpected = sorted(set(loaded) - set(own))
    if unexpected:
        raise ValueError(f"train.init_from={source} has weights this model has no place for, e.g. {unexpected[0]}")
    for key, value in loaded.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"train.init_from={source}: {key} is {tuple(value.shape)} there and {tuple(own[key].shape)} in this "
                "config's model (model.* and the data's shapes must match)"
            )
    missing = sorted(set(own) - set(loaded))
    foreign = [key for key in missing if not key.startswith(ZERO_INIT_MODULES)]
    if foreign:
        raise ValueError(f"train.init_from={source} lacks weights this model needs, e.g. {foreign[0]}")
    model.load_state_dict(loaded, strict=False)
    fresh = sorted({key.split(".")[0] for key in missing})
    return f"transformer weights from {source}" + (f"; {', '.join(fresh)} start at their zero init" if fresh else "")


def transformer_from_config(
    m: ModelConfig,
    sample_size: int,
    in_channels: int,
    vocab_size: int,
    max_text_length: int,
    external_text_dim: int | None = None,
    interval_conditioning: bool = False,
    timestep_scale: float = 1000.0,
    guidance_embeds: bool = False,
) -> MMDiffTransformer2DModel:
    """The MMDiT a `model:` config section describes, for the given data shapes (training and `mmdiff bench`)."""
    return MMDiffTransformer2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        patch_size=m.patch_size,
        vocab_size=vocab_size,
        max_text_length=max_text_length,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        # a frozen encoder replaces the joint one: no unused encoder layers (DDP would refuse them)
        text_encoder_depth=0 if external_text_dim else m.text_encoder_depth,
        image_encoder_depth=m.image_encoder_depth,
        adaln=m.adaln,
        null_context_length=m.null_context_length,
        external_text_dim=external_text_dim,
        interval_conditioning=interval_conditioning,
        timestep_scale=timestep_scale,
        guidance_embeds=guidance_embeds,
    )


def build_pipeline(
    transformer, vae, scheduler, tokenizer, text_encoder=None, text_encoder_tokenizer=None, training_config=None
):
    """The sampling pipeline for a trained model. `scheduler`: the sampling scheduler (the image process's
    `sampling_scheduler()`: DDIM with trailing timesteps for Gaussian models, flow Euler for flow models); swap it
    the diffusers way. `training_config` (a `Config`) gives the
    pipeline its settings (objective, sampling defaults, caption phrasing: `mmdiff.config.pipeline_settings`)."""
    from ..config import pipeline_settings
    from ..diffusion.masked import MaskedDiffusionScheduler
    from ..pipelines.text_to_image import MMDiffTextToImagePipeline

    return MMDiffTextToImagePipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_scheduler=MaskedDiffusionScheduler(),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        text_encoder_tokenizer=text_encoder_tokenizer,
        **(pipeline_settings(training_config) if training_config is not None else {}),
    )
