"""Image-to-text in full: templates, per-image seeds, image kinds, unconditional captions, tokens and confidences."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

COLOURS = ("red", "blue", "white")


def _seeds(n: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


def _images() -> list[PIL.Image.Image]:
    return [PIL.Image.new("RGB", (20, 20), c) for c in COLOURS]


def test_template_tokens_survive_and_blanks_are_words(i2t, tokenizer):
    blank = tokenizer.mask_token
    template = f"a {blank} circle to the left of a {blank} square"
    out = i2t(_images(), prompt=template, num_inference_steps=2, return_tokens=True)
    expected = tokenizer(template, add_special_tokens=False)["input_ids"]
    ids = out.token_ids
    assert ids.shape == (3, i2t.transformer.config.max_text_length)
    for row, text in zip(ids, out.text, strict=True):
        for pos, tok in enumerate(expected):
            if tok != tokenizer.mask_token_id:
                assert row[pos] == tok  # fixed tokens never change
            else:
                assert row[pos] not in (tokenizer.mask_token_id, tokenizer.pad_token_id)  # a blank becomes a word
        assert (row[len(expected) :] == tokenizer.pad_token_id).all()  # the caption ends where the template ends
        assert len(text.split()) == len(expected) and blank not in text and "[PAD]" not in text
    conf = out.confidences
    assert (conf[:, 0] == 1).all() and ((conf > 0) & (conf <= 1)).all()


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 1.0, "remasking": "random"}, {"temperature": 0.7, "prompt": "a small"}],
    ids=["argmax", "random-remasking", "prefix-temperature"],
)
def test_batched_captions_equal_per_image_captions(i2t, tokenizer, options):
    kw = {"num_inference_steps": 4, "guidance_scale": 2.0, "return_tokens": True, **options}
    batched = i2t(_images(), generator=_seeds(3), **kw)
    for i, image in enumerate(_images()):
        single = i2t(image, generator=_seeds(1, i)[0], **kw)
        assert single.text == [batched.text[i]]
        assert torch.equal(single.token_ids[0], batched.token_ids[i])
    ids = batched.token_ids
    assert not (ids == tokenizer.mask_token_id).any()
    # after the first pad only pads: ids and text agree, no caption contains a pad inside
    ended = (ids == tokenizer.pad_token_id).long().cumsum(1) > 0
    assert (ids[ended] == tokenizer.pad_token_id).all()
    if options.get("temperature"):
        again = i2t(_images(), generator=_seeds(3, 10), **kw)
        assert not torch.equal(again.token_ids, ids)  # the seeds matter when sampling


def test_num_images_per_prompt_gives_several_captions_per_image_in_order(i2t):
    kw = {"num_inference_steps": 4, "guidance_scale": 2.0, "temperature": 1.0, "prompt": ["a small", "a large"]}
    images = _images()[:2]
    several = i2t(images, num_images_per_prompt=2, generator=_seeds(4), **kw)
    assert len(several.text) == 4
    assert [t.split()[:2] for t in several.text] == [["a", "small"]] * 2 + [["a", "large"]] * 2
    for i, image in enumerate([images[0], images[0], images[1], images[1]]):  # caption i is image i // 2's
        prompt = kw["prompt"][i // 2]
        assert i2t(image, generator=_seeds(1, i)[0], **{**kw, "prompt": prompt}).text == [several.text[i]]
    unconditional = i2t(None, num_captions=2, num_images_per_prompt=3, num_inference_steps=2, generator=_seeds(6))
    assert len(unconditional.text) == 6
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        i2t(images, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="got 3 prompts for 2 images"):
        i2t(images, prompt=["a", "b", "c"], num_images_per_prompt=2)


def test_every_image_kind_and_mode_is_converted(i2t):
    rgb = PIL.Image.new("RGB", (17, 23), (200, 30, 30))
    array = np.asarray(rgb)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1
    same = [rgb, array, array.astype(np.float32) / 255, tensor, tensor.add(1).mul(127.5).round().byte()]
    kw = {"num_inference_steps": 3, "return_tokens": True}
    ref = i2t(rgb, **kw).token_ids
    for image in same:
        assert torch.equal(i2t(image, **kw).token_ids, ref)
    assert torch.equal(i2t(tensor[None].repeat(2, 1, 1, 1), **kw).token_ids, ref.repeat(2, 1))
    modes = [
        PIL.Image.new("L", (9, 40), 128),
        PIL.Image.new("LA", (16, 16), (10, 0)),  # fully transparent: composited on white
        PIL.Image.new("RGBA", (31, 5), (255, 0, 0, 128)),
        PIL.Image.new("RGB", (16, 16), "red").convert("P"),
        PIL.Image.fromarray(np.full((12, 12), 60000, dtype=np.uint16)),  # I;16
        PIL.Image.new("1", (3, 3), 1),
        np.full((8, 8), 60000, dtype=np.uint16),
        np.zeros((8, 8, 4), dtype=np.uint8),
        torch.zeros(1, 5, 7),
    ]
    assert PIL.Image.fromarray(np.zeros((2, 2), dtype=np.uint16)).mode.startswith("I;16")
    out = i2t(modes, **kw)
    assert len(out.text) == len(modes)
    white = i2t(PIL.Image.new("RGB", (16, 16), "white"), **kw).token_ids
    assert torch.equal(out.token_ids[1:2], white)  # transparent LA == white


@pytest.mark.parametrize(
    "image,match",
    [
        (torch.full((3, 8, 8), 2.0), r"\[-1, 1\]"),
        (torch.zeros(8, 8), r"\(C, H, W\)"),
        (torch.zeros(4, 8, 8), r"\(C, H, W\)"),
        (torch.full((3, 8, 8), float("nan")), r"\[-1, 1\]"),
        (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "numpy"),
        (np.zeros((8, 8), dtype=np.int64), "dtype"),
        (PIL.Image.new("RGB", (0, 4)), "empty"),
        ([], "empty list"),
    ],
)
def test_bad_images_name_the_problem(i2t, image, match):
    with pytest.raises(ValueError, match=match):
        i2t(image, num_inference_steps=2)


def test_bad_caption_arguments_name_the_problem(i2t, tokenizer):
    image = _images()[0]
    with pytest.raises(ValueError, match="longer than max_length=2"):
        i2t(image, prompt="a small red circle", max_length=2)
    with pytest.raises(ValueError, match="max_length"):
        i2t(image, max_length=i2t.transformer.config.max_text_length + 1)
    with pytest.raises(ValueError, match="max_length"):
        i2t(image, max_length=0)
    with pytest.raises(ValueError, match="remasking"):
        i2t(image, remasking="top_k")
    with pytest.raises(ValueError, match="temperature"):
        i2t(image, temperature=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        i2t(image, guidance_scale=float("inf"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        i2t(image, num_inference_steps=-3)
    with pytest.raises(ValueError, match="guidance_interval"):
        i2t(image, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="num_captions"):
        i2t(None, num_captions=0)
    with pytest.raises(TypeError, match="unsupported type"):
        i2t("red.png")


def test_unconditional_captions_and_w1(i2t, tokenizer):
    out = i2t(None, num_captions=3, num_inference_steps=3, temperature=1.0, generator=_seeds(3), return_tokens=True)
    assert len(out.text) == 3 and not (out.token_ids == tokenizer.mask_token_id).any()
    assert out.num_forward_rows == 3 * 3  # no image, no guidance: conditional rows only
    assert i2t(_images(), num_inference_steps=3, guidance_scale=1.0).num_forward_rows == 3 * 3
    guided = i2t(_images(), num_inference_steps=3, guidance_scale=2.0, guidance_interval=(0.5, 1.0))
    assert guided.num_forward_rows == 3 * 3 + 3 * 2  # levels 1 and 2/3 guided, 1/3 not
