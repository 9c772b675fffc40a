"""Caption samplers: confidence threshold, entropy bound, blocks, ReMDM remasking, and finished rows that stop."""

from __future__ import annotations

import copy
import json

import PIL.Image
import pytest
import torch

from mmdiff.cli import main
from mmdiff.diffusion.masked import MaskedDiffusionScheduler
from mmdiff.pipelines import MMDiffImageToTextPipeline

MASK = 3
LENGTH, VOCAB = 8, 12
COLOURS = ("red", "blue", "white", "green")


def _logits(seed: int, rows: int = 2, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, LENGTH, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def _decode(scheduler: MaskedDiffusionScheduler, rows: int = 2, steps: int | None = None) -> list[int]:
    """Unmask all-mask rows with fresh random logits each step; returns how many positions each step unmasked."""
    ids = torch.full((rows, LENGTH), MASK)
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    counts = []
    levels = [None] * LENGTH
    if scheduler.config.sampler == "schedule":
        scheduler.set_timesteps(steps or LENGTH, length=LENGTH)
        levels = list(scheduler.timesteps)
    for i, level in enumerate(levels):
        if not (ids == MASK).any():
            break
        before = int((ids == MASK).sum())
        t = level if level is not None else 1.0
        ids = scheduler.step(_logits(i, rows), t, ids, MASK, fixed=fixed).prev_sample
        counts.append(before - int((ids == MASK).sum()))
    assert not (ids == MASK).any()
    return counts


def test_threshold_above_every_confidence_gives_one_token_per_step():
    # threshold 1: no softmax probability reaches it, so every step unmasks exactly the most confident position of
    # each row: a row whose confidences are all below tau still advances
    counts = _decode(MaskedDiffusionScheduler(sampler="threshold", threshold=1.0))
    assert counts == [2] * LENGTH
    # a low threshold takes many at once
    assert len(_decode(MaskedDiffusionScheduler(sampler="threshold", threshold=0.05))) < LENGTH
    # the most confident position is the one taken
    ids = torch.full((1, LENGTH), MASK)
    logits = _logits(0, 1)
    out = MaskedDiffusionScheduler(sampler="threshold", threshold=1.0).step(logits, 1.0, ids, MASK)
    conf = logits.softmax(-1).max(-1).values[0]
    assert (out.prev_sample[0] != MASK).nonzero().flatten().tolist() == [int(conf.argmax())]


def test_entropy_bound_between_one_and_all_tokens_per_step():
    assert _decode(MaskedDiffusionScheduler(sampler="entropy", entropy_bound=1e-9)) == [2] * LENGTH
    assert _decode(MaskedDiffusionScheduler(sampler="entropy", entropy_bound=1e9)) == [2 * LENGTH]
    middle = _decode(MaskedDiffusionScheduler(sampler="entropy", entropy_bound=1.0))
    assert 1 < len(middle) < LENGTH


def test_blocks_decode_left_to_right():
    ids = torch.full((1, LENGTH), MASK)
    scheduler = MaskedDiffusionScheduler(sampler="threshold", threshold=0.01, block_length=3)
    out = scheduler.step(_logits(0, 1, scale=10.0), 1.0, ids, MASK).prev_sample
    assert (out[0, :3] != MASK).all() and (out[0, 3:] == MASK).all()  # only the first block, all of it
    scheduler = MaskedDiffusionScheduler(sampler="schedule", block_length=4)
    scheduler.set_timesteps(4, length=LENGTH)  # 2 steps per block
    positions = []
    for i, t in enumerate(scheduler.timesteps):
        before = ids == MASK
        ids = scheduler.step(_logits(i, 1), t, ids, MASK).prev_sample
        positions.append((before & (ids != MASK))[0].nonzero().flatten().tolist())
    assert all(p < 4 for p in positions[0] + positions[1]) and all(p >= 4 for p in positions[2] + positions[3])
    assert not (ids == MASK).any()
    assert scheduler.timesteps.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])  # the caption's mask levels


def test_remasking_masks_committed_tokens_only_inside_the_window():
    scheduler = MaskedDiffusionScheduler(sampler="schedule", remask_fraction=0.5, remask_window=(0.3, 1.0))
    scheduler.set_timesteps(4, length=LENGTH)
    ids = torch.tensor([[5, 6, 7, 8, MASK, MASK, MASK, MASK]])
    fixed = torch.tensor([[True, True, False, False, False, False, False, False]])
    out = scheduler.step(_logits(1, 1), scheduler.timesteps[1], ids, MASK, fixed=fixed).prev_sample
    assert (out[0, :2] == ids[0, :2]).all()  # prompt tokens are never remasked
    assert int((out[0, 2:4] == MASK).sum()) == 1  # half of the 2 committed tokens
    late = scheduler.step(_logits(1, 1), scheduler.timesteps[3], ids, MASK, fixed=fixed).prev_sample
    assert (late != MASK).all()  # the last step (and any level outside the window) never remasks
    with pytest.raises(ValueError, match="needs `fixed`"):
        scheduler.step(_logits(1, 1), scheduler.timesteps[1], ids, MASK)


@pytest.fixture
def confident_i2t(pipe):
    """The test pipeline with weights moved off adaLN-Zero's zero init, so its captions have varied confidences."""
    transformer = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in transformer.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    i2t = MMDiffImageToTextPipeline(**{**pipe.components, "transformer": transformer})
    i2t.set_progress_bar_config(disable=True)
    return i2t


def _images() -> list[PIL.Image.Image]:
    return [PIL.Image.new("RGB", (20, 20), c) for c in COLOURS]


def _seeds(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


SETTINGS = [
    {"sampler": "threshold", "threshold": 0.3},
    {"sampler": "entropy", "entropy_bound": 2.0},
    {"sampler": "threshold", "threshold": 0.3, "block_length": 5},
    {"sampler": "schedule", "num_inference_steps": 6, "remask_fraction": 0.3, "remask_window": (0.2, 0.9)},
    {"sampler": "schedule", "num_inference_steps": 6, "block_length": 4},  # 12 tokens: 3 blocks of 2 steps
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_batched_equals_one_by_one_and_fixed_tokens_stay(confident_i2t, tokenizer, settings):
    i2t = confident_i2t
    kwargs = dict(temperature=0.7, guidance_scale=2.0, **settings)
    batched = i2t(_images(), generator=_seeds(4), return_tokens=True, **kwargs)
    for i, image in enumerate(_images()):
        single = i2t(image, generator=[torch.Generator().manual_seed(i)], return_tokens=True, **kwargs)
        assert single.text[0] == batched.text[i]
    blank = tokenizer.mask_token
    template = f"a {blank} circle above a {blank} square"
    expected = tokenizer(template, add_special_tokens=False)["input_ids"]
    for prompt in ("a small", template):
        out = i2t(_images(), prompt=prompt, generator=_seeds(4), return_tokens=True, **kwargs)
        fixed = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for row in out.token_ids:
            assert all(int(row[p]) == tok for p, tok in enumerate(fixed) if tok != tokenizer.mask_token_id)
            assert not (row == tokenizer.mask_token_id).any()
        if prompt == template:
            assert all((row[len(expected) :] == tokenizer.pad_token_id).all() for row in out.token_ids)


def test_zero_remasking_and_one_block_equal_the_base_sampler(confident_i2t):
    i2t = confident_i2t
    for base in ({"sampler": "schedule", "num_inference_steps": 6, "remasking": "random"}, {"sampler": "threshold"}):
        kwargs = dict(temperature=0.7, guidance_scale=2.0, **base)
        reference = i2t(_images(), generator=_seeds(4), **kwargs).text
        length = i2t.transformer.config.max_text_length
        assert i2t(_images(), generator=_seeds(4), block_length=length, **kwargs).text == reference
        if base["sampler"] == "schedule":
            zero = i2t(_images(), generator=_seeds(4), remask_fraction=0.0, remask_window=(0.0, 1.0), **kwargs)
            assert zero.text == reference


def test_finished_rows_take_no_forward_pass(confident_i2t, tokenizer):
    # a template with one blank is done after one step, the free captions later: the transformer runs only the
    # captions that still have a masked position (x 2 with CFG), so the rows counted are the active rows of each step
    i2t = confident_i2t
    prompts = [f"a {tokenizer.mask_token} circle", "", ""]
    for guidance_scale, per_row in ((1.0, 1), (2.0, 2)):
        active = [3]  # before the first step every caption has masks

        def count(pipe, i, t, tensors, active=active):
            active.append(int((tensors["token_ids"] == tokenizer.mask_token_id).any(1).sum()))
            return tensors

        out = i2t(
            _images()[:3],
            prompt=prompts,
            sampler="threshold",
            threshold=0.99,
            guidance_scale=guidance_scale,
            callback_on_step_end=count,
        )
        steps = len(active) - 1
        assert active[-1] == 0 and active[1] == 2 and steps > 1  # the template row finished at the first step
        assert out.num_forward_rows == per_row * sum(active[:-1]) < per_row * 3 * steps


def test_bad_sampler_settings_are_one_line_errors(confident_i2t, saved_pipe, tmp_path, capsys):
    image = _images()[0]
    cases = [
        ({"sampler": "threshold", "threshold": 0.0}, "threshold must lie in \\(0, 1\\]"),
        ({"sampler": "threshold", "threshold": 1.5}, "threshold must lie in \\(0, 1\\]"),
        ({"sampler": "entropy", "entropy_bound": 0.0}, "entropy_bound must be a positive"),
        ({"block_length": 0}, "block_length must be a positive integer"),
        ({"num_inference_steps": 5, "block_length": 4}, "num_inference_steps=5 must be a multiple of the 3 blocks"),
        ({"remask_fraction": 1.0}, "remask_fraction must lie in \\[0, 1\\)"),
        ({"remask_fraction": -0.1}, "remask_fraction must lie in \\[0, 1\\)"),
        ({"remask_window": (0.8, 0.2)}, "remask_window must be"),
        ({"sampler": "threshold", "remask_fraction": 0.2}, "remask_fraction > 0 needs sampler='schedule'"),
        ({"sampler": "magic"}, "sampler must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            confident_i2t(image, **kwargs)
    png = tmp_path / "x.png"
    image.save(png)
    for args, message in (
        (["--sampler", "threshold", "--threshold", "2"], "threshold must lie in (0, 1]"),
        (["--remask-fraction", "1"], "remask_fraction must lie in [0, 1)"),
        (["--entropy-bound", "-1", "--sampler", "entropy"], "entropy_bound must be a positive"),
        (["--block-length", "5", "--steps", "4"], "must be a multiple of the 3 blocks"),
    ):
        code = main(
            ["caption", "--model", str(saved_pipe), str(png), "--quiet", "--out", str(tmp_path / "c.json"), *args]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("mmdiff caption: error:")
    ok = ["caption", "--model", str(saved_pipe), str(png), "--quiet", "--out", str(tmp_path / "c.json")]
    assert main([*ok, "--sampler", "entropy", "--entropy-bound", "0.5", "--block-length", "4"]) == 0
    assert len(json.loads((tmp_path / "c.json").read_text())) == 1
