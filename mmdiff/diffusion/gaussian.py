"""Gaussian diffusion on VAE latents, driven by a diffusers scheduler (docs/architecture.md, decision 4).

Training noise and targets come from `DDPMScheduler` (`add_noise`, `get_velocity`); sampling uses any compatible
diffusers scheduler built from the same config. The model sees t = timestep / num_train_timesteps in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_noise_scheduler(config: dict[str, Any] | None = None) -> DDPMScheduler:
    """The training scheduler; its config is saved with the pipeline and seeds every sampling scheduler."""
    config = dict(config or {})
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
    return DDPMScheduler(**config)


def timestep_to_t(timesteps: torch.Tensor | float, num_train_timesteps: int) -> torch.Tensor:
    """Scheduler timesteps (integer or float, as samplers use) -> the model's noise level t in [0, 1]."""
    return torch.as_tensor(timesteps, dtype=torch.float32) / num_train_timesteps


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, device: torch.device | str = "cpu", generator=None
) -> torch.Tensor:
    """Uniform training timesteps, (N,) long."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def noise_latents(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process q(z_t | z_0) and the regression target for the scheduler's prediction type.

    latents, noise: (N, C, H, W); timesteps: (N,) long. Returns (z_t, target).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, target


def image_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all latent elements (the simple DDPM loss)."""
    return F.mse_loss(prediction.float(), target.float())
