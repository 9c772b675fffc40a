"""Classifier-free guidance: the one combination rule used by both directions (DESIGN.md, decision 6)."""

from __future__ import annotations

import torch


def classifier_free_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """guided = uncond + w * (cond - uncond); w = 1 returns `cond` exactly (no guidance).

    Args:
        cond, uncond: predictions of the same shape, (N, ...): eps / v for images, logits for text.
        guidance_scale: w.
        guidance_rescale: phi in [0, 1] of Lin et al. 2024 ("Common diffusion noise schedules are flawed", sec. 3.4):
            rescale the guided prediction to the conditional one's per-sample std, then mix by phi. Counters the
            over-exposure that large w gives; meaningful for Gaussian predictions, not logits.
    """
    if guidance_scale == 1.0:
        guided = cond  # exact, not cond + 0 * (...) which can differ in the last bit
    else:
        guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        dims = tuple(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        rescaled = guided * (std_cond / std_guided.clamp_min(1e-12))
        guided = guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided
    return guided


def guidance_active(t: float, guidance_scale: float, guidance_interval: tuple[float, float] | None = None) -> bool:
    """Whether the unconditional pass is needed at noise level t in [0, 1].

    Outside `guidance_interval` = (t_low, t_high) (Kynkäänniemi et al. 2024, "Applying guidance in a limited
    interval") and whenever w = 1, only the conditional pass runs.
    """
    if guidance_scale == 1.0:
        return False
    if guidance_interval is None:
        return True
    low, high = guidance_interval
    return low <= t <= high
