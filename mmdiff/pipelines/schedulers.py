"""Sampling schedulers by name, and the one place that knows which fit which objective.

Swapped the diffusers way (`Scheduler.from_config(pipe.scheduler.config)`). Gaussian models (epsilon or v) take the
DDPM family; every scheduler there reads `prediction_type` and the beta schedule from the saved config, so it samples
what the model was trained for. "trailing" timestep spacing starts every sampler at the last training timestep
(pure noise), as Lin et al. 2024 recommend; diffusers' default "leading" spacing for DDPM would start a 4-step run at
t = 750 from pure noise, which the model never saw at that level. Flow-matching models take the flow Euler scheduler
or the multistep solvers with flow sigmas (`use_flow_sigmas`, `prediction_type="flow_prediction"`, the saved shift).
A scheduler of one family on a model of the other produces noise: `make_scheduler` and `check_scheduler_fits`
refuse it, naming both.
"""

from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..checks import check_number
from ..diffusion.meanflow import FlowMapEulerDiscreteScheduler

SCHEDULERS = {
    "ddpm": (DDPMScheduler, {"timestep_spacing": "trailing"}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "timestep_spacing": "trailing"}),
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler_a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "unipc": (UniPCMultistepScheduler, {"timestep_spacing": "trailing"}),
}
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", **_FLOW}),
    "unipc": (UniPCMultistepScheduler, _FLOW),
}
if FlowMapEulerDiscreteScheduler is not None:  # diffusers >= 0.39
    # z_t -> z_r along the average velocity of a MeanFlow model (the pipeline passes r, the next step's sigma); on a
    # plain flow model, which ignores r, it is the flow Euler step
    FLOW_SCHEDULERS["flow_map_euler"] = (FlowMapEulerDiscreteScheduler, {})
BY_FAMILY = {"gaussian": SCHEDULERS, "flow": FLOW_SCHEDULERS}
FAMILY_NAMES = {"gaussian": "Gaussian (epsilon / v-prediction)", "flow": "flow-matching"}


def scheduler_family(scheduler: SchedulerMixin) -> str:
    """ "flow" for a flow-matching scheduler (flow Euler, or a solver configured with flow sigmas), else
    "gaussian"."""
    config = scheduler.config
    if (
        isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
        or is_flow_map(scheduler)
        or config.get("prediction_type") == "flow_prediction"
    ):
        return "flow"
    return "gaussian"


def is_flow_map(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler` steps z_t -> z_r with an interval the model is given (diffusers' flow-map Euler)."""
    return FlowMapEulerDiscreteScheduler is not None and isinstance(scheduler, FlowMapEulerDiscreteScheduler)


def _flow_shift(config) -> float:
    return float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)


def make_scheduler(name: str, config, family: str = "gaussian") -> SchedulerMixin:
    """The named scheduler ("ddim", "dpm++", ... or a class name) for a model of `family`, built from a scheduler
    config with this project's settings; a name that does not fit the family is a ValueError naming both."""
    table = BY_FAMILY[family]
    by_class = {cls.__name__.lower(): key for key, (cls, _) in table.items()}
    key = by_class.get(name.lower(), name.lower())
    if key not in table:
        other = next(f for f in BY_FAMILY if f != family)
        if key in BY_FAMILY[other] or name.lower() in {c.__name__.lower() for c, _ in BY_FAMILY[other].values()}:
            raise ValueError(
                f"scheduler {name!r} samples {FAMILY_NAMES[other]} models, but this model is {FAMILY_NAMES[family]}: "
                f"choose one of {sorted(table)}"
            )
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(table)}")
    cls, overrides = table[key]
    if family == "flow":
        shift = _flow_shift(config)
        overrides = {
            **overrides,
            **(
                {"shift": shift}
                if cls in (FlowMatchEulerDiscreteScheduler, FlowMapEulerDiscreteScheduler)
                else {"flow_shift": shift}
            ),
        }
    return cls.from_config(config, **overrides)


def scheduler_names(family: str) -> list[str]:
    return sorted(BY_FAMILY[family])


def check_scheduler_fits(scheduler: SchedulerMixin, family: str) -> None:
    """A ValueError naming both when `scheduler` belongs to the other family than the model's objective."""
    found = scheduler_family(scheduler)
    if found != family:
        raise ValueError(
            f"scheduler {type(scheduler).__name__} samples {FAMILY_NAMES[found]} models, but this model is "
            f"{FAMILY_NAMES[family]}: use one of {scheduler_names(family)} (`swap_scheduler(pipe, name)`)"
        )


def swap_scheduler(pipe, name: str):
    """Replace `pipe.scheduler` with the named scheduler built from the current one's config; returns the pipe."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config, pipe.objective_family)
    return pipe


def check_sigmas(scheduler: SchedulerMixin, sigmas, num_inference_steps: int | None) -> list[float]:
    """Custom `sigmas` for `scheduler.set_timesteps` (as diffusers' pipelines take them; the scheduler applies its
    shift on top and ends the last step at 0) as floats: decreasing numbers in (0, 1], as many as
    `num_inference_steps` when it is given, for a scheduler whose `set_timesteps` takes them; else a ValueError."""
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"{type(scheduler).__name__} takes no custom sigmas: pass num_inference_steps, or use a scheduler "
            "that does (flow_euler, or a few-step model's FlowMapEulerDiscreteScheduler)"
        )
    if isinstance(sigmas, str) or not isinstance(sigmas, list | tuple) or not sigmas:
        raise ValueError(f"sigmas must be a non-empty list of noise levels, e.g. [1.0, 0.6], got {sigmas!r}")
    values = [check_number("sigmas", s, 0.0) for s in sigmas]
    if not all(0.0 < s <= 1.0 for s in values) or any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"sigmas must decrease strictly within (0, 1], got {list(sigmas)}")
    if num_inference_steps is not None and num_inference_steps != len(values):
        raise ValueError(f"sigmas has {len(values)} entries for num_inference_steps={num_inference_steps}")
    return values
