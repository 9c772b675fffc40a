"""The chained modes: joint image-caption samples, image variation, caption infilling."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from mmdiff.pipelines import as_image_to_text, infill_caption, sample_pairs, vary_image


def test_sample_pairs_images_follow_their_captions(pipe, tokenizer):
    out = sample_pairs(
        pipe, num_pairs=3, caption_steps=3, image_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert len(out.text) == 3 and out.images.shape == (3, 16, 16, 3)
    assert all(tokenizer.mask_token not in t for t in out.text)
    # caption from p(text) (no guidance, temperature 1), then plain text-to-image, one generator throughout
    generator = torch.Generator().manual_seed(0)
    captions = as_image_to_text(pipe)(None, num_captions=3, num_inference_steps=3, temperature=1.0, generator=generator)
    assert captions.text == out.text
    again = pipe(captions.text, num_inference_steps=2, guidance_scale=3.0, output_type="np", generator=generator).images
    assert (abs(again - out.images) < 1e-5).all()


def test_vary_image_captions_then_generates(i2t):
    images = [PIL.Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    out = vary_image(
        i2t,
        images,
        num_variations=2,
        caption_steps=3,
        image_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in range(2)],
    )
    assert (
        out.text
        == i2t(images, num_inference_steps=3, generator=[torch.Generator().manual_seed(s) for s in range(2)]).text
    )
    assert out.images.shape == (4, 16, 16, 3)


def test_infill_caption_fills_only_the_blanks(pipe, tokenizer):
    blank = tokenizer.mask_token
    template = f"a {blank} red {blank}"
    image = PIL.Image.new("RGB", (16, 16), "red")
    out = infill_caption(pipe, template, image, return_tokens=True)
    words = out.text[0].split()
    assert len(words) == 4 and words[0] == "a" and words[2] == "red"
    uncond = infill_caption(pipe, [template, f"{blank} {blank} circle"])
    assert len(uncond.text) == 2 and uncond.text[1].endswith("circle")
    with pytest.raises(ValueError, match="has no blank"):
        infill_caption(pipe, "a small red circle", image)
    assert as_image_to_text(pipe)._progress_bar_config == pipe._progress_bar_config
