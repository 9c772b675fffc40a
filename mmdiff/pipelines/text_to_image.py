"""Text-to-image: Gaussian diffusion on VAE latents with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion.gaussian import timestep_to_t
from ..diffusion.guidance import classifier_free_guidance, guidance_active
from ..models.vae import decode_latents, vae_downsample_factor
from .common import MMDiffPipelineBase, check_guidance

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class MMDiffTextToImagePipeline(MMDiffPipelineBase):
    """Generate images from captions with the shared MMDiT.

    Example:
        >>> pipe = MMDiffTextToImagePipeline.from_pretrained("runs/shapes_tiny/pipeline")
        >>> image = pipe("a small red circle above a large blue square", guidance_scale=3.0).images[0]
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Args follow diffusers' text-to-image pipelines; w = `guidance_scale` = 1 means no guidance.

        guidance_interval: (t_low, t_high) in [0, 1]; outside it only the conditional pass runs.
        prompt None or "" samples unconditionally; negative_prompt replaces the null context as the unguided branch.
        """
        # 1. check inputs
        prompts = self._as_prompt_list(prompt)
        check_guidance(guidance_scale, num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        factor = vae_downsample_factor(self.vae)
        height = height or self.image_size
        width = width or self.image_size
        for name, size in (("height", height), ("width", width)):
            if size % (factor * self.transformer.config.patch_size):
                raise ValueError(
                    f"{name}={size} must be a multiple of {factor * self.transformer.config.patch_size} "
                    f"(VAE downsampling {factor} x patch size {self.transformer.config.patch_size})"
                )
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if any(name not in ("latents",) for name in tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name 'latents', got {tensor_inputs}")
        device = self._execution_device

        # 2. encode the prompt and the unconditional branch once; their cross-attention K/V are fixed for the call
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        context, context_mask = self.encode_prompt(prompts)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            if negative_prompt is not None:
                negatives = self._as_prompt_list(negative_prompt, batch // num_images_per_prompt)
                negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
                uncond, uncond_mask = self.encode_prompt(negatives)
            else:
                uncond, uncond_mask = self.transformer.null_context("text", batch, context.shape[1])
            length = max(context.shape[1], uncond.shape[1])
            context, context_mask = _pad_context(context, context_mask, length)
            uncond, uncond_mask = _pad_context(uncond.to(context.dtype), uncond_mask, length)
            both_mask = torch.cat([uncond_mask, context_mask])
            both_kv = self.transformer.context_kv(torch.cat([uncond, context]))  # (2N, ...): [uncond; cond]
            cond_kv = [(k[batch:], v[batch:]) for k, v in both_kv]
        else:
            cond_kv = self.transformer.context_kv(context)

        # 3. prepare latents
        shape = (batch, self.transformer.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=self.transformer.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        num_train = self.scheduler.config.num_train_timesteps

        # 4. denoise
        self._num_forward_rows = 0
        extra_step_kwargs = self._step_kwargs(generator)
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for i, timestep in enumerate(self.scheduler.timesteps):
                t = timestep_to_t(timestep, num_train).to(device)
                model_input = self.scheduler.scale_model_input(latents, timestep)
                if use_cfg and guidance_active(float(t), guidance_scale, guidance_interval):
                    pred = self.transformer(
                        torch.cat([model_input, model_input]), t, context_mask=both_mask, context_kv=both_kv
                    )
                    pred_uncond, pred_cond = pred.chunk(2)
                    pred = classifier_free_guidance(pred_cond, pred_uncond, guidance_scale, guidance_rescale)
                    self._num_forward_rows += 2 * batch
                else:
                    pred = self.transformer(model_input, t, context_mask=context_mask, context_kv=cond_kv)
                    self._num_forward_rows += batch
                latents = self.scheduler.step(pred, timestep, latents, **extra_step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, timestep, {"latents": latents})
                    latents = out.pop("latents", latents)
                progress.update()

        # 5. decode
        if output_type == "latent":
            images = latents
        else:
            pixels = decode_latents(self.vae, latents.to(self.vae.dtype))
            images = VaeImageProcessor(do_normalize=True).postprocess(pixels.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _step_kwargs(self, generator) -> dict:
        import inspect

        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepted else {}

    @staticmethod
    def _as_prompt_list(prompt: str | list[str] | None, batch: int = 1) -> list[str]:
        if prompt is None:
            return [""] * batch
        if isinstance(prompt, str):
            return [prompt] * batch
        if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is an empty list; pass None or '' for unconditional samples")
        if batch > 1 and len(prompt) != batch:
            raise ValueError(f"negative_prompt has {len(prompt)} entries for {batch} prompts")
        return list(prompt)


def _pad_context(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = length - context.shape[1]
    if pad <= 0:
        return context, mask
    return torch.nn.functional.pad(context, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad), value=False)
