"""What both mmdiff pipelines share: the components, prompt and image encoding, and input checks.

Both pipeline classes take the same components, so either one loads any saved mmdiff folder.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from ..data.loader import prepare_image
from ..data.tokenizer import encode_captions
from ..models.text_encoders import encode_with_frozen_encoder, tokenize_for_frozen_encoder
from ..models.vae import encode_latents, vae_downsample_factor

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


class MMDiffPipelineBase(DiffusionPipeline):
    """Components: `transformer` (MMDiTModel), `vae` (AutoencoderKL), `scheduler` (any diffusers image scheduler),
    `text_scheduler` (MaskedDiffusionScheduler), `tokenizer` (caption tokenizer with mask and pad tokens), and
    optionally a frozen `text_encoder` with its own `text_encoder_tokenizer`."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "text_encoder_tokenizer"]

    def __init__(
        self, transformer, vae, scheduler, text_scheduler, tokenizer, text_encoder=None, text_encoder_tokenizer=None
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
        config = self.text_encoder.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "context_length", None) or 512
        if self.text_encoder_tokenizer is not None:
            limit = min(limit, self.text_encoder_tokenizer.model_max_length)
        return limit

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text context for text-to-image: (N, S, D) and its key mask (N, S). Empty prompts get the null context."""
        device = self._execution_device
        if self.text_encoder is not None:
            ids, mask = tokenize_for_frozen_encoder(self.text_encoder_tokenizer, prompts, self.frozen_max_length)
            hidden = encode_with_frozen_encoder(self.text_encoder, ids.to(device), mask.to(device))
            context, key_mask = self.transformer.encode_external_text(
                hidden.to(self.transformer.dtype), mask.to(device)
            )
        else:
            ids, _ = encode_captions(self.tokenizer, prompts, self.transformer.config.max_text_length)
            ids = ids.to(device)
            context, key_mask = self.transformer.encode_text(ids, ids != self.tokenizer.pad_token_id)
        empty = torch.tensor([not p.strip() for p in prompts], device=device)
        if empty.any():
            context, key_mask = self.transformer.drop_context(context, key_mask, empty, "text")
        return context, key_mask

    def preprocess_images(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        """PIL / numpy (H, W, C) in [0, 255] or [0, 1] / tensors (C, H, W) or (N, C, H, W) in [-1, 1]
        -> (N, 3, H, W) in [-1, 1] at the model's resolution (resize the shorter side, centre crop)."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, list):
            images = [images]
        if not images:
            raise ValueError("image is an empty list")
        out = []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                if image.ndim != 3 or image.shape[0] not in (1, 3):
                    raise ValueError(
                        f"image {i}: expected a (C, H, W) tensor with C in (1, 3), got {tuple(image.shape)}"
                    )
                if image.min() < -1.001 or image.max() > 1.001:
                    raise ValueError(
                        f"image {i}: tensor values must lie in [-1, 1], got [{image.min():.3g}, {image.max():.3g}]"
                    )
                array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
                image = PIL.Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
            elif isinstance(image, np.ndarray):
                array = image
                if array.dtype != np.uint8:
                    if array.min() < 0 or array.max() > 1.0:
                        raise ValueError(f"image {i}: float arrays must lie in [0, 1]")
                    array = (array * 255).round().astype(np.uint8)
                image = PIL.Image.fromarray(array)
            elif not isinstance(image, PIL.Image.Image):
                raise TypeError(f"image {i}: unsupported type {type(image).__name__}; give PIL, numpy or torch")
            out.append(prepare_image(image, self.image_size))
        return torch.stack(out)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents, the posterior mean (captioning is deterministic in the image)."""
        pixels = images.to(device=self._execution_device, dtype=self.vae.dtype)
        return encode_latents(self.vae, pixels, sample=False).to(self.transformer.dtype)


def check_guidance(guidance_scale: float, num_inference_steps: int) -> None:
    if not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale}")
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
