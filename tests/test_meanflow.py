"""MeanFlow for the image direction: the target on a field whose average velocity is known, the interval input, the
training loss, one- and few-step sampling with diffusers' FlowMapEulerDiscreteScheduler, guidance, and training end
to end with resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import close_at_scale, make_model

from mmdiff.diffusion import meanflow
from mmdiff.diffusion.meanflow import (
    FlowMapEulerDiscreteScheduler,
    MeanFlowSettings,
    meanflow_loss,
    meanflow_step,
    meanflow_target,
    sample_intervals,
)
from mmdiff.diffusion.process import MeanFlowProcess, make_image_process
from mmdiff.pipelines import swap_scheduler
from mmdiff.training.losses import LossWeights, joint_losses
from mmdiff.training.stages import build_pipeline

needs_flow_map = pytest.mark.skipif(
    FlowMapEulerDiscreteScheduler is None,
    reason="diffusers < 0.39 (the floors run) has no FlowMapEulerDiscreteScheduler, which MeanFlow sampling uses",
)


def _exact_u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The average velocity of dz/dt = z over [r, t]: z_r = z_t e^(r - t), so u = z_t (1 - e^-(t - r)) / (t - r)."""
    h = (t - r).reshape(-1, 1).to(z.dtype)
    safe = torch.where(h > 0, h, torch.ones_like(h))
    return torch.where(h > 0, z * (1 - torch.exp(-safe)) / safe, z)


def test_the_target_is_the_average_velocity_of_a_known_field_and_one_step_is_exact():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 3, generator=g, dtype=torch.float64)
    r, t = sample_intervals(256, MeanFlowSettings(equal_fraction=0.25), generator=g)
    r, t = r.double(), t.double()
    assert (r <= t).all() and (r >= 0).all() and (t <= 1).all()
    u = _exact_u(z, r, t)
    # the field's velocity at z_t is z_t itself; the identity u = v - (t - r) du/dt holds for the true u
    target = meanflow_target(_exact_u, z, z, r, t, u, fd_step=5e-3)
    assert (target - u).abs().max() < 5e-3 * u.abs().max()  # the finite difference's O(d) error
    wrong = meanflow_target(lambda z_, r_, t_: 2 * _exact_u(z_, r_, t_), z, z, r, t, u, fd_step=5e-3)
    assert (wrong - u).abs().max() > 0.05  # a u that is not the field's average velocity misses its target
    # rows given in another order: the target follows the order of u
    order = torch.randperm(256, generator=g)
    shuffled = meanflow_target(lambda *a: _exact_u(*a)[order], z, z, r, t, u[order], 5e-3, order)
    assert torch.allclose(shuffled, target[order])
    # one step over [r, t] lands on the exact solution
    assert torch.allclose(meanflow_step(z, u, t, r).double(), z * torch.exp(r - t).reshape(-1, 1), atol=1e-6)


def test_intervals_and_settings():
    r, t = sample_intervals(4000, MeanFlowSettings(), generator=torch.Generator().manual_seed(1))
    equal = (r == t).float().mean()
    assert abs(equal - 0.75) < 0.03 and (r <= t).all()
    with pytest.raises(ValueError, match="equal_fraction"):
        MeanFlowSettings(equal_fraction=1.5)
    with pytest.raises(ValueError, match="fd_step"):
        MeanFlowSettings(fd_step=0.0)
    u, target = torch.zeros(2, 4), torch.tensor([[1.0] * 4, [0.0] * 4])
    # the value is the plain MSE; the gradient is the adaptively weighted one: each row's error over (its error + c)
    u.requires_grad_(True)
    loss = meanflow_loss(u, target, MeanFlowSettings())
    assert math.isclose(float(loss.detach()), 0.5, rel_tol=1e-6)
    loss.backward()
    expected = -2 * (target - 0) / 4 / 2 / (1.0 + 1e-3)  # d/du of mean_rows(w * mean_cols((u - y)^2)), w = 1/(e + c)
    assert torch.allclose(u.grad[0], expected[0]) and torch.equal(u.grad[1], torch.zeros(4))


def test_the_interval_input_starts_at_zero_and_then_matters(tokenizer):
    from mmdiff.models.transformer import MMDiffTransformer2DModel

    fresh = MMDiffTransformer2DModel(
        vocab_size=len(tokenizer), hidden_size=32, depth=1, num_heads=2, interval_conditioning=True
    )
    last = fresh.interval_embedder.mlp[2]
    assert not last.weight.any() and not last.bias.any()  # a new model starts as a flow-matching model
    model = make_model(tokenizer, interval_conditioning=True)  # every weight moved off its initial value
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        context, mask = model.null_context("text", 2)
        instantaneous = model(x, t, context, mask)
        assert not torch.allclose(model(x, t, context, mask, r_timestep=torch.tensor([0.0, 0.1])), instantaneous)
        assert torch.equal(model(x, t, context, mask, r_timestep=t), instantaneous)  # r = t: h = 0
        model.interval_embedder.mlp[2].weight.zero_()
        model.interval_embedder.mlp[2].bias.zero_()
        assert torch.equal(model(x, t, context, mask, r_timestep=0.0), model(x, t, context, mask))
        plain = make_model(tokenizer)  # a model without the input ignores r
        assert torch.equal(plain(x, t, context, mask, r_timestep=0.0), plain(x, t, context, mask))


def test_a_few_steps_lower_the_meanflow_loss_on_a_fixed_batch(tokenizer):
    from mmdiff.data.tokenizer import encode_captions

    model = make_model(tokenizer, interval_conditioning=True, timestep_scale=1.0)
    process = MeanFlowProcess(MeanFlowSettings(equal_fraction=0.25))
    assert process.family == "flow"
    ids, _ = encode_captions(tokenizer, ["a small red circle", "there is a small green triangle"] * 4, 12)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    weights = LossWeights(text=0.0, image_cond_drop=0.5)  # dropped rows reorder the batch: the target follows

    def losses():
        g = torch.Generator().manual_seed(1)  # the same noise, intervals and dropout every time
        return joint_losses(
            model, latents, ids, tokenizer.pad_token_id, tokenizer.mask_token_id, process, weights, generator=g
        )

    first = float(losses()["loss_image"])
    assert math.isfinite(first)
    for _ in range(25):
        optimizer.zero_grad()
        losses()["loss"].backward()
        optimizer.step()
    assert float(losses()["loss_image"]) < 0.8 * first
    # with DiT's timestep scale of 1000 the same run diverges (the target holds the model's own derivative in t)


def test_meanflow_without_the_flow_map_scheduler_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(meanflow, "FlowMapEulerDiscreteScheduler", None)
    with pytest.raises(ValueError, match=r"FlowMapEulerDiscreteScheduler, which diffusers 0.39 added .*>=0.39"):
        make_image_process({"prediction_type": "meanflow"})


@pytest.fixture
def meanflow_pipe(tokenizer, vae):
    model = make_model(tokenizer, interval_conditioning=True, timestep_scale=1.0)
    with torch.no_grad():  # a real average-velocity field, the interval input included
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    process = make_image_process({"prediction_type": "meanflow"})
    pipe = build_pipeline(model.eval(), vae, process.sampling_scheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_flow_map
@pytest.mark.parametrize("steps, split", [(1, None), (2, None), (2, [1.0, 0.6])])
def test_few_step_sampling_is_the_flow_map_step_with_guidance_on_the_average_velocity(meanflow_pipe, steps, split):
    pipe = meanflow_pipe
    assert type(pipe.scheduler).__name__ == "FlowMapEulerDiscreteScheduler"
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a small red circle", "a large blue square"]
    schedule = {"num_inference_steps": steps} if split is None else {"sigmas": split}  # sigmas: where steps split
    out = pipe(prompts, guidance_scale=3.0, latents=noise, output_type="latent", **schedule)
    assert out.num_forward_rows == 2 * 2 * steps  # two images, conditional and unconditional rows, per step
    context, mask = pipe.text_context(*pipe.encode_prompt(prompts)[:2])
    null, null_mask = pipe.transformer.null_context("text", 2)
    sigmas = torch.linspace(1, 0, steps + 1) if split is None else torch.tensor([*split, 0.0])
    x = noise.clone()
    with torch.no_grad():  # by hand: z_r = z_t - (t - r) (u_null + w (u_cond - u_null))
        for t, r in zip(sigmas[:-1], sigmas[1:], strict=True):
            u_cond = pipe.transformer(x, t, context, mask, r_timestep=r)
            u_null = pipe.transformer(x, t, null, null_mask, r_timestep=r)
            x = meanflow_step(x, u_null + 3.0 * (u_cond - u_null), t, r)
    assert close_at_scale(out.images, x)


@needs_flow_map
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigmas": [0.6, 1.0]}, "decrease strictly"),
        ({"sigmas": [1.0, 0.0]}, "within"),
        ({"sigmas": [1.0, 0.5], "num_inference_steps": 3}, "2 entries for num_inference_steps=3"),
        ({"sigmas": "1.0"}, "list of noise levels"),
        ({"sigmas": [1.0, float("nan")]}, "finite"),
    ],
)
def test_bad_sigmas_are_one_clear_error(meanflow_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        meanflow_pipe("a small red circle", output_type="latent", **kwargs)


def test_a_scheduler_without_custom_sigmas_refuses_them(pipe):
    swap_scheduler(pipe, "ddim")
    with pytest.raises(ValueError, match="DDIMScheduler takes no custom sigmas"):
        pipe("a small red circle", sigmas=[1.0, 0.5], output_type="latent")


@needs_flow_map
def test_a_meanflow_model_also_samples_with_the_flow_schedulers_and_sweeps(meanflow_pipe):
    pipe = meanflow_pipe
    sweep = pipe.guidance_sweep("a small red circle", [1.0, 2.0, 4.0], num_inference_steps=1, output_type="np")
    assert len(sweep.images) == 3
    for name in ("flow_euler", "unipc"):  # at r = t the average velocity is the instantaneous one
        swap_scheduler(pipe, name)
        assert pipe("a small red circle", num_inference_steps=4, output_type="np").images.shape == (1, 16, 16, 3)


@needs_flow_map
def test_train_a_meanflow_model_end_to_end_and_resume_exactly(tiny_train_setup, tmp_path):
    from conftest import stage_run_dir, tiny_train_overrides
    from safetensors.torch import load_file

    from mmdiff.config import load_config
    from mmdiff.pipelines import MMDiffTextToImagePipeline
    from mmdiff.training.trainer import train

    meanflow = ["diffusion.prediction_type=meanflow", "train.lr_schedule=constant", "sample.num_inference_steps=2"]

    def run(folder, steps: int, resume: bool = False):
        overrides = tiny_train_overrides(tiny_train_setup, folder, max_steps=steps, checkpoint_every=2, warmup_steps=1)
        return train(load_config(None, overrides + meanflow), resume=resume)

    stage_run_dir(tiny_train_setup, tmp_path / "a")
    stage_run_dir(tiny_train_setup, tmp_path / "b")
    summary = run(tmp_path / "a", 4)
    assert math.isfinite(summary["last_losses"]["loss_image"])
    run(tmp_path / "b", 2)
    assert run(tmp_path / "b", 4, resume=True)["resumed_from"] is not None
    weights = [
        load_file(tmp_path / r / "checkpoints" / "step-00000004" / "training_state" / "model.safetensors") for r in "ab"
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    pipe = MMDiffTextToImagePipeline.from_pretrained(summary["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.interval_conditioning and pipe.transformer.config.timestep_scale == 1.0
    assert pipe.objective_family == "flow"
    assert type(pipe.scheduler).__name__ == "FlowMapEulerDiscreteScheduler"
    out = pipe("a small red circle", output_type="np")  # the folder's default: 2 steps
    assert out.images.shape == (1, 16, 16, 3) and out.num_forward_rows == 2 * 2


# ---------------------------------------------------------------- guidance as a conditioning input


def test_guided_targets_draw_w_per_row_and_mix_in_the_models_unconditional_velocity():
    from mmdiff.diffusion.meanflow import guided_velocity, sample_guidance

    dropped = torch.tensor([True, False] * 500)
    g = torch.Generator().manual_seed(0)
    assert sample_guidance(dropped, MeanFlowSettings(), g) is None  # no range: CFG at sampling time
    w = sample_guidance(dropped, MeanFlowSettings(guidance_range=(1.5, 4.0)), g)
    assert torch.equal(w[dropped], torch.ones(500))  # dropped rows learn the unconditional velocity
    kept = w[~dropped]
    assert kept.min() >= 1.5 and kept.max() <= 4.0 and kept.std() > 0.5  # spread over the range
    v, u_null = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    scales = torch.tensor([1.0, 2.0, 3.0])
    mixed = guided_velocity(v, u_null, scales)
    assert torch.equal(mixed[0], v[0])  # w = 1: the plain velocity
    assert torch.allclose(mixed[2], u_null[2] + 3.0 * (v[2] - u_null[2]))
    with pytest.raises(ValueError, match="guidance_range"):
        MeanFlowSettings(guidance_range=(0.5, 2.0))


def test_the_guidance_input_starts_at_zero_and_then_matters(tokenizer):
    from mmdiff.models.transformer import MMDiffTransformer2DModel

    fresh = MMDiffTransformer2DModel(
        vocab_size=len(tokenizer), hidden_size=32, depth=1, num_heads=2, guidance_embeds=True
    )
    last = fresh.guidance_embedder.mlp[2]
    assert not last.weight.any() and not last.bias.any()
    model = make_model(tokenizer, interval_conditioning=True, guidance_embeds=True, timestep_scale=1.0)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.5])
    with torch.no_grad():
        context, mask = model.null_context("text", 2)
        unguided = model(x, t, context, mask)
        assert torch.equal(model(x, t, context, mask, guidance=1.0), unguided)  # None means w = 1
        at_three = model(x, t, context, mask, guidance=torch.tensor([3.0, 3.0]))
        assert not torch.allclose(at_three, unguided)
        per_row = model(x, t, context, mask, guidance=torch.tensor([1.0, 3.0]))
        assert torch.allclose(per_row[0], unguided[0], atol=1e-6) and torch.allclose(per_row[1], at_three[1], atol=1e-6)


def test_the_guided_training_target_uses_the_models_own_unconditional_prediction(tokenizer, monkeypatch):
    from mmdiff.data.tokenizer import encode_captions

    model = make_model(tokenizer, interval_conditioning=True, guidance_embeds=True, timestep_scale=1.0)
    process = MeanFlowProcess(MeanFlowSettings(equal_fraction=1.0, guidance_range=(2.5, 2.5)))  # r = t, w = 2.5
    seen = {}

    def capture(self, u, order, u_fn, noisy, velocity, t, r):
        seen.update(noisy=noisy, velocity=velocity, t=t)
        return MeanFlowProcess.__dict__["_real_model_loss"](self, u, order, u_fn, noisy, velocity, t, r)

    monkeypatch.setattr(MeanFlowProcess, "_real_model_loss", MeanFlowProcess.model_loss, raising=False)
    monkeypatch.setattr(MeanFlowProcess, "model_loss", capture)
    ids, _ = encode_captions(tokenizer, ["a small red circle", "a large blue square"] * 2, 12)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    weights = LossWeights(text=0.0, image_cond_drop=0.0)
    loss = joint_losses(
        model, latents, ids, tokenizer.pad_token_id, tokenizer.mask_token_id, process, weights, generator=g
    )
    assert math.isfinite(float(loss["loss"].detach()))
    g = torch.Generator().manual_seed(1)  # the same draws again (p = 0 draws no dropout): intervals, then noise
    _, t = sample_intervals(4, process.settings, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(seen["t"], t)
    with torch.no_grad():
        null, null_mask = model.null_context("text", 4)
        u_null = model(seen["noisy"], t, null, null_mask)
    expected = u_null + 2.5 * ((noise - latents) - u_null)
    assert close_at_scale(seen["velocity"], expected)


def test_kappa_mixing_takes_a_share_of_the_guided_target_from_the_models_own_guided_prediction(tokenizer):
    from mmdiff.conditioning.guided import forward_with_dropout
    from mmdiff.data.tokenizer import encode_captions
    from mmdiff.training.losses import guided_target

    model = make_model(tokenizer, interval_conditioning=True, guidance_embeds=True, timestep_scale=1.0)
    ids, _ = encode_captions(tokenizer, ["a small red circle", "a large blue square"] * 2, 12)
    mask = ids != tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)
    noisy, velocity = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.8, 0.6, 0.7])
    r = torch.tensor([0.9, 0.3, 0.6, 0.2])  # rows 1 and 3 train an interval
    dropped = torch.tensor([True, False, False, True])
    w = torch.tensor([1.0, 2.0, 3.0, 1.0])

    def encode(rows):
        return model.encode_text(ids[rows], mask[rows])

    with torch.no_grad():
        prediction, order = forward_with_dropout(model, noisy, t, dropped, encode, r, w)
        plain = guided_target(model, noisy, velocity, t, r, dropped, w, prediction, order, encode)
        mixed = guided_target(model, noisy, velocity, t, r, dropped, w, prediction, order, encode, mix=0.25)
        null, null_mask = model.null_context("text", 1)
        for row in (1, 2):
            u_null = model(noisy[row : row + 1], t[row : row + 1], null, null_mask)[0]
            expected = u_null + w[row] * (velocity[row] - u_null)
            assert close_at_scale(plain[row], expected)
            context, context_mask = encode(torch.tensor([row]))
            u_cond = model(noisy[row : row + 1], t[row : row + 1], context, context_mask, r_timestep=t[row : row + 1],
                           guidance=w[row : row + 1])[0]  # fmt: skip
            if row == 2:  # r = t: the training forward's own output (rows in `order`)
                assert close_at_scale(prediction[(order == row).nonzero()[0, 0]], u_cond)
            assert close_at_scale(mixed[row], 0.75 * expected + 0.25 * u_cond)
    for row in (0, 3):  # dropped rows: the plain velocity
        assert torch.equal(plain[row], velocity[row]) and torch.equal(mixed[row], velocity[row])
    with pytest.raises(ValueError, match="guidance_mix"):
        MeanFlowSettings(guidance_mix=0.5)  # without a guidance range
    with pytest.raises(ValueError, match="guidance_mix"):
        MeanFlowSettings(guidance_range=(1.0, 3.0), guidance_mix=1.0)


@pytest.fixture
def guided_meanflow_pipe(tokenizer, vae):
    model = make_model(tokenizer, interval_conditioning=True, guidance_embeds=True, timestep_scale=1.0)
    process = make_image_process({"prediction_type": "meanflow"})
    pipe = build_pipeline(model.eval(), vae, process.sampling_scheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_flow_map
def test_a_guidance_embedded_model_samples_guided_in_one_forward_per_step_and_sweeps(guided_meanflow_pipe):
    pipe = guided_meanflow_pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a small red circle", "a large blue square"]
    out = pipe(prompts, guidance_scale=3.0, num_inference_steps=2, latents=noise, output_type="latent")
    assert out.num_forward_rows == 2 * 2  # conditional rows only
    assert not pipe.do_classifier_free_guidance
    context, mask = pipe.text_context(*pipe.encode_prompt(prompts)[:2])
    x = noise.clone()
    with torch.no_grad():
        for t, r in ((1.0, 0.5), (0.5, 0.0)):
            x = meanflow_step(x, pipe.transformer(x, t, context, mask, r_timestep=r, guidance=3.0), t, r)
    assert close_at_scale(out.images, x)
    sweep = pipe.guidance_sweep(prompts, [1.0, 3.0], num_inference_steps=2, latents=noise, output_type="latent")
    assert sweep.num_forward_rows == 2 * 2 * 2 and close_at_scale(sweep.images[1], out.images)
    plain = pipe(prompts, guidance_scale=1.0, num_inference_steps=2, latents=noise, output_type="latent").images
    assert close_at_scale(sweep.images[0], plain) and not torch.allclose(plain, out.images)
    for bad in ({"negative_prompt": "a circle"}, {"guidance_interval": (0.2, 0.8)}, {"guidance": "apg"}):
        with pytest.raises(ValueError, match=r"takes the guidance scale as an input .* cannot apply"):
            pipe(prompts, num_inference_steps=1, output_type="latent", **bad)


@needs_flow_map
def test_fine_tune_a_meanflow_model_into_a_guidance_embedded_one_with_init_from(tiny_train_setup, tmp_path):
    from conftest import stage_run_dir, tiny_train_overrides
    from safetensors.torch import load_file

    from mmdiff.config import load_config
    from mmdiff.pipelines import MMDiffTextToImagePipeline
    from mmdiff.training.trainer import train

    meanflow = ["diffusion.prediction_type=meanflow", "sample.num_inference_steps=1"]
    stage_run_dir(tiny_train_setup, tmp_path / "base")
    base = train(load_config(None, tiny_train_overrides(tiny_train_setup, tmp_path / "base", max_steps=2) + meanflow))
    stage_run_dir(tiny_train_setup, tmp_path / "tuned")
    tuned_overrides = tiny_train_overrides(tiny_train_setup, tmp_path / "tuned", max_steps=1, lr=1e-12, warmup_steps=0)
    guided = meanflow + ["diffusion.meanflow_guidance_range=[1.0,4.0]", f"train.init_from={base['pipeline']}"]
    tuned = train(load_config(None, tuned_overrides + guided))
    before = load_file(f"{base['pipeline']}/transformer/diffusion_pytorch_model.safetensors")
    after = load_file(f"{tuned['pipeline']}/transformer/diffusion_pytorch_model.safetensors")
    assert set(after) - set(before) and all(k.startswith("guidance_embedder.") for k in set(after) - set(before))
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # started from the base (lr ~ 0)
    pipe = MMDiffTextToImagePipeline.from_pretrained(tuned["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds
    assert pipe("a small red circle", guidance_scale=3.0, output_type="np").num_forward_rows == 1

    # a source that does not fit the config's model: one error naming the key
    stage_run_dir(tiny_train_setup, tmp_path / "wrong")
    wrong = tiny_train_overrides(tiny_train_setup, tmp_path / "wrong", max_steps=1, **{"model.hidden_size": 64})
    with pytest.raises(ValueError, match=r"train.init_from=.*: \S+ is \(.*\) there and \(.*\) in this config's model"):
        train(load_config(None, wrong + guided))
    with pytest.raises(ValueError, match=r"train.init_from='.*nowhere' has no transformer/"):
        train(load_config(None, wrong + meanflow + [f"train.init_from={tmp_path / 'nowhere'}"]))
    with pytest.raises(ValueError, match="meanflow_guidance_range needs diffusion.prediction_type=meanflow"):
        load_config(None, wrong[:1] + ["diffusion.meanflow_guidance_range=[1.0,3.0]"])
