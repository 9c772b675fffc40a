"""What both mmdiff pipelines share: the components, prompt and image encoding, and input checks.

Both pipeline classes take the same components, so either one loads any saved mmdiff folder.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checks import check_interval, check_number, check_steps
from ..conditioning.guided import GuidanceSpec
from ..conditioning.text import TextConditioner, frozen_token_budget
from ..config import SampleConfig, pipeline_settings, saved_pipeline_config
from ..data.images import prepare_image
from ..diffusion.masked import MaskedDiffusionScheduler
from ..hub import resolve_pretrained
from ..models.text_encoders import OpenCLIPTextEncoder
from ..models.transformer import MMDiffTransformer2DModel
from ..models.vae import encode_latents, vae_downsample_factor
from .loading import PipelineLoadError, check_model_index, check_pipeline_folder, load_error
from .schedulers import scheduler_family

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
# the pipeline's own settings, registered in its config (`model_index.json`)
PIPELINE_SETTINGS = ("objective", "sample_defaults", "caption_phrasing")
# diffusers' `from_pretrained` arguments that say where a hub id is found
HUB_ARGUMENTS = ("revision", "cache_dir", "local_files_only", "token")


OBJECTIVES = ("gaussian", "flow")


class MMDiffPipelineBase(DiffusionPipeline):
    """Components: `transformer` (MMDiffTransformer2DModel), `vae` (AutoencoderKL), `scheduler` (any diffusers image
    scheduler), `text_scheduler` (MaskedDiffusionScheduler), `tokenizer` (caption tokenizer with mask and pad tokens),
    and optionally a frozen `text_encoder` with its own `text_encoder_tokenizer`.

    Settings, registered in the pipeline's own config (`model_index.json`, like diffusers' `requires_safety_checker`),
    so `from_pretrained`, `save_pretrained` and `Cls.from_pipe(pipe)` carry them:
        objective: "gaussian" (epsilon / v prediction) or "flow" (flow matching): which schedulers fit the model.
            Unset, it is read off the scheduler.
        sample_defaults: the `SampleConfig` fields (num_inference_steps, guidance_scale, caption_steps,
            caption_guidance_scale) a call takes when it leaves them unset; unset, `SampleConfig`'s defaults.
        caption_phrasing: the caption policy the captioner was trained with (`data.text_task_phrasings`), so
            evaluation scores it on references phrased as it was taught.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "text_encoder_tokenizer"]

    def __init__(
        self,
        transformer: MMDiffTransformer2DModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        text_scheduler: MaskedDiffusionScheduler,
        tokenizer: PreTrainedTokenizerBase,
        # typing's Optional/Union, evaluated: diffusers (0.36 on) reads these types to check components in
        # `from_pretrained` and `from_pipe`, and older releases neither resolve string annotations nor `X | Y`
        text_encoder: Optional[Union[OpenCLIPTextEncoder, PreTrainedModel]] = None,  # noqa: UP007, UP045
        text_encoder_tokenizer: Optional[PreTrainedTokenizerBase] = None,  # noqa: UP045
        objective: Optional[str] = None,  # noqa: UP045
        sample_defaults: Optional[dict] = None,  # noqa: UP045
        caption_phrasing: str = "all",
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_scheduler=text_scheduler,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            text_encoder_tokenizer=text_encoder_tokenizer,
        )
        if objective is None:
            objective = scheduler_family(scheduler) if scheduler is not None else "gaussian"
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        known = {f.name for f in dataclasses.fields(SampleConfig)}
        unknown = sorted(set(sample_defaults or {}) - known)
        if unknown:
            raise ValueError(f"sample_defaults: unknown setting(s) {unknown}; known: {sorted(known)}")
        defaults = dataclasses.asdict(SampleConfig(**(sample_defaults or {})))
        self.register_to_config(objective=objective, sample_defaults=defaults, caption_phrasing=str(caption_phrasing))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved mmdiff folder or a hub id (either pipeline class loads any of them), safetensors only.

        Same arguments as diffusers' `DiffusionPipeline.from_pretrained` (`torch_dtype`, `revision`, `cache_dir`,
        `local_files_only`, `token`, components to replace, ...). A hub id is resolved with huggingface_hub (its
        cache, `HF_HUB_OFFLINE`), pickle weights never downloaded. The folder is checked first
        (`check_pipeline_folder`); any failure raises `PipelineLoadError` naming the component. Pickled weights are
        never loaded: `use_safetensors=True` is forced. A folder saved before the pipeline settings were part of
        `model_index.json` gets them from the training config saved beside it (`mmdiff_config.yaml`).
        """
        if kwargs.get("use_safetensors") is False:
            raise PipelineLoadError("mmdiff pipelines load safetensors only; use_safetensors=False is refused")
        kwargs["use_safetensors"] = True
        hub = {k: kwargs.pop(k) for k in HUB_ARGUMENTS if k in kwargs}
        folder = resolve_pretrained(pretrained_model_name_or_path, what="pipeline", **hub)
        components = {k: v for k, v in kwargs.items() if k in cls._get_signature_keys(cls)[0]}
        check_pipeline_folder(folder, components)
        index = json.loads((Path(folder) / "model_index.json").read_text())
        if not all(key in index for key in PIPELINE_SETTINGS):
            saved = pipeline_settings(saved_pipeline_config(folder))
            kwargs = {**{k: v for k, v in saved.items() if k not in index}, **kwargs}
        try:
            pipe = super().from_pretrained(folder, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise load_error(folder, err) from err
        return pipe

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' loaders (ours, and `DiffusionPipeline.from_pretrained(..., custom_pipeline=...)`) hand the whole
        `model_index.json` here before they load a component: resolve every entry by name first, so that no loader
        imports a module the folder chose (older diffusers releases import whatever library an entry names)."""
        check_model_index(config_dict)
        return super().extract_init_dict(config_dict, **kwargs)

    @property
    def objective_family(self) -> str:
        """ "flow" (flow matching) or "gaussian" (epsilon / v): which schedulers fit this model."""
        return self.config.objective

    @property
    def sample_config(self) -> SampleConfig:
        """The defaults for arguments a call leaves unset (steps, guidance scales): the pipeline's `sample_defaults`
        setting (a folder's saved `sample` settings), over `mmdiff.config.SampleConfig`'s defaults."""
        return SampleConfig(**self.config.sample_defaults)

    def default_caption_steps(self, max_length: int | None = None) -> int:
        """Unmasking steps when a call leaves them unset: `sample_config.caption_steps`, at most one per token."""
        return min(self.sample_config.caption_steps, max_length or self.transformer.config.max_text_length)

    def fill_sample_settings(self, **settings: float | int | None) -> dict[str, float | int]:
        """The given `SampleConfig` fields (num_inference_steps, guidance_scale, caption_steps,
        caption_guidance_scale) with None replaced by this pipeline's defaults, e.g. for a report that records them."""
        return {k: getattr(self.sample_config, k) if v is None else v for k, v in settings.items()}

    # ------------------------------------------------------------------ the callback protocol (diffusers')

    @property
    def guidance_scale(self) -> float:
        """w of the running (or last) call; a `callback_on_step_end` may change `pipe._guidance_scale` and the next
        step uses it (set 1.0 to stop guiding: w = 1 is unguided here, 0 is unconditional)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the unconditional branch runs at the current w (w != 1)."""
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the running (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to skip the remaining steps (diffusers' protocol)."""
        return self._interrupt

    def run_callback(self, callback, step: int, timestep, tensors: dict[str, torch.Tensor], names) -> dict:
        """Call `callback_on_step_end(pipe, step, timestep, {name: tensor})` with the tensors it asked for; returns
        the tensors it hands back (each replaces the pipeline's)."""
        if callback is None:
            return {}
        return callback(self, step, timestep, {k: tensors[k] for k in names}) or {}

    def check_callback_inputs(self, names) -> None:
        unknown = [name for name in names if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {unknown}"
            )

    # ------------------------------------------------------------------ helpers

    @property
    def latent_size(self) -> int:
        return self.transformer.config.sample_size

    @property
    def image_size(self) -> int:
        return self.latent_size * vae_downsample_factor(self.vae)

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def frozen_max_length(self) -> int:
        """Token budget of the frozen text encoder: its position limit, capped by its tokenizer's."""
        return frozen_token_budget(self.text_encoder, self.text_encoder_tokenizer)

    @property
    def text_conditioner(self) -> TextConditioner:
        """Captions -> text context, with this pipeline's caption tokenizer and (optional) frozen encoder."""
        return TextConditioner(self.tokenizer, self.text_encoder, self.text_encoder_tokenizer)

    def weak_pipeline(self, weak_model) -> "MMDiffPipelineBase":
        """Autoguidance's weak model as a pipeline on this one's device and dtype: a pipeline, or a folder (an
        earlier or smaller checkpoint; loaded once per pipeline, not at every call). It must share this model's VAE,
        tokenizer and objective: a ValueError names what differs."""
        if isinstance(weak_model, str | os.PathLike):
            loaded = self.__dict__.setdefault("_weak_folders", {})
            key = str(Path(weak_model).resolve()) if Path(weak_model).exists() else str(weak_model)  # or a hub id
            if key not in loaded:
                pipe = type(self).from_pretrained(weak_model, dtype=self.transformer.dtype)
                pipe.to(self._execution_device)
                pipe.set_progress_bar_config(disable=True)
                check_weak_model(self, pipe)
                loaded[key] = pipe
            return loaded[key]
        if not isinstance(weak_model, MMDiffPipelineBase):
            raise TypeError(
                f"weak_model must be an mmdiff pipeline, a pipeline folder or a hub id, got {type(weak_model).__name__}"
            )
        check_weak_model(self, weak_model)
        return weak_model

    def preprocess_images(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """Images -> (N, 3, S, S) in [-1, 1] at the model's resolution S (shorter side resized, centre crop).

        Accepted, each converted as documented:
            PIL images of any mode (L, LA, RGBA, P, I;16, ...): alpha composited on white, 16 bit scaled to 8 bit.
            numpy (H, W), (H, W, C) or a batch (N, H, W, C), C in 1, 3, 4: uint8 / uint16 as stored, floats in [0, 1].
            torch (C, H, W) or (N, C, H, W), C in 1, 3: floats in [-1, 1] (diffusers' convention), uint8 in [0, 255].
        Anything else (wrong range, wrong shape, empty) is a ValueError/TypeError naming the image.
        """
        if isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise ValueError("image is an empty list")
        return torch.stack([prepare_image(_to_pil(image, i), self.image_size) for i, image in enumerate(images)])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents, the posterior mean (captioning is deterministic in the image)."""
        pixels = images.to(device=self._execution_device, dtype=self.vae.dtype)
        return encode_latents(self.vae, pixels, sample=False).to(self.transformer.dtype)


def _to_pil(image: ImageInput, index: int) -> PIL.Image.Image:
    """One image of any accepted kind -> PIL (see `MMDiffPipelineBase.preprocess_images` for the conversions)."""
    if isinstance(image, PIL.Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image {index}: empty image of size {image.size}")
        # a float image holding NaN or inf would be cast to arbitrary pixels without a word
        if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
            raise ValueError(f"image {index}: a float (mode F) PIL image must be finite; it holds NaN or inf")
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or min(image.shape[1:]) < 1:
            raise ValueError(
                f"image {index}: expected a (C, H, W) tensor with C in (1, 3), got shape {tuple(image.shape)}"
            )
        if image.dtype == torch.uint8:
            array = image.permute(1, 2, 0).cpu().numpy()
        elif image.is_floating_point():
            low, high = float(image.min()), float(image.max())
            if not (np.isfinite(low) and np.isfinite(high)) or low < -1.001 or high > 1.001:
                raise ValueError(
                    f"image {index}: float tensors must lie in [-1, 1] (diffusers' convention), "
                    f"got values in [{low:.3g}, {high:.3g}]"
                )
            array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        else:
            raise ValueError(f"image {index}: tensor dtype {image.dtype} is not supported; give float or uint8")
        return PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
            raise ValueError(
                f"image {index}: expected a numpy (H, W) or (H, W, C) array with C in (1, 3, 4), "
                f"got shape {image.shape}"
            )
        if array.dtype == np.uint16:
            array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1.0:
                raise ValueError(f"image {index}: float arrays must be finite and lie in [0, 1]")
            array = (array * 255).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            raise ValueError(f"image {index}: numpy dtype {array.dtype} is not supported; give uint8, uint16 or float")
        return PIL.Image.fromarray(np.ascontiguousarray(array))
    raise TypeError(f"image {index}: unsupported type {type(image).__name__}; give PIL, numpy or torch")


def check_guidance(guidance_scale: float, num_inference_steps: int, max_steps: int | None = None) -> int:
    """w must be finite and >= 0 (w = 1 is unguided, 0 is unconditional); steps a positive integer, returned as int."""
    check_number("guidance_scale", guidance_scale, 0.0, meaning=" (1 = no guidance)")
    return check_steps(num_inference_steps, max_steps)


def guidance_spec(
    guidance_scales: list[float],
    guidance: str = "cfg",
    guidance_params: dict | None = None,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    weak_model=None,
    modality: str = "image",
) -> GuidanceSpec:
    """A call's guidance arguments, checked once, as the one value the guided model takes (see `GuidanceSpec`).
    Each problem is a ValueError/TypeError naming the argument."""
    scales = tuple(check_number("guidance_scale", w, 0.0, meaning=" (1 = no guidance)") for w in guidance_scales)
    if guidance_params is not None and not isinstance(guidance_params, dict):
        raise TypeError(
            f"guidance_params must be a dict of the method's arguments, got {type(guidance_params).__name__}"
        )
    spec = GuidanceSpec(
        scales=scales,
        method=guidance,
        params=dict(guidance_params or {}),
        interval=check_interval("guidance_interval", guidance_interval),
        rescale=check_number("guidance_rescale", guidance_rescale, 0.0, 1.0),
        weak_model=weak_model,
    )
    spec.check_modality(modality)
    return spec


def per_sample_generators(
    generator: torch.Generator | list[torch.Generator] | None, batch: int, name: str = "generator"
) -> torch.Generator | list[torch.Generator] | None:
    """A list of generators must hold one per sample (diffusers' convention); a single one or None passes through."""
    if isinstance(generator, list | tuple):
        if len(generator) != batch:
            raise ValueError(f"{name} is a list of {len(generator)} generators for a batch of {batch}; give one each")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError(f"{name} must be a list of torch.Generator, got {[type(g).__name__ for g in generator]}")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of them, "
            f"got {type(generator).__name__}"
        )
    return generator


def check_weak_model(strong: MMDiffPipelineBase, weak: MMDiffPipelineBase) -> None:
    """Autoguidance compares two predictions of the same quantity in the same latent and token spaces: the weak model
    must share the VAE (config and weights), the tokenizer (vocabulary), the objective and the stream shapes."""
    problems = []
    if weak.objective_family != strong.objective_family:
        problems.append(f"objective {weak.objective_family} vs {strong.objective_family}")
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    if public(weak.vae.config) != public(strong.vae.config) or any(
        not torch.equal(a.detach().cpu(), b.detach().cpu().to(a.dtype))
        for a, b in zip(weak.vae.state_dict().values(), strong.vae.state_dict().values(), strict=True)
    ):
        problems.append("a different VAE")
    if weak.tokenizer.get_vocab() != strong.tokenizer.get_vocab():
        problems.append("a different tokenizer vocabulary")
    for key in ("in_channels", "sample_size", "vocab_size", "max_text_length"):
        if weak.transformer.config[key] != strong.transformer.config[key]:
            problems.append(f"transformer {key} {weak.transformer.config[key]} vs {strong.transformer.config[key]}")
    if problems:
        raise ValueError(
            f"weak_model cannot guide this model: it has {', '.join(problems)} (autoguidance needs an "
            "earlier or smaller checkpoint of the same setup)"
        )
