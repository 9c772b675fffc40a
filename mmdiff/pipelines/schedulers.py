"""Sampling schedulers by name, swapped the diffusers way: `Scheduler.from_config(pipe.scheduler.config)`.

Every scheduler here reads `prediction_type` (epsilon or v_prediction) and the beta schedule from the saved config,
so it samples what the model was trained for. "trailing" timestep spacing starts every sampler at the last training
timestep (pure noise), as Lin et al. 2024 recommend; diffusers' default "leading" spacing for DDPM would start a
4-step run at t = 750 from pure noise, which the model never saw at that level.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS = {
    "ddpm": (DDPMScheduler, {"timestep_spacing": "trailing"}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "timestep_spacing": "trailing"}),
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler_a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "unipc": (UniPCMultistepScheduler, {"timestep_spacing": "trailing"}),
}


def make_scheduler(name: str, config) -> SchedulerMixin:
    """The named scheduler ("ddim", "dpm++", ... or a class name such as "DPMSolverMultistepScheduler") from a
    scheduler config, with this project's timestep spacing."""
    by_class = {cls.__name__.lower(): key for key, (cls, _) in SCHEDULERS.items()}
    key = by_class.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[key]
    return cls.from_config(config, **overrides)


def swap_scheduler(pipe, name: str):
    """Replace `pipe.scheduler` with the named scheduler built from the current one's config; returns the pipe."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe
