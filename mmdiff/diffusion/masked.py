"""Masked (absorbing-state) diffusion on caption tokens: MDLM training and iterative-unmasking sampling.

Forward process: every token is replaced by the mask token independently with probability t (linear schedule,
alpha_t = 1 - t). The continuous-time ELBO is the cross-entropy on masked positions weighted by 1/t (Sahoo et al.
2024, "Simple and Effective Masked Diffusion Language Models"). Pad positions are ordinary targets, so the model learns
where a caption ends (as LLaDA does). Sampling starts from all masks and unmasks over K steps (DESIGN.md, decision 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

REMASKING = ("low_confidence", "random")


def sample_mask_levels(batch_size: int, eps: float = 1e-3, device="cpu", generator=None) -> torch.Tensor:
    """Stratified t in [eps, 1], (N,): one uniform offset shared by evenly spaced strata lowers the ELBO's variance."""
    u = torch.rand((), device=device, generator=generator)
    t = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return eps + (1.0 - eps) * t


def mask_tokens(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(y_t | y_0): mask each token independently with probability t.

    Args:
        input_ids: (N, L) clean ids. t: (N,) mask probabilities. fixed: (N, L) bool, positions never masked.
    Returns:
        noisy ids (N, L) and the bool mask of masked positions (N, L).
    """
    u = _uniform(input_ids.shape, generator, input_ids.device)
    is_masked = u < t[:, None]
    if fixed is not None:
        is_masked &= ~fixed
    return torch.where(is_masked, torch.full_like(input_ids, mask_token_id), input_ids), is_masked


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """float64 uniforms drawn on the generator's own device (a CPU generator stays valid for CUDA samples)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def suppress_mask_logit(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The model never predicts the mask token as a clean token (MDLM's SUBS parameterisation)."""
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    return logits


def mdlm_loss(logits: torch.Tensor, targets: torch.Tensor, is_masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MDLM negative ELBO per token: sum over masked positions of CE / t, divided by the number of tokens N*L.

    logits: (N, L, V) with the mask logit already suppressed; targets: (N, L); is_masked: (N, L) bool; t: (N,).
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (N, L)
    weighted = torch.where(is_masked, ce, torch.zeros_like(ce)) / t[:, None]
    return weighted.sum() / targets.numel()


@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    """prev_sample: (N, L) ids after the step; pred_original_sample: (N, L) the model's full guess;
    confidence: (N, L) probability of each token in prev_sample when it was chosen (1 for fixed tokens)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    confidence: torch.Tensor


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Iterative unmasking for masked diffusion, with the diffusers scheduler contract.

    `set_timesteps(K)` makes K mask levels from 1 down to 1/K; each `step` unmasks the tokens that the linear schedule
    says should be clean at the next level: the most confident ones ("low_confidence" remasking, LLaDA) or random ones
    ("random", MDLM ancestral order). Tokens that are not masked (a prompt prefix, template words, earlier picks)
    are never changed.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, remasking: str = "low_confidence", temperature: float = 0.0):
        if remasking not in REMASKING:
            raise ValueError(f"remasking {remasking!r} is not supported; choose one of {REMASKING}")
        self.timesteps = torch.ones(1)
        self._levels = torch.tensor([1.0, 0.0])

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self._levels = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device, dtype=torch.float64)
        self.timesteps = self._levels[:-1].float()
        self.num_inference_steps = num_inference_steps

    def next_level(self, timestep: float | torch.Tensor) -> float:
        index = int(torch.argmin((self._levels - float(timestep)).abs()))
        return float(self._levels[min(index + 1, len(self._levels) - 1)])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        mask_token_id: int,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        remasking: str | None = None,
        return_dict: bool = True,
    ) -> MaskedDiffusionSchedulerOutput | tuple:
        """One unmasking step.

        Args:
            model_output: (N, L, V) logits (guided or not). timestep: the current mask level t.
            sample: (N, L) ids, `mask_token_id` at masked positions.
            temperature: 0 picks the argmax; > 0 samples with Gumbel noise drawn in float64 (float32 Gumbel noise
                collapses the tail and lowers diversity, as LLaDA's generate notes).
        """
        temperature = self.config.temperature if temperature is None else temperature
        remasking = remasking or self.config.remasking
        if remasking not in REMASKING:
            raise ValueError(f"remasking {remasking!r} is not supported; choose one of {REMASKING}")
        logits = suppress_mask_logit(model_output.float(), mask_token_id)
        probs = logits.softmax(-1)  # (N, L, V)
        if temperature > 0:
            u = _uniform(logits.shape, generator, logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
            guess = (logits.double() / temperature + gumbel).argmax(-1)
        else:
            guess = logits.argmax(-1)  # (N, L)
        guess_conf = probs.gather(-1, guess[..., None]).squeeze(-1)  # (N, L)

        is_masked = sample == mask_token_id
        t_now, t_next = float(timestep), self.next_level(timestep)
        n_masked = is_masked.sum(1)  # (N,)
        # the linear schedule keeps a fraction t_next / t_now of the masked tokens masked
        keep_masked = torch.floor(n_masked.double() * (t_next / max(t_now, 1e-12))).long()
        n_unmask = n_masked - keep_masked  # (N,)

        if remasking == "low_confidence":
            score = guess_conf.double()
        else:
            score = _uniform(sample.shape, generator, sample.device)
        score = torch.where(is_masked, score, torch.full_like(score, -1.0))  # only masked positions compete
        order = score.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(sample.shape[1], device=sample.device).expand_as(order))
        unmask = is_masked & (rank < n_unmask[:, None])
        prev = torch.where(unmask, guess, sample)
        confidence = torch.where(is_masked, torch.where(unmask, guess_conf, torch.zeros_like(guess_conf)), 1.0)
        if not return_dict:
            return prev, guess, confidence
        return MaskedDiffusionSchedulerOutput(prev_sample=prev, pred_original_sample=guess, confidence=confidence)
