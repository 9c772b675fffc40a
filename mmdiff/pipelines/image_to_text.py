"""Image-to-text: captioning by iterative unmasking (masked diffusion) with classifier-free guidance on logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from ..data.tokenizer import decode_captions, encode_captions
from ..diffusion.guidance import classifier_free_guidance, guidance_active
from .common import ImageInput, MMDiffPipelineBase, check_guidance


@dataclass
class CaptionPipelineOutput(BaseOutput):
    """text: one caption per image; token_ids (N, L) and confidences (N, L) when `return_tokens=True`."""

    text: list[str]
    token_ids: torch.Tensor | None = None
    confidences: torch.Tensor | None = None


class MMDiffImageToTextPipeline(MMDiffPipelineBase):
    """Caption images with the shared MMDiT by unmasking a fully masked caption over K steps.

    Example:
        >>> pipe = MMDiffImageToTextPipeline.from_pretrained("runs/shapes_tiny/pipeline")
        >>> pipe(image, guidance_scale=2.0).text[0]
    """

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | list[ImageInput] | None = None,
        prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 2.0,
        max_length: int | None = None,
        remasking: str | None = None,
        temperature: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        num_captions: int | None = None,
        generator: torch.Generator | None = None,
        return_tokens: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ) -> CaptionPipelineOutput | tuple:
        """Args:
        image: one image or a list (PIL, numpy, tensor); None samples captions unconditionally (`num_captions` of them).
        prompt: a fixed caption prefix ("a small red"), or a template whose mask tokens mark the blanks
            ("a [MASK] circle above a [MASK] square"); fixed tokens are never changed.
        num_inference_steps: K unmasking steps (default: max_length, one token per step).
        guidance_scale: w on logits, w = 1 unguided. remasking: "low_confidence" or "random". temperature: 0 = argmax.
        """
        # 1. check inputs and build the image context
        max_len_model = self.transformer.config.max_text_length
        max_length = max_length or max_len_model
        if not 1 <= max_length <= max_len_model:
            raise ValueError(f"max_length must be in [1, {max_len_model}] for this model, got {max_length}")
        num_inference_steps = num_inference_steps or max_length
        check_guidance(guidance_scale, num_inference_steps)
        device = self._execution_device
        if image is None:
            batch = num_captions or 1
            context, context_mask = self.transformer.null_context("image", batch)
        else:
            pixels = self.preprocess_images(image)
            batch = pixels.shape[0]
            context, context_mask = self.transformer.encode_image(self.encode_images(pixels))

        # 2. initial caption: the fixed prompt tokens, masks everywhere else
        ids, fixed = self._initial_tokens(prompt, batch, max_length, device)

        # 3. the unconditional branch is the null image context; K/V of both computed once
        use_cfg = guidance_scale != 1.0 and image is not None
        if use_cfg:
            uncond, uncond_mask = self.transformer.null_context("image", batch, context.shape[1])
            both_mask = torch.cat([uncond_mask, context_mask])
            both_kv = self.transformer.context_kv(torch.cat([uncond.to(context.dtype), context]))
            cond_kv = [(k[batch:], v[batch:]) for k, v in both_kv]
        else:
            cond_kv = self.transformer.context_kv(context)

        # 4. unmask
        self.text_scheduler.set_timesteps(num_inference_steps, device=device)
        confidences = fixed.float()
        mask_id = self.mask_token_id
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(self.text_scheduler.timesteps):
                if use_cfg and guidance_active(float(t), guidance_scale, guidance_interval):
                    logits = self.transformer(torch.cat([ids, ids]), t, context_mask=both_mask, context_kv=both_kv)
                    uncond_logits, cond_logits = logits.float().chunk(2)
                    logits = classifier_free_guidance(cond_logits, uncond_logits, guidance_scale)
                else:
                    logits = self.transformer(ids, t, context_mask=context_mask, context_kv=cond_kv).float()
                step = self.text_scheduler.step(
                    logits, t, ids, mask_id, generator=generator, temperature=temperature, remasking=remasking
                )
                newly = (ids == mask_id) & (step.prev_sample != mask_id)
                confidences = torch.where(newly, step.confidence, confidences)
                ids = step.prev_sample
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"token_ids": ids})
                    ids = out.pop("token_ids", ids)
                progress.update()

        text = decode_captions(self.tokenizer, ids)
        self.maybe_free_model_hooks()
        token_ids, conf = (ids, confidences) if return_tokens else (None, None)
        if not return_dict:
            return (text, token_ids, conf)
        return CaptionPipelineOutput(text=text, token_ids=token_ids, confidences=conf)

    def _initial_tokens(
        self, prompt: str | list[str] | None, batch: int, max_length: int, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) ids with masks at free positions and the bool (N, L) map of fixed positions."""
        mask_id = self.mask_token_id
        ids = torch.full((batch, max_length), mask_id, dtype=torch.long, device=device)
        if prompt is None:
            return ids, torch.zeros_like(ids, dtype=torch.bool)
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images")
        encoded, _ = encode_captions(self.tokenizer, prompts, max_length + 1)
        pad = self.tokenizer.pad_token_id
        for row, tokens in enumerate(encoded):
            tokens = tokens[tokens != pad]
            if len(tokens) > max_length:
                raise ValueError(
                    f"prompt {prompts[row]!r} is {len(tokens)} tokens, longer than max_length={max_length}"
                )
            ids[row, : len(tokens)] = tokens.to(device)
        return ids, ids != mask_id
