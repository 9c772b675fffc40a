"""Text-to-image: Gaussian diffusion on VAE latents with classifier-free guidance, and guidance-scale sweeps."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..checks import check_number
from ..conditioning.guided import Condition, GuidanceSpec, GuidedModel, WeakBranch, embeds_guidance
from ..diffusion.gaussian import timestep_to_t
from ..models.transformer import trim_padding
from ..models.vae import decode_latents, vae_downsample_factor
from .common import MMDiffPipelineBase, check_guidance, guidance_spec, per_sample_generators
from .prompts import as_prompt_list, check_embeds, pad_context, repeat_rows
from .schedulers import check_scheduler_fits, check_sigmas, is_flow_map

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
NON_FINITE = (
    "sampling produced NaN or inf values (a very large guidance_scale, or float16, overflows); "
    "use a smaller guidance_scale or float32"
)


@dataclass
class MMDiffImagePipelineOutput(ImagePipelineOutput):
    """images: as `output_type` asks (diffusers' `ImagePipelineOutput`). num_forward_rows: the transformer rows the
    call ran (conditional plus unconditional rows over all steps): what guidance intervals and CFG cost."""

    num_forward_rows: int | None = None


@dataclass
class GuidanceSweepOutput(BaseOutput):
    """Images of one sweep, grouped by scale.

    guidance_scales: the S scales, in the order given.
    prompts: the N prompts, one per image within a group (each prompt repeated `num_images_per_prompt` times).
    images: S entries, `images[s][n]` made from `prompts[n]` at `guidance_scales[s]` with the same seed for every s:
        a list of PIL images, an (N, H, W, 3) numpy array, an (N, 3, H, W) tensor, or (N, C, h, w) latents.
    num_forward_rows: the transformer rows the sweep ran.
    """

    guidance_scales: list[float]
    prompts: list[str]
    images: list[list[PIL.Image.Image] | np.ndarray | torch.Tensor]
    num_forward_rows: int | None = None


class MMDiffTextToImagePipeline(MMDiffPipelineBase):
    """Generate images from captions with the shared MMDiT.

    Example:
        >>> pipe = MMDiffTextToImagePipeline.from_pretrained("./assets/shapes_small")
        >>> image = pipe("a small red circle above a large blue square", guidance_scale=3.0).images[0]
    """

    _callback_tensor_inputs = ["latents"]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the unconditional branch runs at the current w (w != 1); never for a transformer that takes w as
        an input (`guidance_embeds`), whose one forward gives the guided prediction."""
        return self._guidance_scale != 1.0 and not embeds_guidance(self.transformer)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature; never mutated
        guidance: str = "cfg",
        guidance_params: dict | None = None,
        weak_model=None,
    ) -> MMDiffImagePipelineOutput | tuple:
        """Args follow diffusers' text-to-image pipelines; w = `guidance_scale` = 1 means no guidance.

        num_inference_steps, guidance_scale: unset, the pipeline's `sample_config` applies (a folder's saved
            `sample.num_inference_steps` / `sample.guidance_scale`).
        sigmas: the noise levels the steps start from, decreasing in (0, 1] (the last step ends at 0), instead of the
            scheduler's spacing of `num_inference_steps`, for the schedulers that take them (flow Euler and the
            flow-map scheduler): where a few-step model's steps split the path.
        prompt: a caption or a list; None or "" samples unconditionally (the learned null context).
        negative_prompt: replaces the null context as the unconditional branch (one, or one per prompt).
        guidance_interval: (t_low, t_high) in [0, 1]; outside it only the conditional pass runs.
        guidance_rescale: phi of Lin et al. 2024 in [0, 1].
        generator: one generator, or a list with one per image (prompts x num_images_per_prompt) so each image is
            reproducible on its own.
        latents: (N, C, h, w) initial noise instead of drawing it.
        prompt_embeds, prompt_attention_mask: the text encoder's output for B prompts instead of `prompt` (what
            `encode_prompt` returns: a frozen encoder's hidden states (B, S, E), or the joint encoder's context
            (B, S, D)) and its (B, S) mask, 1 on real tokens; a row whose mask is all 0 is unconditional (the
            learned null context). negative_prompt_embeds, negative_prompt_attention_mask: the same for
            `negative_prompt`.
        output_type: "pil", "np" (N, H, W, 3) in [0, 1], "pt" (N, 3, H, W) in [0, 1] or "latent".
        callback_on_step_end: `fn(pipe, step_index, timestep, {"latents": ...}) -> dict` after every step (diffusers'
            protocol); a returned "latents" replaces the current latents; the callback may set
            `pipe._guidance_scale` (the next steps use it; 1.0 stops guiding) or `pipe._interrupt = True` (the
            remaining steps are skipped).
        guidance: the guidance method, "cfg" (default), "apg", "cfg_zero_star", "tcfg" (diffusers' guiders; their
            `guidance_scale` is w, same convention) or "autoguidance" (the unconditional branch is `weak_model`'s
            conditional prediction: a pipeline or folder of an earlier or smaller checkpoint sharing VAE, tokenizer
            and objective). guidance_params: the method's own arguments (e.g. {"zero_init_steps": 1}).
        """
        if guidance_scale is None:
            guidance_scale = self.sample_config.guidance_scale
        spec = guidance_spec(
            [guidance_scale], guidance, guidance_params, guidance_interval, guidance_rescale, weak_model
        )
        self._guidance_scale, self._interrupt = spec.scales[0], False
        self.check_callback_inputs(callback_on_step_end_tensor_inputs)
        _, latents, rows = self._sample(
            prompt=prompt,
            negative_prompt=negative_prompt,
            spec=spec,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            generator=generator,
            latents=latents,
            output_type=output_type,
            embeds=(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask),
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return MMDiffImagePipelineOutput(images=images, num_forward_rows=rows)

    @torch.no_grad()
    def guidance_sweep(
        self,
        prompt: str | list[str] | None,
        guidance_scales: Sequence[float],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        guidance: str = "cfg",
        guidance_params: dict | None = None,
        weak_model=None,
    ) -> GuidanceSweepOutput:
        """The same prompts and initial noise at several guidance scales, in one batched denoising loop.

        Every scale starts from the same N initial latents (drawn once from `generator`, or `latents`), so the images
        of one prompt and seed differ only by w. Each step runs one forward of S*N conditional rows plus N unguided
        rows for every scale that needs them (w != 1, inside `guidance_interval`). With a deterministic scheduler
        (DDIM, DPM-Solver++, Euler, UniPC) `images[s]` equals `pipe(..., guidance_scale=guidance_scales[s])` with the
        same seeds, up to float rounding; stochastic schedulers (DDPM, Euler ancestral) draw fresh step noise per row.

        Returns `GuidanceSweepOutput` with `images[s]` for `guidance_scales[s]` (see its docstring for the layout).
        """
        if not isinstance(guidance_scales, Sequence | np.ndarray) or isinstance(guidance_scales, str):
            guidance_scales = []
        scales = [check_number("guidance_scales", w, 0.0, meaning=" (1 = no guidance)") for w in guidance_scales]
        if not scales:
            raise ValueError("guidance_scales must be a non-empty list of numbers, e.g. [1.0, 2.0, 4.0]")
        spec = guidance_spec(scales, guidance, guidance_params, guidance_interval, guidance_rescale, weak_model)
        self._guidance_scale, self._interrupt = spec.scales[0], False
        prompts, latents, rows = self._sample(
            prompt=prompt,
            negative_prompt=negative_prompt,
            spec=spec,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            generator=generator,
            latents=latents,
            output_type=output_type,
        )
        groups = latents.chunk(len(scales))
        images = [self._postprocess(group, output_type) for group in groups]
        self.maybe_free_model_hooks()
        return GuidanceSweepOutput(guidance_scales=scales, prompts=prompts, images=images, num_forward_rows=rows)

    # ------------------------------------------------------------------ steps

    def check_inputs(
        self,
        spec: GuidanceSpec,
        num_inference_steps: int,
        num_images_per_prompt: int,
        height: int,
        width: int,
        output_type: str,
    ) -> None:
        """Every argument error is a ValueError naming the argument and what it accepts."""
        check_guidance(spec.scales[0], num_inference_steps, self.scheduler.config.num_train_timesteps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        multiple = vae_downsample_factor(self.vae) * self.transformer.config.patch_size
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size < multiple or size % multiple:
                raise ValueError(
                    f"{name}={size} cannot be produced: it must be a positive multiple of {multiple} "
                    f"(VAE downsampling {vae_downsample_factor(self.vae)} x patch size "
                    f"{self.transformer.config.patch_size})"
                )

    # ------------------------------------------------------------------ the prompt

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The text encoder's output for the prompts (and the negative prompts), as `__call__` takes it back through
        `prompt_embeds=...` (diffusers' contract).

        With a frozen text encoder (`text_encoder`) these are its hidden states (N, S, E), and the transformer is not
        needed; with the jointly trained encoder, which is part of the transformer, the context (N, S, D) it makes.
        N = prompts x `num_images_per_prompt`. Masks are (N, S) bool; the mask of an empty prompt is all False, which
        the pipeline turns into the learned null context. Without a negative prompt the unconditional branch is the
        learned null context, so `negative_prompt_embeds` is None (also without guidance). Given embeddings are
        passed through, repeated `num_images_per_prompt` times.

        Returns prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = as_prompt_list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_text(prompts, device)
        else:
            prompts = None
            prompt_embeds, prompt_attention_mask = check_embeds("prompt_embeds", prompt_embeds, prompt_attention_mask)
        if do_classifier_free_guidance and negative_prompt_embeds is None and negative_prompt is not None:
            negatives = as_prompt_list(negative_prompt, prompt_embeds.shape[0], "negative_prompt")
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negatives, device)
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = check_embeds(
                "negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask
            )
            if negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError(
                    f"negative_prompt_embeds has {negative_prompt_embeds.shape[0]} rows for "
                    f"{prompt_embeds.shape[0]} prompts"
                )
        del prompts
        prompt_embeds, prompt_attention_mask = repeat_rows(prompt_embeds, prompt_attention_mask, num_images_per_prompt)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = repeat_rows(
                negative_prompt_embeds, negative_prompt_attention_mask, num_images_per_prompt
            )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> the text encoder's output and mask; an empty prompt's mask is all False."""
        conditioner = self.text_conditioner
        if conditioner.frozen:
            embeds, mask = conditioner.frozen_hidden(prompts, device)
        elif self.transformer is None:
            raise ValueError(
                "this model's text encoder is the jointly trained one inside its transformer: encode_prompt needs the "
                "transformer (only a frozen text_encoder encodes prompts on its own)"
            )
        else:
            embeds, mask = conditioner.joint_context(self.transformer, prompts, device)
        empty = torch.tensor([not p.strip() for p in prompts], device=mask.device)
        mask = mask.bool() & ~empty[:, None]
        # a row with no real token attends to no key (NaN on some torch releases); it becomes the null context
        # later, so its values only need to be finite
        return torch.where(mask.any(1)[:, None, None], embeds, torch.zeros_like(embeds)), mask

    def text_context(
        self, prompt_embeds: torch.Tensor, prompt_attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_prompt`'s output -> the context the transformer cross-attends to, (N, S', D) and its key mask:
        a frozen encoder's hidden states through the transformer's projection; rows with no real token (empty
        prompts, also those of pad tokens only) get the learned null context (attention over no key is NaN)."""
        model = self.transformer
        embeds = prompt_embeds.to(device=self._execution_device, dtype=model.dtype)
        mask = prompt_attention_mask.to(self._execution_device).bool()
        if model.config.external_text_dim is not None:
            context, mask = model.encode_external_text(embeds, mask)
        else:
            context, mask = trim_padding(embeds, mask)
        empty = ~mask.any(1)
        if empty.any():
            context, mask = model.drop_context(context, mask, empty, "text")
        return context, mask

    # ------------------------------------------------------------------ the denoising loop

    def _sample(
        self,
        *,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        spec: GuidanceSpec,
        num_inference_steps: int | None,
        num_images_per_prompt: int,
        sigmas: list[float] | None = None,
        height: int | None,
        width: int | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        embeds: tuple = (None, None, None, None),
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> tuple[list[str], torch.Tensor, int]:
        """Denoise S = len(spec.scales) groups of N images in one loop.

        Returns the N expanded prompts ("" for rows given as embeddings), the final latents (S*N, C, h, w), group s
        holding scale s, and the transformer rows that ran.
        """
        # 1. check inputs
        if sigmas is not None:
            sigmas = check_sigmas(self.scheduler, sigmas, num_inference_steps)
            num_inference_steps = len(sigmas)
        elif num_inference_steps is None:
            num_inference_steps = self.sample_config.num_inference_steps
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        self.check_inputs(spec, num_inference_steps, num_images_per_prompt, height, width, output_type)
        num_inference_steps = int(num_inference_steps)
        device = self._execution_device
        prompt_embeds, prompt_mask, negative_embeds, negative_mask = embeds
        if prompt_embeds is not None and prompt is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if negative_embeds is not None and negative_prompt is not None:
            raise ValueError("give negative_prompt or negative_prompt_embeds, not both")

        # 2. encode the prompt and the unconditional branch once; the guided model caches their cross-attention
        # K/V for the call. Without a negative prompt the unconditional rows use the learned null context.
        prompt_embeds, prompt_mask, negative_embeds, negative_mask = self.encode_prompt(
            prompt, True, negative_prompt, num_images_per_prompt, device, prompt_embeds, negative_embeds, prompt_mask,
            negative_mask,
        )  # fmt: skip
        context, context_mask = self.text_context(prompt_embeds, prompt_mask)
        n, s = context.shape[0], len(spec.scales)
        prompts = (
            [p for p in as_prompt_list(prompt) for _ in range(num_images_per_prompt)] if embeds[0] is None else [""] * n
        )
        generator = per_sample_generators(generator, n)
        negative = None
        if negative_embeds is not None:
            uncond, uncond_mask = self.text_context(negative_embeds, negative_mask)
            length = max(context.shape[1], uncond.shape[1])
            context, context_mask = pad_context(context, context_mask, length)
            negative = pad_context(uncond, uncond_mask, length)
        weak = None
        if spec.weak_model is not None:
            if embeds[0] is not None:
                raise ValueError("autoguidance encodes the prompt with the weak model's own encoder: pass prompt")
            weak_pipe = self.weak_pipeline(spec.weak_model)
            weak = WeakBranch(weak_pipe.transformer, *weak_pipe.text_context(*weak_pipe.encode_prompt(prompts)[:2]))
        guided_model = GuidedModel(
            self.transformer,
            Condition(context, context_mask, negative=negative, weak=weak),
            "image",
            spec,
            num_inference_steps=num_inference_steps,
        )

        # 3. prepare latents: one draw of N, shared by every group of the sweep
        shape = (n, self.transformer.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor of shape {shape}, got {type(latents).__name__}")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        elif not torch.isfinite(latents).all():
            raise ValueError("latents must be finite: they hold NaN or inf")
        check_scheduler_fits(self.scheduler, self.objective_family)
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        latents = latents.to(device=device, dtype=self.transformer.dtype).repeat(s, 1, 1, 1)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at unit noise
        num_train = self.scheduler.config.num_train_timesteps
        step_kwargs = self._step_kwargs(generator * s if isinstance(generator, list) else generator)
        self._num_timesteps = len(self.scheduler.timesteps)
        flow_map = is_flow_map(self.scheduler)  # z_t -> z_r: the model is given each step's interval end r

        # 4. denoise
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for i, timestep in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    continue
                if s == 1 and self._guidance_scale != guided_model.scales[0]:  # a step callback changed w
                    guided_model.set_scales([check_number("guidance_scale", self._guidance_scale, 0.0)])
                t = timestep_to_t(timestep, num_train).to(device)
                interval = {}
                if flow_map:
                    interval["r_timestep"] = self.scheduler.sigmas[i + 1].float().to(device)
                guided = guided_model(self._scale_model_input(latents, timestep), t, **interval)
                latents = self.scheduler.step(guided, timestep, latents, **step_kwargs).prev_sample
                out = self.run_callback(
                    callback_on_step_end, i, timestep, {"latents": latents}, callback_on_step_end_tensor_inputs
                )
                latents = out.get("latents", latents)
                progress.update()
        return prompts, latents, guided_model.num_forward_rows

    @property
    def vae_scale(self) -> int:
        return vae_downsample_factor(self.vae)

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        """(N, C, h, w) latents -> images of `output_type`."""
        values = latents if output_type == "latent" else decode_latents(self.vae, latents.to(self.vae.dtype))
        if not torch.isfinite(values).all():  # would be returned, or cast to arbitrary pixels, without a word
            raise ValueError(NON_FINITE)
        if output_type == "latent":
            return latents
        return VaeImageProcessor(do_normalize=True).postprocess(values.float(), output_type=output_type)

    def _scale_model_input(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The scheduler's input scaling (Euler's 1 / sqrt(sigma^2 + 1)); flow schedulers have none."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        return latents if scale is None else scale(latents, timestep)

    def _step_kwargs(self, generator) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepted else {}
