"""Typed configuration: dataclass schemas + OmegaConf YAML + dotlist overrides (docs/architecture.md, decision 10).

An unknown key or a value of the wrong type is an error that names the key (and the nearest valid one).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .checks import in_interval, over_cap, shown_number
from .data.captions import CAPTION_CHOICES
from .data.policies import TEXT_TASK_PHRASINGS
from .data.tokenizer import TOKENIZER_KINDS
from .diffusion.flow import FLOW_LOSS_WEIGHTING, FLOW_TIMESTEP_SAMPLING
from .diffusion.process import OBJECTIVES
from .models.attention import BACKENDS as ATTENTION_BACKENDS
from .models.text_encoders import FROZEN_ENCODER_KINDS
from .models.transformer import ADALN_MODES

# The choices of the training options, defined here (the trainer imports them)
LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
RESUME_MODES = ("auto", "never")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class DataConfig:
    train_shards: str = MISSING  # a directory of .tar shards, a brace pattern, or a comma list
    val_shards: str | None = None
    image_size: int = 32
    max_length: int = 24  # caption length L in tokens
    shuffle_buffer: int = 1000
    num_workers: int = 0
    caption_choice: str = "random"  # "random" phrasing from the record's json, or always the "txt" caption
    # The caption policy (mmdiff.data.policies): which captions the image -> text task learns to generate. "all"
    # phrasings (the same caption as text -> image), or the shapes dataset's "left_first": only phrasings that name
    # the left/upper object first. Text -> image keeps every phrasing. See docs/results/shipped-model.md (relation
    # binding). Both data choices are checked when training starts (mmdiff.training.preflight).
    text_task_phrasings: str = "all"
    # Precomputed VAE latents of train_shards (`mmdiff data latents`). When set, the DiT trains from these shards
    # and skips the per-batch VAE encode; train_shards still feeds the tokenizer and tiny-VAE stages, val_shards stay
    # images. Their latents_meta.json must match the training VAE and image_size (checked at start).
    latent_shards: str | None = None


@dataclass
class TokenizerConfig:
    kind: str = "word"  # word (trained on the shards' captions) | clip_bpe (open_clip's vocabulary) | pretrained
    path: str | None = None  # a tokenizer folder or a hub id (org/name), for kind=pretrained
    revision: str | None = None  # with a hub id: a branch, tag or commit hash (default: main)


@dataclass
class VAEConfig:
    # a diffusers AutoencoderKL folder (or a pipeline folder with vae/), or a hub id (org/name); None trains the tiny
    # VAE first
    pretrained_path: str | None = None
    revision: str | None = None  # with a hub id: a branch, tag or commit hash (default: main)
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
    path: str | None = None  # a model folder (or a pipeline folder with text_encoder/), or a hub id (org/name)
    revision: str | None = None  # with a hub id: a branch, tag or commit hash (default: main)
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
    # v_prediction | epsilon (eps is ill-conditioned near zero terminal SNR) | flow (flow matching / rectified flow:
    # x = (1 - s) x0 + s eps, the model predicts eps - x0; sampled with the flow Euler scheduler, see flow_*)
    prediction_type: str = "v_prediction"
    image_cond_drop: float = 0.1  # probability of training text->image with the null text context
    text_cond_drop: float = 0.1  # probability of training image->text with the null image context
    image_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    mask_eps: float = 1e-3  # smallest mask probability t in training
    # flow matching only (prediction_type: flow): how training draws the noise level s, and how the loss is weighted
    flow_timestep_sampling: str = "logit_normal"  # uniform | logit_normal (SD3) | mode (SD3's mode sampling)
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_mode_scale: float = 1.29
    flow_shift: float = 1.0  # resolution shift s' = k s / (1 + (k - 1) s), in training and in the saved scheduler
    flow_loss_weighting: str = "none"  # none | sigma_sqrt | cosmap (diffusers' SD3 training weightings)
    # meanflow only (prediction_type: meanflow, flow matching's path; the model learns the average velocity over an
    # interval [r, t] and samples in 1, 2, 4 or many steps, see mmdiff/diffusion/meanflow.py)
    meanflow_equal_fraction: float = 0.75  # rows trained with r = t (plain flow matching)
    meanflow_logit_mean: float = -0.4  # r and t: sorted pairs of logit-normal draws
    meanflow_logit_std: float = 1.0
    meanflow_fd_step: float = 5e-3  # the finite difference along the path that stands in for the JVP
    # [w_min, w_max]: train on guided targets with w drawn from this range and given to the model as an input
    # (guidance_embeds), so one forward per step samples with guidance at any w in it; null: CFG at sampling time
    meanflow_guidance_range: list[float] | None = None
    # kappa in [0, 1): the share of the guided target taken from the model's own conditional prediction, which
    # lowers the target's noise without changing the field it learns (needs meanflow_guidance_range)
    meanflow_guidance_mix: float = 0.0


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
    # an `mmdiff eval-encoder` folder: every eval_every steps, also FD, CLIP score and R-precision of eval_images
    # images generated for validation prompts (sample.guidance_scale, eval_sampling_steps) in its feature space
    eval_encoder: str | None = None
    eval_images: int = 256
    eval_sampling_steps: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "never"  # auto: continue from the newest complete checkpoint in output_dir | never
    # a saved pipeline folder or hub id whose transformer weights start the run (fine-tuning; the EMA starts from
    # them too); inputs this config adds that it lacks (guidance or interval embedders) keep their zero init
    init_from: str | None = None
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
    # some omegaconf errors carry no `msg` (merge errors), and a message may be empty: fall back to str(err)
    detail = next(iter(str(getattr(err, "msg", None) or err).splitlines()), type(err).__name__)
    if isinstance(err, ConfigKeyError):
        near = difflib.get_close_matches(str(key), _valid_keys(Config), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"unknown config key {key!r}{hint}"
    if isinstance(err, ValidationError):
        return f"wrong type for config key {key!r}: {detail}"
    return f"bad config at {key!r}: {detail}"


def _yaml_error(source: str, err: yaml.YAMLError, position: bool = True) -> ConfigError:
    """A YAML syntax error as one line naming the source and (for a file) the 1-based line and column."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None and position else ""
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    what = problem or context or next(iter(str(err).splitlines()), type(err).__name__)
    if problem and context and problem.startswith("but "):  # "expected a single document ... but found another"
        what = f"{context} {problem}"
    return ConfigError(f"{source}: YAML syntax error{where}: {what}")


def _read_yaml(path: Path) -> DictConfig:
    """The YAML file as an omegaconf node; every way a file can fail to be a config is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): is it a YAML file?") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        # composing builds the node tree without constructing values (or expanding aliases): the top level must be a
        # mapping before omegaconf sees it, as omegaconf asserts on a scalar document such as "0"
        top = yaml.compose(text, Loader=yaml.SafeLoader)
        if top is None:
            return OmegaConf.create({})
        if not isinstance(top, yaml.MappingNode):
            kind = "a list" if isinstance(top, yaml.SequenceNode) else f"the value {top.value!r}"
            raise ConfigError(f"config file {path} must hold a mapping of sections (data:, train:, ...), got {kind}")
        node = OmegaConf.create(text)
    except yaml.YAMLError as err:
        raise _yaml_error(f"config file {path}", err) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {path}: {_explain(err)}") from None
    _check_sections(node, f"config file {path}")  # type: ignore[arg-type]
    return node  # type: ignore[return-value]


def _check_sections(node: DictConfig, source: str) -> None:
    """A top-level section given a scalar or a list: omegaconf's merge error would not name it."""
    raw: dict = OmegaConf.to_container(node, resolve=False)  # type: ignore[assignment]
    for section in (f.name for f in fields(Config)):
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(
                f"{source}: config key {section!r} is a section, not a value (got {raw[section]!r}); "
                f"set the keys inside it ({section}.<key>)"
            )


def saved_pipeline_config(folder: str | Path) -> dict[str, Any]:
    """The training config saved with a pipeline folder (`mmdiff_config.yaml`) as a plain dict; {} without one."""
    path = Path(folder) / "mmdiff_config.yaml"
    return OmegaConf.to_container(_read_yaml(path)) if path.is_file() else {}  # type: ignore[return-value]


def pipeline_settings(training_config: Any) -> dict[str, Any]:
    """The settings a pipeline registers in its own config (`model_index.json`) from a training config (a `Config`,
    or the plain dict of a saved `mmdiff_config.yaml`): the objective family ("gaussian" for epsilon / v prediction,
    "flow" for flow matching), the sampling defaults (`sample`) and the caption phrasing (`data.text_task_phrasings`)
    the captioner was taught."""
    raw = (
        OmegaConf.to_container(OmegaConf.structured(training_config))
        if is_dataclass(training_config)
        else training_config
    )
    raw = raw or {}
    prediction_type = (raw.get("diffusion") or {}).get("prediction_type") or "epsilon"
    section = raw.get("sample") or {}
    known = {f.name for f in fields(SampleConfig)}
    return {
        "objective": "flow" if prediction_type in ("flow", "flow_prediction", "meanflow") else "gaussian",
        "sample_defaults": asdict(SampleConfig(**{k: v for k, v in section.items() if k in known})),
        "caption_phrasing": str((raw.get("data") or {}).get("text_task_phrasings") or "all"),
    }


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema <- YAML file <- dotlist overrides ("train.max_steps=10"), validated and resolved."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            merged = _merge(merged, _read_yaml(Path(path)), f"config file {path}")
        for override in overrides or []:
            merged = _merge(merged, _parse_override(override), f"override {override!r}")
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg


def _merge(config: DictConfig, update: DictConfig, source: str) -> DictConfig:
    """`update` merged into `config`; its errors name `source` (the file, or the override)."""
    try:
        return OmegaConf.merge(config, update)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_explain(err)}") from None
    except TypeError:  # omegaconf's plain "Cannot merge incompatible container types"
        raise ConfigError(
            f"{source}: gives keys to a list, or a list where keys belong (see the config schema)"
        ) from None


_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")  # section.key (a list is set whole)


def _parse_override(override: str) -> DictConfig:
    """One dotlist override "key=value" as a config node; a malformed one is a ConfigError quoting it."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"overrides must look like key=value, got {override!r}")
    # omegaconf's own key parser fails with an IndexError on some malformed keys ("[", "a.[")
    if not _OVERRIDE_KEY.fullmatch(override.split("=", 1)[0]):
        raise ConfigError(
            f"override {override!r} has no valid key before '=' (e.g. train.lr=1e-3, vae.block_out_channels=[8,16])"
        )
    try:
        node = OmegaConf.from_dotlist([override])
    except yaml.YAMLError as err:
        raise _yaml_error(f"override {override!r}", err, position=False) from None
    _check_sections(node, f"override {override!r}")
    return node


# Allowed ranges of the numeric settings, in interval notation ("[" includes the bound, "(" excludes it). NaN lies
# in none of them; "inf" as an upper bound means unbounded (an infinite value is refused unless the bound is "inf]").
RANGES = {
    "data.image_size": "[1, inf)",
    "data.max_length": "[1, inf)",
    "data.shuffle_buffer": "[0, inf)",
    "data.num_workers": "[0, inf)",
    "vae.latent_channels": "[1, inf)",
    "vae.train_steps": "[1, inf)",
    "vae.batch_size": "[1, inf)",
    "vae.lr": "(0, inf)",
    "vae.kl_weight": "[0, inf)",
    "text_encoder.max_length": "[1, inf)",
    "model.patch_size": "[1, inf)",
    "model.hidden_size": "[4, inf)",
    "model.depth": "[1, inf)",
    "model.num_heads": "[1, inf)",
    "model.mlp_ratio": "(0, inf)",
    "model.text_encoder_depth": "[0, inf)",
    "model.image_encoder_depth": "[0, inf)",
    "model.null_context_length": "[1, inf)",
    "diffusion.num_train_timesteps": "[1, inf)",
    "diffusion.image_cond_drop": "[0, 1)",
    "diffusion.text_cond_drop": "[0, 1)",
    "diffusion.image_loss_weight": "[0, inf)",
    "diffusion.text_loss_weight": "[0, inf)",
    "diffusion.mask_eps": "(0, 1)",
    "diffusion.flow_logit_std": "(0, inf)",
    "diffusion.flow_mode_scale": "[0, inf)",
    "diffusion.flow_shift": "(0, inf)",  # the text loss weighs each position by 1/t, t >= mask_eps
    "diffusion.meanflow_equal_fraction": "[0, 1]",
    "diffusion.meanflow_logit_std": "(0, inf)",
    "diffusion.meanflow_fd_step": "(0, 0.5)",
    "diffusion.meanflow_guidance_mix": "[0, 1)",
    "train.seed": "[0, 4294967295]",  # numpy's seed range (accelerate's set_seed seeds numpy too)
    "train.batch_size": "[1, inf)",
    "train.max_steps": "[1, inf)",
    "train.max_minutes": "(0, inf)",
    "train.lr": "(0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.adam_beta1": "[0, 1)",
    "train.adam_beta2": "[0, 1)",
    "train.warmup_steps": "[0, inf)",
    "train.min_lr_ratio": "[0, 1]",
    "train.grad_clip": "(0, inf]",  # inf: no clipping
    "train.grad_accum_steps": "[1, inf)",
    "train.ema_decay": "[0, 1]",
    "train.log_every": "[1, inf)",
    "train.eval_every": "[1, inf)",
    "train.eval_images": "[2, inf)",
    "train.eval_sampling_steps": "[1, inf)",
    "train.checkpoint_every": "[1, inf)",
    "train.keep_checkpoints": "[1, inf)",  # resuming needs at least one
    "sample.num_inference_steps": "[1, inf)",
    "sample.guidance_scale": "[0, inf)",
    "sample.caption_steps": "[1, inf)",
    "sample.caption_guidance_scale": "[0, inf)",
}


# the training config's sizes, by the kind of cap that bounds them (lists: every element)
CAPPED_KEYS = {
    **dict.fromkeys(("data.max_length", "text_encoder.max_length", "model.null_context_length"), "text_length"),
    **dict.fromkeys(("model.depth", "model.text_encoder_depth", "model.image_encoder_depth"), "depth"),
    **dict.fromkeys(("vae.latent_channels", "vae.block_out_channels"), "channels"),
    **dict.fromkeys(("vae.batch_size", "train.batch_size"), "batch_size"),
    **{"data.image_size": "image_size", "model.patch_size": "patch_size", "model.hidden_size": "width"},
    **{"model.num_heads": "heads", "model.mlp_ratio": "mlp_ratio", "diffusion.num_train_timesteps": "timesteps"},
}


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    choices = {
        "tokenizer.kind": (cfg.tokenizer.kind, TOKENIZER_KINDS),
        "text_encoder.kind": (cfg.text_encoder.kind, ("joint", *FROZEN_ENCODER_KINDS)),
        "diffusion.prediction_type": (cfg.diffusion.prediction_type, OBJECTIVES),
        "diffusion.flow_timestep_sampling": (cfg.diffusion.flow_timestep_sampling, FLOW_TIMESTEP_SAMPLING),
        "diffusion.flow_loss_weighting": (cfg.diffusion.flow_loss_weighting, FLOW_LOSS_WEIGHTING),
        "train.lr_schedule": (cfg.train.lr_schedule, LR_SCHEDULES),
        "train.mixed_precision": (cfg.train.mixed_precision, MIXED_PRECISION),
        "model.attention_backend": (cfg.model.attention_backend, ATTENTION_BACKENDS),
        "model.adaln": (cfg.model.adaln, ADALN_MODES),
        "data.caption_choice": (cfg.data.caption_choice, CAPTION_CHOICES),
        "data.text_task_phrasings": (cfg.data.text_task_phrasings, TEXT_TASK_PHRASINGS),
        "train.resume": (cfg.train.resume, RESUME_MODES),
        "train.on_nonfinite": (cfg.train.on_nonfinite, NONFINITE_POLICIES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    for key, interval in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not in_interval(value, interval):
            raise ConfigError(f"{key}={shown_number(value)} is out of range: it must lie in {interval}")
    for key, kind in CAPPED_KEYS.items():
        section, name = key.split(".")
        problem = over_cap(key, getattr(getattr(cfg, section), name), kind)
        if problem:
            raise ConfigError(problem)
    channels = cfg.vae.block_out_channels
    if not channels or any(c < 1 for c in channels):
        raise ConfigError(f"vae.block_out_channels={channels} must be a non-empty list of positive integers")
    if cfg.diffusion.image_loss_weight == 0 and cfg.diffusion.text_loss_weight == 0:
        raise ConfigError("diffusion.image_loss_weight and diffusion.text_loss_weight are both 0: nothing to train")
    if cfg.text_encoder.kind != "joint" and not cfg.text_encoder.path:
        raise ConfigError(f"text_encoder.kind={cfg.text_encoder.kind!r} needs text_encoder.path (a folder or a hub id)")
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.kind='pretrained' needs tokenizer.path (a folder or a hub id)")
    guidance_range = cfg.diffusion.meanflow_guidance_range
    if cfg.diffusion.meanflow_guidance_mix and guidance_range is None:
        raise ConfigError(
            "diffusion.meanflow_guidance_mix mixes guided targets: it needs diffusion.meanflow_guidance_range"
        )
    if guidance_range is not None:
        if cfg.diffusion.prediction_type != "meanflow":
            raise ConfigError("diffusion.meanflow_guidance_range needs diffusion.prediction_type=meanflow")
        if len(guidance_range) != 2 or not 1.0 <= guidance_range[0] <= guidance_range[1] <= 100.0:
            raise ConfigError(
                f"diffusion.meanflow_guidance_range={list(guidance_range)} must be [w_min, w_max] with "
                "1 <= w_min <= w_max <= 100"
            )
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size} is not divisible by model.num_heads")
    if cfg.model.hidden_size % 4:  # the 2D sin-cos position embedding splits the width in four
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size} must be a multiple of 4")
    if cfg.vae.pretrained_path is None:
        # the tiny VAE halves the resolution once per block after the first; caught here, not after its training
        downsampling = 2 ** (len(channels) - 1)
        if cfg.data.image_size % (downsampling * cfg.model.patch_size):
            raise ConfigError(
                f"data.image_size={cfg.data.image_size} must be a multiple of {downsampling * cfg.model.patch_size}: "
                f"the tiny VAE's downsampling {downsampling} (from vae.block_out_channels) x model.patch_size"
            )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
