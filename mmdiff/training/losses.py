"""The joint training objective: both directions on the same image-caption pairs with condition dropout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..conditioning.guided import forward_with_dropout
from ..diffusion.gaussian import image_loss
from ..diffusion.masked import mask_tokens, mdlm_loss, sample_mask_levels, suppress_mask_logit
from ..diffusion.meanflow import guided_velocity
from ..diffusion.process import FlowProcess, GaussianProcess
from ..models.transformer import MMDiffTransformer2DModel


@dataclass
class LossWeights:
    image: float = 1.0
    text: float = 1.0
    image_cond_drop: float = 0.1
    text_cond_drop: float = 0.1
    mask_eps: float = 1e-3


def drop_ids(batch_size: int, p: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) bool: which samples lose their condition this step."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, device=device, generator=generator) < p


def image_task_loss(
    model: MMDiffTransformer2DModel,
    noisy: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    dropped: torch.Tensor,
    encode_text: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    process: GaussianProcess | FlowProcess | None = None,
    extra=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The text -> image loss with condition dropout for `noisy` (N, C, H, W) at `t` (N,): the process's loss (MSE,
    or flow matching's weighted MSE; `extra`: what `process.training_inputs` returned for it).

    Rows where `dropped` (N,) is True are conditioned on the null text context (`forward_with_dropout`: the loss is a
    mean, so the row order it returns does not matter). `encode_text(rows)`: the text context of those rows.
    """
    if getattr(process, "interval", False):  # MeanFlow: `extra` is r; the target comes from the model itself
        r = extra
        encoded = {}

        def encode_once(rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            # the target's extra forward reads the same rows' context: encode the captions once per step
            if "context" not in encoded:
                encoded["context"] = encode_text(rows)
            return encoded["context"]

        # per-row w for a guidance-conditioned model, else None
        guidance = process.training_guidance(dropped, generator)
        prediction, order = forward_with_dropout(model, noisy, t, dropped, encode_once, r, guidance)
        if guidance is not None:
            mix = process.settings.guidance_mix
            target = guided_target(model, noisy, target, t, r, dropped, guidance, prediction, order, encode_once, mix)

        def u_fn(z: torch.Tensor, r_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            return forward_with_dropout(model, z, t_, dropped, encode_once, r_, guidance)[0]

        return process.model_loss(prediction, order, u_fn, noisy, target, t, r)
    prediction, order = forward_with_dropout(model, noisy, t, dropped, encode_text)
    if process is None:
        return image_loss(prediction, target if order is None else target[order])
    return process.loss(prediction, target, extra, order)


@torch.no_grad()
def guided_target(
    model: MMDiffTransformer2DModel,
    noisy: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    dropped: torch.Tensor,
    guidance: torch.Tensor,
    prediction: torch.Tensor,
    order: torch.Tensor | None,
    encode: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    mix: float = 0.0,
) -> torch.Tensor:
    """The guided instantaneous velocity MeanFlow's identity averages, per row in input order (`mmdiff.diffusion.
    meanflow`, "Guidance"): u_null + w (v - u_null) on the conditional rows, u_null the model's own r = t, w = 1
    prediction on the null context; with `mix` (kappa) a share kappa of it is the model's own guided prediction
    u(z_t, t, t | c, w). Dropped rows keep the plain velocity and cost no forward.

    `prediction`/`order`: the training forward's output and its row order, reused as u_c where r = t. `encode` returns
    the context of the conditional rows in input order (the training forward encoded them once).
    """
    kept = (~dropped).nonzero().squeeze(1)
    if kept.numel() == 0:
        return velocity
    null, null_mask = model.null_context("text", kept.numel())
    u_null = model(noisy[kept], t[kept], null, null_mask)
    guided = guided_velocity(velocity[kept], u_null, guidance[kept])
    if mix:
        u_cond = prediction.detach()
        if order is not None:  # back to input order
            u_cond = torch.empty_like(u_cond).index_copy_(0, order, u_cond)
        u_cond = u_cond[kept].clone()
        interval = (r[kept] != t[kept]).nonzero().squeeze(1)
        if interval.numel():
            context, mask = encode(kept)
            rows = kept[interval]
            u_cond[interval] = model(
                noisy[rows], t[rows], context[interval], mask[interval], r_timestep=t[rows], guidance=guidance[rows]
            ).to(u_cond.dtype)
        guided = torch.lerp(guided.float(), u_cond.float(), mix).to(velocity.dtype)
    return velocity.index_copy(0, kept, guided.to(velocity.dtype))


def joint_losses(
    model: MMDiffTransformer2DModel,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    pad_token_id: int,
    mask_token_id: int,
    image_process: GaussianProcess | FlowProcess,
    weights: LossWeights,
    text_context: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    text_task_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One step's losses for text -> image (the image process: Gaussian or flow matching) and image -> text (MDLM).

    Args:
        image_process: a `GaussianProcess` / `FlowProcess` (`mmdiff.diffusion.process`).
        latents: (N, C, H, W) clean scaled VAE latents z0. input_ids: (N, L) clean caption ids, pad-filled.
        text_context: a frozen encoder's projected context and mask, (N, S, D) and (N, S); None uses the joint
            text encoder on `input_ids`.
        generator: makes noise, timesteps and dropout reproducible (evaluation on a fixed batch).
        text_task_ids: (N, L) the captions the image -> text task learns to generate: a batch's `target_ids`, which
            its caption policy chose (the same ids as `input_ids` under the default policy); None: `input_ids`.
    Returns:
        {"loss", "loss_image", "loss_text"}; "loss" is the weighted sum that is back-propagated.
    """
    n, device = latents.shape[0], latents.device

    # text -> image: the caption is the context, dropped to the null context with p = image_cond_drop
    dropped = drop_ids(n, weights.image_cond_drop, device, generator)
    noisy, target, t_image, extra = image_process.training_inputs(latents, generator)

    def encode_text(rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if text_context is not None:
            return text_context if rows is None else (text_context[0][rows], text_context[1][rows])
        ids = input_ids if rows is None else input_ids[rows]
        return model.encode_text(ids, ids != pad_token_id)

    loss_image = image_task_loss(model, noisy, target, t_image, dropped, encode_text, image_process, extra, generator)

    # image -> text: the clean latents are the context, dropped with p = text_cond_drop
    dropped_images = drop_ids(n, weights.text_cond_drop, device, generator)
    t_text = sample_mask_levels(n, weights.mask_eps, device, generator)
    target_ids = input_ids if text_task_ids is None else text_task_ids
    masked_ids, is_masked = mask_tokens(target_ids, t_text, mask_token_id, generator)
    logits, order = forward_with_dropout(
        model,
        masked_ids,
        t_text,
        dropped_images,
        lambda rows: model.encode_image(latents if rows is None else latents[rows]),
    )
    if order is not None:  # the rows as `forward_with_dropout` ran them; mdlm_loss sums over rows
        target_ids, is_masked, t_text = target_ids[order], is_masked[order], t_text[order]
    loss_text = mdlm_loss(suppress_mask_logit(logits, mask_token_id), target_ids, is_masked, t_text)

    loss = weights.image * loss_image + weights.text * loss_text
    return {"loss": loss, "loss_image": loss_image.detach(), "loss_text": loss_text.detach()}


class JointObjective(torch.nn.Module):
    """The model and its objective as one module, so that a DDP/FSDP wrapper sees every parameter in `forward`."""

    def __init__(
        self,
        model: MMDiffTransformer2DModel,
        image_process: GaussianProcess | FlowProcess,
        weights: LossWeights,
        pad_token_id: int,
        mask_token_id: int,
    ):
        super().__init__()
        self.model = model
        self.image_process = image_process
        self.weights = weights
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id

    def forward(
        self,
        latents: torch.Tensor,
        input_ids: torch.Tensor,
        frozen_text: tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        text_task_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """frozen_text: a frozen encoder's raw hidden states (N, S, E) and mask (N, S), projected here.
        text_task_ids: the image -> text task's captions, a batch's `target_ids` (see `joint_losses`)."""
        text_context = self.model.encode_external_text(*frozen_text) if frozen_text is not None else None
        return joint_losses(
            self.model,
            latents,
            input_ids,
            self.pad_token_id,
            self.mask_token_id,
            self.image_process,
            self.weights,
            text_context=text_context,
            generator=generator,
            text_task_ids=text_task_ids,
        )
