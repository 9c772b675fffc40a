"""Checks run when training starts, before anything is written: the configured inputs exist.

They are not part of :func:`mmdiff.config.load_config`: sampling commands load the training config of a checkpoint
on machines where its data is absent. (The data options' values are checked by `load_config` itself.)
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from ..data.captions import CaptionPolicy
from ..data.latents import read_latents_meta
from ..data.policies import caption_policy
from ..data.shards import expand_urls


def preflight(cfg: Config) -> CaptionPolicy:
    """The caption policy of `cfg.data` (its values are checked by `load_config`; `caption_policy` raises a
    ValueError naming the key for a Config built another way), then :func:`check_paths`; returns the policy."""
    policy = caption_policy(cfg.data)
    check_paths(cfg)
    return policy


def check_paths(cfg: Config) -> None:
    """Fail at start, naming the key, when a configured input does not exist (not later, deep in a worker).

    Checks the train/val/latent shard specs (a missing folder, an empty folder, a glob or brace pattern matching
    nothing), the latent shards' meta file, and every configured local model folder.
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
    for key, path in (
        ("vae.pretrained_path", cfg.vae.pretrained_path),
        ("tokenizer.path", cfg.tokenizer.path),
        ("text_encoder.path", cfg.text_encoder.path),
    ):
        if path and not Path(path).exists():
            raise ConfigError(f"{key}={path!r} does not exist")
