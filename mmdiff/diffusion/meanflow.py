"""MeanFlow: one model of the average velocity over an interval, sampled in 1, 2, 4 or many steps, trained from
scratch without a teacher (Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

On the flow-matching path z_t = (1 - t) x0 + t eps (t = sigma in [0, 1], instantaneous velocity v = eps - x0) the
average velocity over [r, t] is u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds, so the one step
z_r = z_t - (t - r) u(z_t, r, t) is exact, and u(z_t, t, t) = v is flow matching's velocity. Differentiating
(t - r) u = integral_r^t v ds in t gives the MeanFlow identity

    u(z_t, r, t) = v - (t - r) du/dt,    du/dt = v . d_z u + d_t u    (the total derivative along the path),

and the model regresses its right-hand side with the gradient stopped, from data alone.

The total derivative is a Jacobian-vector product in the paper (`torch.func.jvp`). Forward-mode AD has no formula
for the fused attention kernels (on the CPU, `torch.func.jvp` through `scaled_dot_product_attention` raises
NotImplementedError for `_scaled_dot_product_flash_attention_for_cpu` in torch 2.14; the CUDA flash and
memory-efficient kernels are the same), so a JVP would force the slow math attention. Here it is a finite
difference along the path instead: (u(z_t + d v, r, t + d) - u(z_t, r, t)) / d, one extra forward without gradient
that reuses the training forward's output, with d = `fd_step` (backwards, d < 0, where t + d would pass 1). Its
error is O(d) and is multiplied by (t - r); at d = 5e-3 it is far below the loss's noise.

(r, t) are drawn as in the paper's best setting: two logit-normal draws (mean -0.4, std 1), sorted so that r <= t,
and r set to t in a fraction (`equal_fraction`, the paper's 75 %) of the rows, which are plain flow matching. The
loss is the paper's adaptive weighting, sg(w) * ||u - u_tgt||^2 with w = 1 / (||u - u_tgt||^2 + c)^p (p = 1, c =
1e-3), which makes the squared error behave like a robust one; the value it reports is the plain MSE.

Guidance. CFG applied at sampling time to an average velocity extrapolates a whole interval at once: on the shapes
benchmark one guided step at w = 3 lands far off the data (docs/results/meanflow.md has the figures). The paper
instead trains on the guided field: the instantaneous velocity in the identity becomes
v_w = u(z_t, t, t | null) + w (v - u(z_t, t, t | null)), the unconditional term from the model itself without
gradient, so the model's average velocity is the guided one and one forward per step samples with guidance. With
`guidance_range` set, w is drawn per row from that range and given to the model as a conditioning input
(`guidance_embeds`), as improved MeanFlow (arXiv 2512.02012) does, so the scale can still be swept at sampling time;
rows whose condition is dropped train at w = 1 on the plain velocity.

The guided target's noise grows with w: v is one sample of the velocity, so v_w carries w times its variance. The
paper's kappa-mixing (`guidance_mix`, kappa in [0, 1)) replaces a fraction kappa of v_w by the model's own guided
conditional prediction u(z_t, t, t | c, w) without gradient: target velocity (1 - kappa) v_w + kappa u_c. At the fixed
point u_c is the guided field itself, so the field learned is unchanged and the sample noise in the target shrinks by
(1 - kappa); the conditional rows with r = t reuse the training forward's output for u_c, the others take one more
forward without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch

try:  # diffusers >= 0.39; older releases train and load the rest of mmdiff, but not MeanFlow models
    from diffusers import FlowMapEulerDiscreteScheduler
except ImportError:
    FlowMapEulerDiscreteScheduler = None


def require_flow_map_scheduler() -> type:
    """diffusers' `FlowMapEulerDiscreteScheduler`, or a ValueError saying which diffusers release has it."""
    if FlowMapEulerDiscreteScheduler is None:
        raise ValueError(
            "MeanFlow models sample with diffusers' FlowMapEulerDiscreteScheduler, which diffusers 0.39 added (this "
            f"is {diffusers.__version__}): pip install 'diffusers>=0.39'"
        )
    return FlowMapEulerDiscreteScheduler


@dataclass(frozen=True)
class MeanFlowSettings:
    """How training draws (r, t), differentiates along the path and weights the loss (`diffusion.meanflow_*`)."""

    logit_mean: float = -0.4
    logit_std: float = 1.0
    equal_fraction: float = 0.75  # rows with r = t: flow matching
    fd_step: float = 5e-3
    adaptive_power: float = 1.0
    adaptive_eps: float = 1e-3
    guidance_range: tuple[float, float] | None = None  # (w_min, w_max): guided targets, w a conditioning input
    guidance_mix: float = 0.0  # kappa: the share of the guided target taken from the model's own prediction

    def __post_init__(self) -> None:
        if not 0.0 <= self.equal_fraction <= 1.0:
            raise ValueError(f"meanflow equal_fraction must lie in [0, 1], got {self.equal_fraction}")
        if not 0.0 < self.fd_step < 0.5:
            raise ValueError(f"meanflow fd_step must lie in (0, 0.5), got {self.fd_step}")
        if not self.logit_std > 0:
            raise ValueError(f"meanflow logit_std must be > 0, got {self.logit_std}")
        if self.adaptive_power < 0 or not self.adaptive_eps > 0:
            raise ValueError("meanflow adaptive_power must be >= 0 and adaptive_eps > 0")
        if not 0.0 <= self.guidance_mix < 1.0:
            raise ValueError(f"meanflow guidance_mix must lie in [0, 1), got {self.guidance_mix}")
        if self.guidance_mix and self.guidance_range is None:
            raise ValueError("meanflow guidance_mix mixes guided targets: it needs guidance_range")
        if self.guidance_range is not None:
            low, high = self.guidance_range
            if not 1.0 <= low <= high:
                raise ValueError(
                    f"meanflow guidance_range must be [w_min, w_max] with 1 <= w_min <= w_max, got {[low, high]}"
                )


def sample_guidance(dropped: torch.Tensor, settings: MeanFlowSettings, generator=None) -> torch.Tensor | None:
    """(N,) float32 guidance scales drawn uniformly from `settings.guidance_range`, 1 on the rows whose condition is
    dropped (they learn the unconditional velocity); None without a range."""
    if settings.guidance_range is None:
        return None
    low, high = settings.guidance_range
    w = low + (high - low) * torch.rand(dropped.shape[0], device=dropped.device, generator=generator)
    return torch.where(dropped, torch.ones_like(w), w)


def guided_velocity(velocity: torch.Tensor, unconditional: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """v_w = u_null + w (v - u_null) per row, the guided instantaneous velocity that MeanFlow's identity then
    averages, written v + (w - 1)(v - u_null) so that w = 1 gives v exactly. `unconditional`: the model's r = t
    prediction on the null context."""
    v = velocity.float()
    return (v + _bcast(guidance - 1.0, v) * (v - unconditional.detach().float())).to(velocity.dtype)


def sample_intervals(
    batch_size: int, settings: MeanFlowSettings, device: torch.device | str = "cpu", generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t), each (N,) float32 with 0 <= r <= t <= 1; a fraction `equal_fraction` of the rows has r = t."""
    draws = torch.randn(2, batch_size, device=device, generator=generator) * settings.logit_std + settings.logit_mean
    draws = torch.sigmoid(draws)
    r, t = draws.min(0).values, draws.max(0).values
    equal = torch.rand(batch_size, device=device, generator=generator) < settings.equal_fraction
    return torch.where(equal, t, r), t


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def meanflow_target(
    u_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    z_t: torch.Tensor,
    velocity: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    fd_step: float,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """The regression target v - (t - r) du/dt, without gradient, du/dt by a finite difference along the path.

    `u_fn(z, r, t)` is the model's average velocity (called once, under no_grad); `u` is its output at (z_t, r, t)
    from the training forward (detached here). When the model's rows come back in another order (a training
    forward with condition dropout puts the dropped rows first), `order` is that order: `u` and `u_fn`'s output
    are in it, the inputs are not. Rows with r = t need no derivative and get v exactly.
    """
    with torch.no_grad():
        step = torch.where(t + fd_step <= 1.0, torch.full_like(t, fd_step), torch.full_like(t, -fd_step))
        shifted = u_fn(z_t + _bcast(step, z_t) * velocity, r, t + step)
        if order is not None:
            velocity, r, t, step = velocity[order], r[order], t[order], step[order]
        du_dt = (shifted.float() - u.detach().float()) / _bcast(step, shifted).float()
        return velocity.float() - _bcast(t - r, du_dt).float() * du_dt


def meanflow_loss(u: torch.Tensor, target: torch.Tensor, settings: MeanFlowSettings) -> torch.Tensor:
    """The adaptively weighted squared error, averaged over rows (module docstring), whose value is the plain mean
    squared error: the weighted loss of every row is close to 1 whatever the model does (e / (e + c)), which says
    nothing in a training log, so the value shown is the MSE and the gradient is the weighted loss's."""
    per_row = (u.float() - target.float()).pow(2).flatten(1).mean(1)
    weights = 1.0 / (per_row.detach() + settings.adaptive_eps).pow(settings.adaptive_power)
    weighted = (weights * per_row).mean()
    return weighted - weighted.detach() + per_row.detach().mean()


def meanflow_step(z_t: torch.Tensor, u: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """z_r = z_t - (t - r) u: one step over [r, t] (t, r: floats or (N,) tensors)."""
    h = torch.as_tensor(t, dtype=torch.float32, device=z_t.device) - torch.as_tensor(
        r, dtype=torch.float32, device=z_t.device
    )
    if h.ndim:
        h = _bcast(h, z_t)
    return (z_t.float() - h * u.float()).to(z_t.dtype)
