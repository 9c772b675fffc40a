"""Typed configuration: dataclass schemas + OmegaConf YAML + dotlist overrides (DESIGN.md, decision 10).

An unknown key or a value of the wrong type is an error that names the key (and the nearest valid one).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# The values of `data.text_task_phrasings` (the loader checks them too, for direct use).
TEXT_TASK_PHRASINGS = ("all", "left_first")


@dataclass
class DataConfig:
    train_shards: str = MISSING  # a directory of .tar shards, a brace pattern, or a comma list
    val_shards: str | None = None
    image_size: int = 32
    max_length: int = 24  # caption length L in tokens
    shuffle_buffer: int = 1000
    num_workers: int = 0
    caption_choice: str = "random"  # "random" phrasing from the record's json, or always the "txt" caption
    # Captions the image -> text task learns to generate: "all" phrasings (the same caption as text -> image), or
    # "left_first": only phrasings that name the left/upper object first (shapes captions: no "right of"/"below").
    # Text -> image keeps every phrasing. See README, "The shipped model" (relation binding).
    text_task_phrasings: str = "all"
    # Precomputed VAE latents of train_shards (`mmdiff data latents`). When set, the DiT trains from these shards
    # and skips the per-batch VAE encode; train_shards still feeds the tokenizer and tiny-VAE stages, val_shards stay
    # images. Their latents_meta.json must match the training VAE and image_size (checked at start).
    latent_shards: str | None = None


@dataclass
class TokenizerConfig:
    kind: str = "word"  # word (trained on the shards' captions) | clip_bpe (open_clip's vocabulary) | pretrained
    path: str | None = None  # a tokenizer folder, for kind=pretrained


@dataclass
class VAEConfig:
    pretrained_path: str | None = None  # a local diffusers AutoencoderKL folder; None trains the tiny VAE first
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    train_steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    sample_posterior: bool = True  # DiT trains on posterior samples (as LDM); false: on the posterior mean


@dataclass
class TextEncoderConfig:
    kind: str = "joint"  # joint (trained with the DiT) | clip | t5 | open_clip (frozen, loaded from `path`)
    path: str | None = None
    max_length: int = 77


@dataclass
class ModelConfig:
    patch_size: int = 2
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_encoder_depth: int = 2
    image_encoder_depth: int = 1
    null_context_length: int = 1
    adaln: str = "single"  # single (one shared adaLN linear + a per-block table, PixArt-alpha) | per_block (DiT)
    attention_backend: str = "sdpa"  # sdpa | xformers | math
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the transformer in place for training (same weights and checkpoint keys)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # v_prediction | epsilon (eps is ill-conditioned near zero terminal SNR)
    image_cond_drop: float = 0.1  # probability of training text->image with the null text context
    text_cond_drop: float = 0.1  # probability of training image->text with the null image context
    image_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    mask_eps: float = 1e-3  # smallest mask probability t in training


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 64
    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and checkpoint) after this wall-clock budget
    lr: float = 3e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.999
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    log_every: int = 10
    eval_every: int = 250
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "never"  # auto: continue from the newest complete checkpoint in output_dir | never
    on_nonfinite: str = "stop"  # a NaN/Inf loss or gradient: stop (keep the last good checkpoint) | skip the batch
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]


@dataclass
class SampleConfig:
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    caption_steps: int = 24
    caption_guidance_scale: float = 2.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        path = f"{prefix}{f.name}"
        keys.append(path)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_valid_keys(default, path + "."))
    return keys


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        near = difflib.get_close_matches(str(key), _valid_keys(Config), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"unknown config key {key!r}{hint}"
    if isinstance(err, ValidationError):
        return f"wrong type for config key {key!r}: {err.msg.splitlines()[0]}"
    return f"bad config at {key!r}: {err.msg.splitlines()[0] if getattr(err, 'msg', None) else err}"


def saved_pipeline_config(folder: str | Path) -> dict[str, Any]:
    """The training config saved with a pipeline folder (`mmdiff_config.yaml`) as a plain dict; {} without one."""
    path = Path(folder) / "mmdiff_config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema <- YAML file <- dotlist overrides ("train.max_steps=10"), validated and resolved."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    choices = {
        "tokenizer.kind": (cfg.tokenizer.kind, ("word", "clip_bpe", "pretrained")),
        "text_encoder.kind": (cfg.text_encoder.kind, ("joint", "clip", "t5", "open_clip")),
        "diffusion.prediction_type": (cfg.diffusion.prediction_type, ("epsilon", "v_prediction")),
        "train.lr_schedule": (cfg.train.lr_schedule, ("cosine", "constant")),
        "train.mixed_precision": (cfg.train.mixed_precision, ("auto", "no", "bf16", "fp16")),
        "model.attention_backend": (cfg.model.attention_backend, ("sdpa", "xformers", "math")),
        "model.adaln": (cfg.model.adaln, ("single", "per_block")),
        "data.caption_choice": (cfg.data.caption_choice, ("random", "txt")),
        "data.text_task_phrasings": (cfg.data.text_task_phrasings, TEXT_TASK_PHRASINGS),
        "train.resume": (cfg.train.resume, ("auto", "never")),
        "train.on_nonfinite": (cfg.train.on_nonfinite, ("stop", "skip")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    for key, value in (
        ("diffusion.image_cond_drop", cfg.diffusion.image_cond_drop),
        ("diffusion.text_cond_drop", cfg.diffusion.text_cond_drop),
    ):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value} must be in [0, 1)")
    if cfg.text_encoder.kind != "joint" and not cfg.text_encoder.path:
        raise ConfigError(f"text_encoder.kind={cfg.text_encoder.kind!r} needs text_encoder.path (a local folder)")
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.kind='pretrained' needs tokenizer.path (a local folder)")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size} is not divisible by model.num_heads")
    for key in ("train.batch_size", "train.max_steps", "train.grad_accum_steps", "data.max_length", "data.image_size"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1")


def check_paths(cfg: Config) -> None:
    """Fail at start, naming the key, when a configured input does not exist (not later, deep in a worker).

    Checks the train/val/latent shard specs (a missing folder, an empty folder, a glob or brace pattern matching
    nothing), the latent shards' meta file, and every configured local model folder. Kept out of :func:`load_config`
    because sampling commands load the training config of a checkpoint on machines where its data is absent.
    """
    from .data.loader import expand_urls  # torch/PIL: imported only when training actually starts

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
        from .data.latents import read_latents_meta

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


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
