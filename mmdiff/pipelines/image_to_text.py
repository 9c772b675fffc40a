"""Image-to-text: captioning by iterative unmasking (masked diffusion) with classifier-free guidance on logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from ..checks import check_number
from ..conditioning.guided import Condition, GuidedModel, WeakBranch
from ..data.tokenizer import decode_captions, encode_captions
from ..diffusion.masked import MaskedDiffusionScheduler, check_sampler
from .common import ImageInput, MMDiffPipelineBase, check_guidance, guidance_spec, per_sample_generators

# The text scheduler's mask levels are float32 timesteps: past 2**24 steps, neighbouring levels round to one value.
MAX_TEXT_STEPS = 2**24


@dataclass
class CaptionPipelineOutput(BaseOutput):
    """text: one caption per image. With `return_tokens=True` also token_ids (N, L), pads after each caption's end,
    and confidences (N, L): the probability each token had when it was unmasked (1 for fixed prompt tokens).
    num_forward_rows: the transformer rows the call ran (finished captions take none)."""

    text: list[str]
    token_ids: torch.Tensor | None = None
    confidences: torch.Tensor | None = None
    num_forward_rows: int | None = None


class MMDiffImageToTextPipeline(MMDiffPipelineBase):
    """Caption images with the shared MMDiT by unmasking a fully masked caption over K steps.

    Example:
        >>> pipe = MMDiffImageToTextPipeline.from_pretrained("./assets/shapes_small")
        >>> pipe(image, guidance_scale=2.0).text[0]
    """

    _callback_tensor_inputs = ["token_ids"]
    # False recomputes the context's cross-attention K/V at every step: only `mmdiff bench` sets it, to measure what
    # the cache saves. The output is the same either way.
    cache_context_kv: bool = True

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | list[ImageInput] | None = None,
        prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        max_length: int | None = None,
        remasking: str | None = None,
        temperature: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        num_captions: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_tokens: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["token_ids"],  # noqa: B006 - diffusers' signature; never mutated
        sampler: str | None = None,
        threshold: float | None = None,
        entropy_bound: float | None = None,
        block_length: int | None = None,
        remask_fraction: float | None = None,
        remask_window: tuple[float, float] | None = None,
        guidance: str = "cfg",
        guidance_params: dict | None = None,
        weak_model=None,
    ) -> CaptionPipelineOutput | tuple:
        """Args:
        image: one image or a list (PIL of any mode, numpy, tensor; see `preprocess_images`); None samples captions
            unconditionally from p(text), `num_captions` of them (default 1).
        prompt: fixes part of each caption, one string for all or one per image. Without the tokenizer's mask token
            it is a prefix ("a small red"); with it, a template whose mask tokens are the blanks
            (f"a {tok.mask_token} circle above a {tok.mask_token} square"): the caption is exactly the template with
            its blanks filled by words (never pad). Fixed tokens are never changed.
        num_inference_steps: K unmasking steps of the "schedule" sampler. Given without `sampler`, it selects that
            sampler (K steps asked for, K steps run); unset, the text scheduler's configured sampler runs (by default
            "entropy" at 0.003 nats: as many steps as the captions need), and a "schedule" sampler takes the
            pipeline's `sample_config.caption_steps`, at most max_length.
        guidance_scale: w on logits, w = 1 unguided (LLaDA's scale is w - 1). Needs an image. Default: the
            pipeline's `sample_config.caption_guidance_scale`.
        max_length: caption length L in tokens, at most the model's `max_text_length` (its default).
        remasking: the schedule sampler's order: "low_confidence" (LLaDA: unmask the most confident guesses) or
            "random" (MDLM ancestral order); given without `sampler`, it selects the schedule sampler.
        temperature: 0 picks the argmax; > 0 samples with float64 Gumbel noise.
        guidance_interval: (t_low, t_high) mask levels where CFG applies; elsewhere only the conditional pass runs.
        num_images_per_prompt: captions per image (diffusers' name for several outputs per input), next to each
            other in the output: image i's are captions i * n ... i * n + n - 1 (they differ with temperature > 0 or
            a random sampler; at temperature 0 they are the same caption). With image=None it multiplies
            `num_captions`.
        generator: one generator, or one per caption; with a list, caption i draws all its randomness from
            generator i, so a batched call returns exactly what per-image calls with the same seeds return.
        return_tokens: also return the token ids and per-token confidences.
        callback_on_step_end: `fn(pipe, step_index, t, {"token_ids": ids}) -> dict` after every step (diffusers'
            protocol); a returned "token_ids" replaces the current ids; the callback may set `pipe._guidance_scale`
            (the next steps use it). A caption is finished only when no position is masked, so `pipe._interrupt` is
            not read here.
        callback_on_step_end_tensor_inputs: which of `_callback_tensor_inputs` the callback receives.
        sampler, threshold, entropy_bound, block_length, remask_fraction, remask_window: which positions each step
            unmasks (see `MaskedDiffusionScheduler`): "schedule" (K steps of the linear schedule), "threshold"
            (every position with confidence >= threshold, at least one per caption), "entropy" (by confidence
            within an entropy budget), block by block with `block_length`, and ReMDM remasking of a fraction of the
            committed tokens inside `remask_window`. Unset, the text scheduler's config applies (but see
            `num_inference_steps`). The adaptive samplers take as many steps as the captions need; captions that are
            complete stop taking forward passes.
        guidance, guidance_params, weak_model: the guidance method on the logits, as in the text-to-image pipeline;
            methods defined on any tensor apply ("cfg", "apg", "tcfg", "autoguidance"), "cfg_zero_star" is refused.
        """
        # 1. check inputs
        max_len_model = self.transformer.config.max_text_length
        max_length = max_len_model if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= max_len_model:
            raise ValueError(f"max_length must be an integer in [1, {max_len_model}] for this model, got {max_length}")
        if sampler is None and (num_inference_steps is not None or remasking is not None):
            sampler = "schedule"  # K steps or an unmasking order asked for: the linear schedule's
        if sampler in ("threshold", "entropy") and remasking not in (None, "low_confidence"):
            raise ValueError(
                f"remasking={remasking!r} orders the schedule sampler's picks; the {sampler} sampler picks "
                "by confidence"
            )
        remasking = remasking or self.text_scheduler.config.remasking
        configured = sampler or self.text_scheduler.config.sampler
        if num_inference_steps is None:  # the adaptive samplers do not use it: at most one step per token
            num_inference_steps = self.default_caption_steps(max_length) if configured == "schedule" else max_length
        if guidance_scale is None:
            guidance_scale = self.sample_config.caption_guidance_scale
        num_inference_steps = check_guidance(guidance_scale, num_inference_steps, MAX_TEXT_STEPS)
        unconditional = image is None  # no image: unconditional captions, nothing to guide
        spec = guidance_spec(
            [1.0 if unconditional else guidance_scale],
            "cfg" if unconditional else guidance,
            None if unconditional else guidance_params,
            guidance_interval,
            0.0,
            None if unconditional else weak_model,
            modality="text",
        )
        self.check_callback_inputs(callback_on_step_end_tensor_inputs)
        self._guidance_scale, self._interrupt = spec.scales[0], False
        scheduler = self._text_scheduler_for(
            sampler=sampler,
            threshold=threshold,
            entropy_bound=entropy_bound,
            block_length=block_length,
            remask_fraction=remask_fraction,
            remask_window=None if remask_window is None else tuple(remask_window),
        )
        c = scheduler.config
        check_sampler(
            c.sampler, c.threshold, c.entropy_bound, c.block_length, c.remask_fraction, c.remask_window, remasking,
            max_length, num_inference_steps,
        )  # fmt: skip
        temperature = check_number("temperature", temperature, 0.0, meaning=" (0 = argmax)")
        per_image = num_images_per_prompt
        if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {per_image!r}")
        device = self._execution_device

        # 2. the image context, or the null context for unconditional captions
        if image is None:
            batch = 1 if num_captions is None else num_captions
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise ValueError(f"num_captions must be a positive integer, got {num_captions}")
            batch *= per_image
            context, context_mask = self.transformer.null_context("image", batch)
        else:
            pixels = self.preprocess_images(image)
            batch = pixels.shape[0]
            if num_captions is not None and num_captions != batch:
                raise ValueError(f"num_captions={num_captions} is for image=None; got {batch} images")
            latents = self.encode_images(pixels)
            if isinstance(prompt, list | tuple) and len(prompt) != batch:
                raise ValueError(f"got {len(prompt)} prompts for {batch} images")
            if per_image > 1:
                latents = latents.repeat_interleave(per_image, 0)
                prompt = (
                    prompt if not isinstance(prompt, list | tuple) else [p for p in prompt for _ in range(per_image)]
                )
                batch *= per_image
            context, context_mask = self.transformer.encode_image(latents)
        generator = per_sample_generators(generator, batch)

        # 3. initial caption: the fixed prompt tokens, masks everywhere else
        ids, fixed, blanks = self.initial_tokens(prompt, batch, max_length, device)

        # 4. the guided model: the image context's K/V once for the call; the unconditional branch is the learned
        # null image context (or autoguidance's weak model)
        weak = None
        if spec.weak_model is not None:
            weak_pipe = self.weak_pipeline(spec.weak_model)
            weak = WeakBranch(weak_pipe.transformer, *weak_pipe.transformer.encode_image(latents))
        guided_model = GuidedModel(
            self.transformer, Condition(context, context_mask, weak=weak), "text", spec,
            num_inference_steps=num_inference_steps, cache_context=self.cache_context_kv,
        )  # fmt: skip

        # 5. unmask
        ids, confidences, rows = self._unmask(
            scheduler, guided_model, ids, fixed, blanks, num_inference_steps, generator, temperature, remasking,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 6. the caption ends at its first pad: everything after it is pad too, so ids and text agree. Guided logits
        # that overflowed pick tokens from NaN probabilities: refuse those captions rather than return them
        if not torch.isfinite(confidences).all():
            raise ValueError(
                f"sampling produced NaN or inf token probabilities: guidance_scale={guidance_scale:g} overflows the "
                "guided logits; use a smaller one"
            )
        pad_id = self.tokenizer.pad_token_id
        ended = (ids == pad_id).long().cumsum(1) > 0
        ids = ids.masked_fill(ended, pad_id)
        text = decode_captions(self.tokenizer, ids)
        self.maybe_free_model_hooks()
        token_ids, conf = (ids, confidences) if return_tokens else (None, None)
        if not return_dict:
            return (text, token_ids, conf)
        return CaptionPipelineOutput(text=text, token_ids=token_ids, confidences=conf, num_forward_rows=rows)

    def _text_scheduler_for(self, **overrides) -> MaskedDiffusionScheduler:
        """The text scheduler, or one built from its config with the given (non-None) settings replaced."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self.text_scheduler
        return MaskedDiffusionScheduler.from_config(self.text_scheduler.config, **overrides)

    def _unmask(
        self, scheduler, guided_model, ids, fixed, blanks, num_steps, generator, temperature, remasking, callback,
        callback_inputs=("token_ids",),
    ) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
        """Unmask until no position is masked. Each step runs the transformer on the captions that still have a
        masked position only (finished ones stop taking forward passes, guided or not). Returns (ids, the
        probability each token had when it was unmasked)."""
        mask_id, pad_id = self.mask_token_id, self.tokenizer.pad_token_id
        confidences = fixed.float()
        adaptive = scheduler.config.sampler != "schedule"
        free = (ids == mask_id).sum(1).clamp_min(1)  # positions each caption has to fill
        if adaptive:  # at least one position per caption and step: at most L steps
            levels = [None] * int((ids == mask_id).sum(1).max())
        else:
            scheduler.set_timesteps(num_steps, device=ids.device, length=ids.shape[1])
            levels = list(scheduler.timesteps)
        self._num_timesteps, taken = len(levels), 0
        with self.progress_bar(total=len(levels)) as progress:
            for i, level in enumerate(levels):
                if self._guidance_scale != guided_model.scales[0]:  # a step callback changed w
                    guided_model.set_scales([check_number("guidance_scale", self._guidance_scale, 0.0)])
                active = (ids == mask_id).any(1)
                if not active.any():
                    if adaptive:
                        break
                    progress.update()
                    continue
                rows = None if active.all() else active.nonzero().flatten()
                sub = ids if rows is None else ids[rows]
                # the adaptive samplers condition each caption on its own mask level: the fraction still masked
                t = (
                    (sub == mask_id).sum(1).double().div(free if rows is None else free[rows]).float()
                    if adaptive
                    else level
                )
                logits = guided_model(sub, t, rows)
                # a template blank is a word: pad there would cut the caption short
                sub_blanks = blanks if rows is None else blanks[rows]
                logits[..., pad_id] = logits[..., pad_id].masked_fill(sub_blanks, float("-inf"))
                sub_fixed = fixed if rows is None else fixed[rows]
                sub_gen = generator if rows is None or not isinstance(generator, list) else [generator[r] for r in rows]
                step_t = level if level is not None else 1.0
                prev, step_conf = self._step(scheduler, logits, step_t, sub, sub_fixed, sub_gen, temperature, remasking)
                newly = (sub == mask_id) & (prev != mask_id)
                if rows is None:
                    confidences = torch.where(newly, step_conf, confidences)
                    ids = prev
                else:
                    confidences[rows] = torch.where(newly, step_conf, confidences[rows])
                    ids = ids.clone()
                    ids[rows] = prev
                taken += 1
                out = self.run_callback(
                    callback, i, level if level is not None else t, {"token_ids": ids}, callback_inputs
                )
                ids = out.get("token_ids", ids)
                progress.update()
        if adaptive:  # as many steps as the captions needed
            self._num_timesteps = taken
        return ids, confidences, guided_model.num_forward_rows

    def _step(
        self,
        scheduler: MaskedDiffusionScheduler,
        logits: torch.Tensor,
        t: torch.Tensor | float,
        ids: torch.Tensor,
        fixed: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        temperature: float,
        remasking: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One scheduler step; with one generator per caption, each row draws its noise from its own generator."""
        kwargs = {"temperature": temperature, "remasking": remasking}
        mask_id = self.mask_token_id
        if not isinstance(generator, list):
            out = scheduler.step(logits, t, ids, mask_id, generator=generator, fixed=fixed, **kwargs)
            return out.prev_sample, out.confidence
        rows = [
            scheduler.step(logits[r : r + 1], t, ids[r : r + 1], mask_id, generator=g, fixed=fixed[r : r + 1], **kwargs)
            for r, g in enumerate(generator)
        ]
        return torch.cat([r.prev_sample for r in rows]), torch.cat([r.confidence for r in rows])

    def initial_tokens(
        self, prompt: str | list[str] | None, batch: int, max_length: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The starting caption for each of `batch` rows.

        Returns ids (N, L) with masks at free positions, the bool map (N, L) of fixed positions, and the bool map
        (N, L) of template blanks (free positions that must become words). A template's caption ends where the
        template ends: the positions after it are fixed to pad.
        """
        mask_id, pad_id = self.mask_token_id, self.tokenizer.pad_token_id
        ids = torch.full((batch, max_length), mask_id, dtype=torch.long, device=device)
        blanks = torch.zeros_like(ids, dtype=torch.bool)
        if prompt is None:
            return ids, torch.zeros_like(blanks), blanks
        prompts = [prompt] * batch if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list | tuple) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} captions")
        encoded, _ = encode_captions(self.tokenizer, list(prompts), max_length + 1)
        for row, tokens in enumerate(encoded):
            tokens = tokens[tokens != pad_id].to(device)
            if len(tokens) > max_length:
                raise ValueError(
                    f"prompt {prompts[row]!r} is {len(tokens)} tokens, longer than max_length={max_length}; "
                    "raise max_length or shorten the prompt"
                )
            ids[row, : len(tokens)] = tokens
            if (tokens == mask_id).any():  # a template: exactly its own length, blanks filled with words
                ids[row, len(tokens) :] = pad_id
                blanks[row, : len(tokens)] = tokens == mask_id
        return ids, ids != mask_id, blanks
