"""Classifier-free guidance: the one combination rule used by both directions (docs/architecture.md, decision 6)."""

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


# Guidance methods beyond CFG: diffusers' guiders, whose default formulation shares this project's convention
# (uncond + w (cond - uncond) at heart; w = 1 returns the conditional prediction, diffusers skips guidance there).
# Each entry: the guider class (None: `classifier_free_guidance` here) and this project's defaults for its arguments
# (a caller's `params` override them). Which methods do not apply to the text direction's logits: NOT_ON_LOGITS.
GUIDANCE_METHODS = {
    "cfg": (None, {}),
    # diffusers' eta = 1 keeps the update's component parallel to the conditional prediction, which makes APG equal
    # CFG until its norm cap (measured on the shipped model, docs/results/guidance-methods.md); 0 drops it
    "apg": ("AdaptiveProjectedGuidance", {"eta": 0.0}),
    "cfg_zero_star": ("ClassifierFreeZeroStarGuidance", {}),
    "tcfg": ("TangentialClassifierFreeGuidance", {}),
    # the unconditional branch is a weaker model's conditional prediction (Karras et al. 2024); CFG's rule combines
    "autoguidance": (None, {}),
}
NOT_ON_LOGITS = {
    "cfg_zero_star": "its zero-init steps set the prediction to 0, which for logits is the uniform distribution, not "
    "'no update'"
}


class Guidance:
    """One guidance method at one scale for one sampling call; holds the method's state (step, momentum).

    `guided = guidance(cond, uncond, step)`; `params` are the diffusers guider's own arguments over the defaults in
    GUIDANCE_METHODS (for "apg": adaptive_projected_guidance_momentum, adaptive_projected_guidance_rescale, eta; for
    "cfg_zero_star": zero_init_steps). "cfg" and "autoguidance" use `classifier_free_guidance` (with `guidance_rescale`).
    """

    def __init__(
        self,
        method: str,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        num_inference_steps: int | None = None,
        modality: str = "image",
        **params,
    ):
        if method not in GUIDANCE_METHODS:
            raise ValueError(f"guidance must be one of {tuple(GUIDANCE_METHODS)}, got {method!r}")
        if modality == "text" and method in NOT_ON_LOGITS:
            raise ValueError(f"guidance={method!r} does not apply to captions: {NOT_ON_LOGITS[method]}")
        self.method, self.scale, self.rescale = method, float(guidance_scale), guidance_rescale
        self.num_inference_steps = num_inference_steps or 1000
        self.guider = None
        class_name, defaults = GUIDANCE_METHODS[method]
        params = {**defaults, **params}
        if class_name is not None:
            import diffusers.guiders as guiders
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "guiders are experimental", once per sampling call otherwise
            try:
                self.guider = getattr(guiders, class_name)(
                    guidance_scale=self.scale, guidance_rescale=guidance_rescale, **params
                )
            except TypeError as err:
                raise ValueError(f"guidance={method!r}: {err}") from None
            finally:
                diffusers_logging.set_verbosity(level)
            momentum = params.get("adaptive_projected_guidance_momentum")
            if momentum is not None:  # diffusers starts APG's momentum buffer in prepare_inputs, which is not used
                from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

                self.guider.momentum_buffer = MomentumBuffer(momentum)
        elif params:
            raise ValueError(f"guidance={method!r} takes no parameters, got {sorted(params)}")

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, step: int = 0) -> torch.Tensor:
        if self.guider is None:
            return classifier_free_guidance(cond, uncond, self.scale, self.rescale)
        if self.scale == 1.0:
            return cond  # the convention, exactly
        self.guider.set_state(step, self.num_inference_steps, None)
        return self.guider.forward(cond, uncond).pred
