"""Flow matching (rectified flow) on VAE latents, the objective of SD3, FLUX and Sana.

x_sigma = (1 - sigma) x0 + sigma eps for sigma in [0, 1]; the model predicts the velocity v = eps - x0 and sees
t = sigma. Training draws sigma uniformly, logit-normally (SD3's default) or by SD3's mode sampling (diffusers'
`compute_density_for_timestep_sampling`), then applies the resolution shift sigma' = s sigma / (1 + (s - 1) sigma)
that `FlowMatchEulerDiscreteScheduler` applies when sampling (`shift`, saved with the pipeline's scheduler); the loss
weighting is diffusers' `compute_loss_weighting_for_sd3` ("none", "sigma_sqrt", "cosmap"). Sampling: the flow Euler
scheduler, or DPM-Solver++ / UniPC with flow sigmas (`use_flow_sigmas`, `prediction_type="flow_prediction"`), all with
timesteps = 1000 sigma, so t = timestep / 1000 = sigma as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

FLOW_TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
FLOW_LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000  # the schedulers' timestep scale: t = timestep / 1000 = sigma


@dataclass
class FlowSettings:
    """How training draws sigma and weights the loss (the `diffusion.flow_*` config keys)."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    loss_weighting: str = "none"

    def __post_init__(self) -> None:
        if self.timestep_sampling not in FLOW_TIMESTEP_SAMPLING:
            raise ValueError(
                f"flow timestep_sampling must be one of {FLOW_TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}"
            )
        if self.loss_weighting not in FLOW_LOSS_WEIGHTING:
            raise ValueError(f"flow loss_weighting must be one of {FLOW_LOSS_WEIGHTING}, got {self.loss_weighting!r}")
        if not self.shift > 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of SD3 (and of `FlowMatchEulerDiscreteScheduler(shift=...)`): more time at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_flow_sigmas(
    batch_size: int, settings: FlowSettings, device: torch.device | str = "cpu", generator=None
) -> torch.Tensor:
    """Training noise levels sigma, (N,) float32 in [0, 1]."""
    scheme = "none" if settings.timestep_sampling == "uniform" else settings.timestep_sampling
    u = compute_density_for_timestep_sampling(
        scheme,
        batch_size,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        device=device,
        generator=generator,
    )
    return shift_sigmas(u.float().clamp(0.0, 1.0), settings.shift)


def flow_interpolate(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps; sigmas (N,) broadcast over the latent dims."""
    s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model regresses: eps - x0."""
    return noise - latents


def flow_loss(prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weighted MSE (`compute_loss_weighting_for_sd3`), averaged over samples; "none" is the plain MSE."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    weights = compute_loss_weighting_for_sd3(weighting, sigmas.float()).reshape(-1).to(per_sample.device)
    return (weights * per_sample).mean()


def make_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The sampling scheduler saved with a flow model's pipeline (its shift recorded in its config)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
