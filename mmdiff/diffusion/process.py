"""The image direction's noise process as one object: training inputs, loss, and the sampling scheduler that fits.

`make_image_process(diffusion_config)` reads `diffusion.prediction_type`: "epsilon" / "v_prediction" give the
Gaussian (DDPM-family) process on a diffusers `DDPMScheduler`, "flow" gives flow matching (`flow.py`), "meanflow"
the few-step MeanFlow objective on flow matching's path (`meanflow.py`). Training
(`training/losses.py`) and the trainer's saved pipeline use only this interface, so a new objective is one class here.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .flow import (
    NUM_TRAIN_TIMESTEPS,
    FlowSettings,
    flow_interpolate,
    flow_loss,
    flow_target,
    make_flow_scheduler,
    sample_flow_sigmas,
)
from .gaussian import (
    PREDICTION_TYPES,
    image_loss,
    make_noise_scheduler,
    noise_latents,
    sample_timesteps,
    timestep_to_t,
)
from .meanflow import (
    MeanFlowSettings,
    meanflow_loss,
    meanflow_target,
    require_flow_map_scheduler,
    sample_guidance,
    sample_intervals,
)

# every value of `diffusion.prediction_type`: the Gaussian ones and flow matching
OBJECTIVES = (*PREDICTION_TYPES, "flow", "meanflow")


def objective_family(prediction_type: str) -> str:
    """ "flow" for flow matching and MeanFlow (its model at r = t is a flow model: the flow schedulers fit it),
    "gaussian" for epsilon / v prediction."""
    return "flow" if prediction_type in ("flow", "flow_prediction", "meanflow") else "gaussian"


class GaussianProcess:
    """DDPM-family training (epsilon or v targets from diffusers' `DDPMScheduler`), sampled with DDIM by default."""

    family = "gaussian"

    def __init__(self, noise_scheduler):
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def training_inputs(
        self, latents: torch.Tensor, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(noisy latents, regression target, model time t in [0, 1], what the loss needs besides)."""
        n, device = latents.shape[0], latents.device
        timesteps = sample_timesteps(n, self.num_train_timesteps, device, generator)
        noise = torch.randn(latents.shape, device=device, generator=generator, dtype=latents.dtype)
        noisy, target = noise_latents(self.noise_scheduler, latents, noise, timesteps)
        return noisy, target, timestep_to_t(timesteps, self.num_train_timesteps).to(device), None

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, extra: Any, order: torch.Tensor | None = None):
        return image_loss(prediction, target if order is None else target[order])

    def sampling_scheduler(self) -> SchedulerMixin:
        return DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing="trailing")


class FlowProcess:
    """Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, velocity target, sampled with the flow Euler scheduler."""

    family = "flow"

    def __init__(self, settings: FlowSettings):
        self.settings = settings

    def training_inputs(
        self, latents: torch.Tensor, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        sigmas = sample_flow_sigmas(latents.shape[0], self.settings, latents.device, generator)
        noise = torch.randn(latents.shape, device=latents.device, generator=generator, dtype=latents.dtype)
        return flow_interpolate(latents, noise, sigmas), flow_target(latents, noise), sigmas, sigmas

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, extra: Any, order: torch.Tensor | None = None):
        sigmas = extra
        if order is not None:
            target, sigmas = target[order], sigmas[order]
        return flow_loss(prediction, target, sigmas, self.settings.loss_weighting)

    def sampling_scheduler(self) -> SchedulerMixin:
        return make_flow_scheduler(self.settings.shift)


class MeanFlowProcess:
    """MeanFlow on flow matching's path: the model, conditioned on an interval [r, t], learns the average velocity
    (`meanflow.py`); sampled in one or a few steps with diffusers' `FlowMapEulerDiscreteScheduler`, and, at r = t,
    by any flow scheduler. `interval = True` tells the training loss to give the model r and its own target."""

    family = "flow"
    interval = True

    def __init__(self, settings: MeanFlowSettings, shift: float = 1.0):
        self.settings, self.shift = settings, shift

    def training_inputs(
        self, latents: torch.Tensor, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(z_t, the velocity eps - x0, t, r): the target is made from the model itself (`model_loss`)."""
        r, t = sample_intervals(latents.shape[0], self.settings, latents.device, generator)
        noise = torch.randn(latents.shape, device=latents.device, generator=generator, dtype=latents.dtype)
        return flow_interpolate(latents, noise, t), flow_target(latents, noise), t, r

    def training_guidance(self, dropped: torch.Tensor, generator=None) -> torch.Tensor | None:
        """Per-row guidance scales for a guidance-conditioned model (`MeanFlowSettings.guidance_range`), else None."""
        return sample_guidance(dropped, self.settings, generator)

    def model_loss(self, u, order, u_fn, noisy, velocity, t, r) -> torch.Tensor:
        """The MeanFlow loss of the model's average velocity `u` (rows in `order`), its target from `u_fn`."""
        target = meanflow_target(u_fn, noisy, velocity, r, t, u, self.settings.fd_step, order)
        return meanflow_loss(u, target, self.settings)

    def sampling_scheduler(self) -> SchedulerMixin:
        return require_flow_map_scheduler()(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=self.shift)


def make_image_process(diffusion) -> GaussianProcess | FlowProcess | MeanFlowProcess:
    """The process a `diffusion:` config section (the dataclass or a mapping) describes."""
    get = diffusion.get if isinstance(diffusion, dict) else lambda key, default=None: getattr(diffusion, key, default)
    prediction_type = get("prediction_type", "epsilon")
    if prediction_type == "meanflow":
        require_flow_map_scheduler()  # before training, not when the finished model is saved
        return MeanFlowProcess(
            MeanFlowSettings(
                logit_mean=get("meanflow_logit_mean", -0.4),
                logit_std=get("meanflow_logit_std", 1.0),
                equal_fraction=get("meanflow_equal_fraction", 0.75),
                fd_step=get("meanflow_fd_step", 5e-3),
                guidance_range=tuple(get("meanflow_guidance_range")) if get("meanflow_guidance_range") else None,
                guidance_mix=get("meanflow_guidance_mix", 0.0),
            ),
            shift=get("flow_shift", 1.0),
        )
    if prediction_type == "flow":
        return FlowProcess(
            FlowSettings(
                timestep_sampling=get("flow_timestep_sampling", "logit_normal"),
                logit_mean=get("flow_logit_mean", 0.0),
                logit_std=get("flow_logit_std", 1.0),
                mode_scale=get("flow_mode_scale", 1.29),
                shift=get("flow_shift", 1.0),
                loss_weighting=get("flow_loss_weighting", "none"),
            )
        )
    return GaussianProcess(
        make_noise_scheduler(
            {
                "num_train_timesteps": get("num_train_timesteps", 1000),
                "beta_schedule": get("beta_schedule", "squaredcos_cap_v2"),
                "prediction_type": prediction_type,
                "clip_sample": False,
            }
        )
    )
