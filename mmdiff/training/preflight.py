"""Checks run when training starts, before anything is written: the configured inputs exist (a pretrained model
named by a hub id is fetched here).

They are not part of :func:`mmdiff.config.load_config`: sampling commands load the training config of a checkpoint
on machines where its data is absent. (The data options' values are checked by `load_config` itself.)
"""

from __future__ import annotations

from ..config import Config, ConfigError
from ..data.captions import CaptionPolicy
from ..data.latents import read_latents_meta
from ..data.policies import caption_policy
from ..data.shards import expand_urls
from ..hub import HubResolveError, resolve_pretrained


def preflight(cfg: Config) -> CaptionPolicy:
    """The caption policy of `cfg.data` (its values are checked by `load_config`; `caption_policy` raises a
    ValueError naming the key for a Config built another way), then :func:`check_paths`; returns the policy."""
    policy = caption_policy(cfg.data)
    check_paths(cfg)
    return policy


def check_paths(cfg: Config) -> None:
    """Fail at start, naming the key, when a configured input does not exist (not later, deep in a worker).

    Checks the train/val/latent shard specs (a missing folder, an empty folder, a glob or brace pattern matching
    nothing), the latent shards' meta file, and every configured pretrained model (`check_pretrained`).
    """
    shard_specs = [(f"data.{k}", getattr(cfg.data, k)) for k in ("train_shards", "val_shards", "latent_shards")]
    for key, spec in shard_specs:
        if spec is None:
            continue
        if not str(spec).strip():
            raise ConfigError(f"{key} is empty: give a folder of .tar shards, a brace/glob pattern or a comma list")
        try:
            expand_urls(spec)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{key}={spec!r}: {err}") from None
    if cfg.data.latent_shards:
        try:
            read_latents_meta(cfg.data.latent_shards)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.latent_shards={cfg.data.latent_shards!r}: {err}") from None
    check_pretrained(cfg)


def check_pretrained(cfg: Config) -> None:
    """Every configured pretrained component (a folder, or a hub id fetched into the Hugging Face cache now, at its
    `revision`) is there: a ConfigError naming the key otherwise, on one line."""
    for key, section in (
        ("vae.pretrained_path", cfg.vae),
        ("tokenizer.path", cfg.tokenizer),
        ("text_encoder.path", cfg.text_encoder),
    ):
        name = getattr(section, key.split(".")[1])
        if not name:
            continue
        try:
            path = resolve_pretrained(name, revision=section.revision, what=key)
        except HubResolveError as err:
            raise ConfigError(str(err)) from None
        if not path.exists():
            raise ConfigError(f"{key}={name!r} does not exist (give a folder or a hub id org/name)")
    if cfg.train.init_from:  # a pipeline whose transformer starts the run: checked before any stage trains
        try:
            path = resolve_pretrained(cfg.train.init_from, subfolder="transformer", what="train.init_from")
        except HubResolveError as err:
            raise ConfigError(str(err)) from None
        if not (path / "diffusion_pytorch_model.safetensors").is_file():
            raise ConfigError(
                f"train.init_from={cfg.train.init_from!r} has no transformer/diffusion_pytorch_model.safetensors "
                "(give a saved pipeline folder or a hub id org/name)"
            )
