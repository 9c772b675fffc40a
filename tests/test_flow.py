"""Flow matching for the image direction: interpolation, loss, training, sampling with the flow schedulers, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import close_at_scale, make_model

from mmdiff.diffusion.flow import FlowSettings, flow_interpolate, flow_loss, flow_target, sample_flow_sigmas
from mmdiff.diffusion.process import FlowProcess, make_image_process
from mmdiff.pipelines import MMDiffTextToImagePipeline, swap_scheduler
from mmdiff.pipelines.schedulers import FLOW_SCHEDULERS, scheduler_family
from mmdiff.training.losses import LossWeights, joint_losses
from mmdiff.training.stages import build_pipeline


def test_interpolation_ends_and_velocity():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(flow_interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow_interpolate(x0, noise, torch.ones(3)), noise)
    half = flow_interpolate(x0, noise, torch.full((3,), 0.5))
    assert torch.allclose(half, 0.5 * (x0 + noise))
    assert torch.equal(flow_target(x0, noise), noise - x0)  # d x_sigma / d sigma


def test_loss_against_a_hand_computation():
    pred, target = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    sigmas = torch.tensor([0.25, 0.75])
    per_sample = [((pred[i] - target[i]) ** 2).mean().item() for i in range(2)]
    assert flow_loss(pred, target, sigmas, "none").item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    # cosmap: 2 / (pi (1 - 2 s + 2 s^2)), SD3's weighting
    weights = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.25, 0.75)]
    expected = sum(w * p for w, p in zip(weights, per_sample, strict=True)) / 2
    assert flow_loss(pred, target, sigmas, "cosmap").item() == pytest.approx(expected, rel=1e-5)


def test_sigma_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    for sampling in ("uniform", "logit_normal", "mode"):
        s = sample_flow_sigmas(4000, FlowSettings(timestep_sampling=sampling), generator=g)
        assert s.shape == (4000,) and (s >= 0).all() and (s <= 1).all()
    plain = sample_flow_sigmas(
        4000, FlowSettings(timestep_sampling="uniform"), generator=torch.Generator().manual_seed(1)
    )
    shifted = sample_flow_sigmas(
        4000, FlowSettings(timestep_sampling="uniform", shift=3.0), generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))  # more time at high noise
    assert shifted.mean() > plain.mean() + 0.1
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        FlowSettings(timestep_sampling="cubic")


def test_a_few_steps_lower_the_flow_loss_on_a_fixed_batch(tokenizer):
    from mmdiff.data.tokenizer import encode_captions

    model = make_model(tokenizer)
    process = FlowProcess(FlowSettings(timestep_sampling="uniform"))
    ids, _ = encode_captions(tokenizer, ["a small red circle", "there is a small green triangle"] * 4, 12)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    weights = LossWeights(text=0.0)

    def loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(1)  # the same noise, sigmas and dropout every time
        return joint_losses(
            model, latents, ids, tokenizer.pad_token_id, tokenizer.mask_token_id, process, weights, generator=g
        )["loss_image"]

    first = float(loss())
    for _ in range(25):
        optimizer.zero_grad()
        joint_losses(
            model, latents, ids, tokenizer.pad_token_id, tokenizer.mask_token_id, process, weights,
            generator=torch.Generator().manual_seed(1),
        )["loss"].backward()  # fmt: skip
        optimizer.step()
    assert float(loss()) < 0.8 * first


@pytest.fixture
def flow_pipe(tokenizer, vae):
    model = make_model(tokenizer)
    with torch.no_grad():  # move off adaLN-Zero's zero init: a real velocity field
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    process = make_image_process({"prediction_type": "flow", "flow_shift": 2.0})
    pipe = build_pipeline(model.eval(), vae, process.sampling_scheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_w1_equals_the_conditional_velocity_with_the_flow_euler_scheduler(flow_pipe):
    pipe = flow_pipe
    assert pipe.objective_family == "flow" and pipe.scheduler.config.shift == 2.0
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a small red circle", "a large blue square"]
    out = pipe(prompts, guidance_scale=1.0, num_inference_steps=4, latents=noise, output_type="latent").images
    # by hand: Euler on the conditional velocity at t = sigma
    context, mask = pipe.text_context(*pipe.encode_prompt(prompts)[:2])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    x = noise.clone()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            v = pipe.transformer(x, timestep / 1000, context, mask)
            x = scheduler.step(v, timestep, x).prev_sample
    assert close_at_scale(out, x)


def test_every_flow_scheduler_runs_and_gaussian_ones_are_refused(flow_pipe, tmp_path):
    pipe = flow_pipe
    for name in sorted(FLOW_SCHEDULERS):
        swap_scheduler(pipe, name)
        assert scheduler_family(pipe.scheduler) == "flow"
        images = pipe("a small red circle", num_inference_steps=4, output_type="np").images
        assert images.shape == (1, 16, 16, 3) and (images >= 0).all() and (images <= 1).all()
    with pytest.raises(ValueError, match="'ddim' samples Gaussian .* this model is flow-matching"):
        swap_scheduler(pipe, "ddim")
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler()  # set by hand: refused when sampling, naming both
    with pytest.raises(ValueError, match="DDIMScheduler samples Gaussian .* flow-matching: use one of"):
        pipe("a small red circle", num_inference_steps=2)


def test_save_load_identical(flow_pipe, tmp_path):
    import yaml

    flow_pipe.save_pretrained(tmp_path / "flow")
    (tmp_path / "flow" / "mmdiff_config.yaml").write_text(yaml.safe_dump({"diffusion": {"prediction_type": "flow"}}))
    loaded = MMDiffTextToImagePipeline.from_pretrained(tmp_path / "flow")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.objective_family == "flow" and type(loaded.scheduler) is type(flow_pipe.scheduler)
    assert loaded.scheduler.config.shift == 2.0
    kwargs = dict(num_inference_steps=3, output_type="latent", guidance_scale=2.0)
    a = flow_pipe("a small red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded("a small red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)


def test_train_a_flow_model_end_to_end(tiny_train_setup, tmp_path):
    from conftest import stage_run_dir, tiny_train_overrides

    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    stage_run_dir(tiny_train_setup, tmp_path / "run")
    overrides = tiny_train_overrides(tiny_train_setup, tmp_path / "run", max_steps=3, checkpoint_every=10)
    overrides += ["diffusion.prediction_type=flow", "diffusion.flow_shift=1.5", "diffusion.flow_loss_weighting=cosmap"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 3 and math.isfinite(summary["last_losses"]["loss_image"])
    pipe = MMDiffTextToImagePipeline.from_pretrained(summary["pipeline"])
    assert pipe.objective_family == "flow" and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 1.5
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a small red circle", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_flow_training_resumes_exactly(tiny_train_setup, tmp_path):
    # 2 steps, then --resume to 4, ends with the weights of 4 straight steps (constant rate: the schedule does not
    # depend on max_steps), as for the Gaussian objective in test_resume.py
    from conftest import stage_run_dir, tiny_train_overrides
    from safetensors.torch import load_file

    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    flow = ["diffusion.prediction_type=flow", "train.lr_schedule=constant"]

    def run(folder, steps: int, resume: bool = False):
        overrides = tiny_train_overrides(tiny_train_setup, folder, max_steps=steps, checkpoint_every=2, warmup_steps=1)
        return train(load_config(None, overrides + flow), resume=resume)

    stage_run_dir(tiny_train_setup, tmp_path / "a")
    stage_run_dir(tiny_train_setup, tmp_path / "b")
    run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    assert run(tmp_path / "b", 4, resume=True)["resumed_from"] is not None
    weights = [
        load_file(tmp_path / r / "checkpoints" / "step-00000004" / "training_state" / "model.safetensors") for r in "ab"
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
