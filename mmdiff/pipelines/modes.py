"""Generation modes that chain the two directions of the one model: image-caption pairs, image variation and
caption infilling. Each takes either pipeline class (they share components) and returns a small output object.

    >>> from mmdiff.pipelines import MMDiffTextToImagePipeline, sample_pairs, vary_image, infill_caption
    >>> pipe = MMDiffTextToImagePipeline.from_pretrained("./assets/shapes_small")
    >>> pairs = sample_pairs(pipe, num_pairs=4, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers.utils import BaseOutput

from .common import PIPELINE_SETTINGS, ImageInput, MMDiffPipelineBase
from .image_to_text import CaptionPipelineOutput, MMDiffImageToTextPipeline
from .text_to_image import MMDiffTextToImagePipeline


@dataclass
class ImageCaptionOutput(BaseOutput):
    """text: N captions; images: the images made from them (`images[i]` from `text[i // num_images_per_caption]`),
    a list of PIL images, an (M, H, W, 3) array, an (M, 3, H, W) tensor or latents, as `output_type` asks."""

    text: list[str]
    images: list[PIL.Image.Image] | Any


def as_text_to_image(pipe: MMDiffPipelineBase) -> MMDiffTextToImagePipeline:
    """The text-to-image pipeline over `pipe`'s components (the same modules, device and progress-bar settings)."""
    return sibling_pipeline(pipe, MMDiffTextToImagePipeline)


def as_image_to_text(pipe: MMDiffPipelineBase) -> MMDiffImageToTextPipeline:
    """The image-to-text pipeline over `pipe`'s components (the same modules, device and progress-bar settings)."""
    return sibling_pipeline(pipe, MMDiffImageToTextPipeline)


def sibling_pipeline(pipe: MMDiffPipelineBase, cls: type) -> Any:
    if isinstance(pipe, cls):
        return pipe
    if not isinstance(pipe, MMDiffPipelineBase):
        raise TypeError(f"expected an mmdiff pipeline, got {type(pipe).__name__}")
    # the same modules and settings (what diffusers' `cls.from_pipe(pipe)` does, without its per-version type checks)
    sibling = cls(**pipe.components, **{key: pipe.config[key] for key in PIPELINE_SETTINGS})
    sibling._progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    return sibling


def _split_generator(
    generator: torch.Generator | list[torch.Generator] | None, num_images_per_caption: int
) -> tuple[Any, Any]:
    """Generators for the caption stage and the image stage: a list of one per caption is expanded per image."""
    if isinstance(generator, list):
        return generator, [g for g in generator for _ in range(num_images_per_caption)]
    return generator, generator


def _images_for_captions(
    pipe: MMDiffPipelineBase,
    captions: list[str],
    per_caption: int,
    image_steps: int,
    guidance_scale: float,
    generator: Any,
    output_type: str,
    image_kwargs: dict,
) -> ImageCaptionOutput:
    """The image stage shared by the caption-then-generate modes: `per_caption` images from each caption."""
    images = as_text_to_image(pipe)(
        captions,
        num_inference_steps=image_steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=per_caption,
        generator=generator,
        output_type=output_type,
        **image_kwargs,
    ).images
    return ImageCaptionOutput(text=captions, images=images)


@torch.no_grad()
def sample_pairs(
    pipe: MMDiffPipelineBase,
    num_pairs: int = 4,
    caption_steps: int | None = None,
    image_steps: int | None = None,
    guidance_scale: float | None = None,
    num_images_per_caption: int = 1,
    max_length: int | None = None,
    remasking: str = "low_confidence",
    temperature: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    **image_kwargs,
) -> ImageCaptionOutput:
    """Joint samples from p(image, caption): a caption from p(text) (no image, so no guidance), then images from
    p(image | caption) with image guidance `guidance_scale`.

    temperature defaults to 1 so that the captions are samples of p(text), not its single most likely caption.
    A caption that comes out empty (the model may end it at once) gives an unconditional image.
    `image_kwargs` go to the text-to-image call (scheduler options such as `guidance_interval`, `height`).
    """
    caption_gen, image_gen = _split_generator(generator, num_images_per_caption)
    captions = as_image_to_text(pipe)(
        None,
        num_captions=num_pairs,
        num_inference_steps=caption_steps,
        guidance_scale=1.0,
        max_length=max_length,
        remasking=remasking,
        temperature=temperature,
        generator=caption_gen,
    ).text
    return _images_for_captions(
        pipe, captions, num_images_per_caption, image_steps, guidance_scale, image_gen, output_type, image_kwargs
    )


@torch.no_grad()
def vary_image(
    pipe: MMDiffPipelineBase,
    image: ImageInput | list[ImageInput],
    num_variations: int = 4,
    caption_steps: int | None = None,
    caption_guidance_scale: float | None = None,
    image_steps: int | None = None,
    guidance_scale: float | None = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    **image_kwargs,
) -> ImageCaptionOutput:
    """Image variation through text: caption each image (guided by it), then draw `num_variations` images from each
    caption. The caption is the only thing passed on, so a variation keeps what the caption says and nothing else.

    Returns `text` (one caption per input image) and `images` (`num_variations` per image, grouped by image).
    With a list of generators, give one per input image.
    """
    caption_gen, image_gen = _split_generator(generator, num_variations)
    captions = as_image_to_text(pipe)(
        image,
        num_inference_steps=caption_steps,
        guidance_scale=caption_guidance_scale,
        remasking=remasking,
        temperature=temperature,
        generator=caption_gen,
    ).text
    return _images_for_captions(
        pipe, captions, num_variations, image_steps, guidance_scale, image_gen, output_type, image_kwargs
    )


@torch.no_grad()
def infill_caption(
    pipe: MMDiffPipelineBase,
    template: str | list[str],
    image: ImageInput | list[ImageInput] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    return_tokens: bool = False,
    **sampler_kwargs,
) -> CaptionPipelineOutput:
    """Fill the blanks of a caption template, written with the tokenizer's mask token:

        >>> blank = pipe.tokenizer.mask_token
        >>> infill_caption(pipe, f"a {blank} circle to the left of a {blank} square", image).text

    Every other word stays as written and the caption ends where the template ends. With `image` the blanks are
    filled to match it (guided by `guidance_scale`); without, from p(text) alone (one caption per template).
    num_inference_steps defaults to the number of blanks of the longest template. `sampler_kwargs` (sampler,
    threshold, ...) choose the unmasking sampler as in the pipeline.
    """
    templates = [template] if isinstance(template, str) else template
    if not isinstance(templates, list | tuple) or not templates or not all(isinstance(t, str) for t in templates):
        raise TypeError("template must be a string or a non-empty list of strings")
    mask = pipe.tokenizer.mask_token
    for text in templates:
        if mask not in text:
            raise ValueError(
                f"template {text!r} has no blank: mark each word to fill with the tokenizer's mask token {mask!r}"
            )
    i2t = as_image_to_text(pipe)
    if num_inference_steps is None:
        _, _, blanks = i2t.initial_tokens(list(templates), len(templates), pipe.transformer.config.max_text_length)
        num_inference_steps = int(blanks.sum(1).max())
    num_captions = None
    if image is None:
        num_captions = len(templates)
    elif isinstance(template, str):
        templates = template  # one template for every image
    return i2t(
        image,
        prompt=templates if isinstance(templates, str) else list(templates),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        remasking=remasking,
        temperature=temperature,
        num_captions=num_captions,
        generator=generator,
        return_tokens=return_tokens,
        **sampler_kwargs,
    )
