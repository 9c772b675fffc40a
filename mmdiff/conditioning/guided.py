"""The classifier-free-guidance batch, built in one place for sampling, caption NLL and training.

`GuidedModel` wraps the model with a condition and its unconditional branch (in the spirit of k-diffusion's CFG
wrappers): called with the noisy sample and t, it returns the guided model prediction (noise, velocity or logits,
as the model predicts them; the scheduler turns it into a denoised sample). Inside it the speed-ups that
keep guidance cheap are applied once, for every caller:
- the condition's cross-attention K/V are computed once per sampling call (`context_kv`);
- the unconditional branch on the learned null context takes no K/V rows (null rows of `prepare_context`, one constant per block for
  a one-token null context);
- the unconditional rows repeat the conditional rows' noisy input, so what comes before the first cross-attention
  runs once per distinct row (repeated rows of `prepare_context`);
- outside the guidance interval (or at w = 1) only the conditional rows run;
- several guidance scales (a sweep) share one forward: S groups of N conditional rows plus N unconditional rows per
  group that is guided at this t.

`forward_with_dropout` is the training counterpart: rows whose condition is dropped run on the learned null context
(null rows of `prepare_context`), without encoding their condition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..diffusion.guidance import GUIDANCE_METHODS, NOT_ON_LOGITS, Guidance, guidance_active
from ..models.cache import CacheScope
from ..models.transformer import MMDiffTransformer2DModel, select_context_rows
from .prepared import prepare_context

# the modality of each modality's condition (and so of the null context that stands in when it is dropped): images
# are conditioned on text, text on images
CONDITION_MODALITY = {"image": "text", "text": "image"}


def modality_of(sample: torch.Tensor) -> str:
    """ "image" for float latents, "text" for integer token ids (the model's own rule)."""
    return "image" if torch.is_floating_point(sample) else "text"


@dataclass(frozen=True)
class GuidanceSpec:
    """How a sampling call combines the conditional and unconditional branches; the pipelines validate their
    arguments into one of these once (`mmdiff.pipelines.common.guidance_spec`) and hand it down.

    scales: one w per group of rows (a sweep when there are several); w = 1 is unguided, 0 unconditional.
    method: a key of `mmdiff.diffusion.guidance.GUIDANCE_METHODS` ("cfg", "apg", "cfg_zero_star", "tcfg",
        "autoguidance"); params: the diffusers guider's own arguments.
    interval: (t_low, t_high); outside it only the conditional rows run. rescale: phi of Lin et al. 2024.
    weak_model: autoguidance's weaker checkpoint (a pipeline, folder or hub id), given exactly when method is
        "autoguidance".
    """

    scales: tuple[float, ...] = (1.0,)
    method: str = "cfg"
    params: Mapping = field(default_factory=dict)
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    weak_model: object = None

    def __post_init__(self):
        if self.method not in GUIDANCE_METHODS:
            raise ValueError(f"guidance must be one of {tuple(GUIDANCE_METHODS)}, got {self.method!r}")
        if (self.method == "autoguidance") != (self.weak_model is not None):
            raise ValueError(
                "guidance='autoguidance' needs weak_model (a pipeline, folder or hub id of a weaker checkpoint), "
                "and only it takes one"
            )

    @property
    def guided(self) -> bool:
        return any(w != 1.0 for w in self.scales)

    def with_scales(self, *scales: float) -> GuidanceSpec:
        return replace(self, scales=tuple(float(w) for w in scales))

    def check_modality(self, modality: str) -> None:
        """Refuse a method that is not defined on `modality`'s predictions (the text direction's logits)."""
        if modality == "text" and self.method in NOT_ON_LOGITS:
            raise ValueError(f"guidance={self.method!r} does not apply to captions: {NOT_ON_LOGITS[self.method]}")


@dataclass
class WeakBranch:
    """Autoguidance's unconditional branch (Karras et al. 2024): a weaker model of the same kind (an earlier or
    smaller checkpoint) with the same condition, encoded by its own encoders: context and mask for the N rows."""

    model: MMDiffTransformer2DModel
    context: torch.Tensor
    context_mask: torch.Tensor


@dataclass(frozen=True)
class Condition:
    """The condition of N rows and what guidance contrasts it with.

    context, mask: the condition, (N, S, D) and (N, S).
    negative: an explicit unconditional context and mask for the N rows (a negative prompt), padded to the
        condition's length; None (and no `weak`) uses the learned null context.
    weak: autoguidance's unconditional branch (`WeakBranch`), when the guidance method is "autoguidance".
    """

    context: torch.Tensor
    mask: torch.Tensor
    negative: tuple[torch.Tensor, torch.Tensor] | None = None
    weak: WeakBranch | None = None


def embeds_guidance(model) -> bool:
    """Whether `model` takes the guidance scale as an input (`guidance_embeds`, a guidance-conditioned MeanFlow)."""
    return bool(getattr(getattr(model, "config", None), "guidance_embeds", False))


def check_embedded_guidance(spec: GuidanceSpec, negative, weak) -> None:
    """A guidance-embedded model learned one rule, CFG against the learned null context at the given w: refuse
    the sampling-time options that would combine branches it does not run."""
    problems = [
        (spec.method != "cfg", f"guidance={spec.method!r}"),
        (spec.interval is not None, "guidance_interval"),
        (spec.rescale != 0.0, "guidance_rescale"),
        (negative is not None, "a negative prompt"),
        (weak is not None, "a weak model"),
    ]
    named = [name for bad, name in problems if bad]
    if named:
        raise ValueError(
            f"this model takes the guidance scale as an input (guidance_embeds: trained on guided targets, one "
            f"forward per step with no unconditional branch), so {', '.join(named)} cannot apply; give "
            "guidance_scale only"
        )


class GuidedModel:
    """model + condition + unconditional branch -> guided model predictions, `guided(sample, t)`.

    Args:
        model: the MMDiffTransformer2DModel.
        condition: the rows' `Condition` (context and mask, and a negative context or a weak model).
        modality: "image" (the sample is latents; the condition is text) or "text" (token ids; the condition is an
            image).
        guidance: a `GuidanceSpec`, or just the list of scales (plain CFG); S scales make a sweep of S groups of N rows.
        num_inference_steps: the sampling call's steps, for methods whose rule depends on the step (CFG-Zero*).
        cache_context: False recomputes the condition's K/V at every call (only `mmdiff bench` sets it, to measure
            what the cache saves; the output is the same).

    Calling it with `sample` (S*N rows: group g holds rows g*N..(g+1)*N) and the model time t in [0, 1] (a scalar, or
    (S*N,) per row when there is no guidance interval) returns the guided prediction for every row: float32 logits
    for text, the model's dtype for latents. `num_forward_rows` counts the rows the transformers ran.
    """

    def __init__(
        self,
        model: MMDiffTransformer2DModel,
        condition: Condition,
        modality: str,
        guidance: GuidanceSpec | Sequence[float] = GuidanceSpec(),
        *,
        num_inference_steps: int | None = None,
        cache_context: bool = True,
    ):
        if modality not in CONDITION_MODALITY:
            raise ValueError(f"modality must be one of {tuple(CONDITION_MODALITY)}, got {modality!r}")
        context, context_mask = condition.context, condition.mask
        negative, weak = condition.negative, condition.weak
        spec = guidance if isinstance(guidance, GuidanceSpec) else GuidanceSpec(scales=tuple(map(float, guidance)))
        spec.check_modality(modality)
        if (spec.method == "autoguidance") != (weak is not None):
            raise ValueError("guidance='autoguidance' guides against a weak model: it needs its WeakBranch")
        if weak is not None and negative is not None:
            raise ValueError("autoguidance guides against the weak model: it takes no negative prompt")
        if modality == "text" and getattr(model, "is_cache_enabled", False):
            raise ValueError(
                "step caching (transformer.enable_cache) covers the image direction only; call "
                "transformer.disable_cache() before captioning"
            )
        self.model, self.modality, self.spec = model, modality, spec
        # a model that takes w as an input (guidance_embeds) gives the guided prediction itself: conditional rows only
        self.embedded = modality == "image" and embeds_guidance(model)
        if self.embedded:
            check_embedded_guidance(spec, negative, weak)
        self._cache_scope = CacheScope(model)  # one per sampling call: the hooks' state starts anew
        self.num_inference_steps = num_inference_steps
        self.interval, self.rescale = spec.interval, spec.rescale
        self.n, groups = context.shape[0], len(spec.scales)
        self.negative_rows = negative is not None
        if self.negative_rows:  # rows [negative of every group; condition of every group]: (2 S N, ...)
            uncond, uncond_mask = negative
            context = torch.cat([uncond.to(context.dtype).repeat(groups, 1, 1), context.repeat(groups, 1, 1)])
            context_mask = torch.cat([uncond_mask.repeat(groups, 1), context_mask.repeat(groups, 1)])
        elif groups > 1:
            context, context_mask = context.repeat(groups, 1, 1), context_mask.repeat(groups, 1)
        self.context, self.context_mask = context, context_mask
        self.cache_context = cache_context
        self._kv = model.context_kv(context, context_mask, absorb=None) if cache_context else None
        self.weak = weak
        if weak is not None:
            weak_context, weak_mask = weak.context.repeat(groups, 1, 1), weak.context_mask.repeat(groups, 1)
            self._weak_mask = weak_mask
            self._weak_kv = weak.model.context_kv(weak_context, weak_mask, absorb=None)
        self._null_outputs = None
        self.set_scales(spec.scales)
        self.num_forward_rows = 0
        self._step = 0
        self._interval: dict = {}

    def set_scales(self, scales: Sequence[float]) -> None:
        """Guide the following calls at `scales` (one per group), e.g. a w that a step callback changed; the
        method's state (APG's momentum) starts anew for a scale that changed."""
        scales = [float(w) for w in scales]
        if len(scales) != len(self.spec.scales):
            raise ValueError(f"set_scales needs {len(self.spec.scales)} scales, got {len(scales)}")
        old = getattr(self, "scales", None)
        self.guiders = [
            self.guiders[g]
            if old is not None and old[g] == w
            else Guidance(
                self.spec.method,
                w,
                self.spec.rescale,
                self.num_inference_steps,
                self.modality,
                **dict(self.spec.params),
            )
            for g, w in enumerate(scales)
        ]
        self.scales = scales

    @property
    def null_outputs(self) -> list[torch.Tensor] | None:
        """The null-context rows' per-block outputs (`MMDiffTransformer2DModel.null_outputs`), computed once, when
        first needed."""
        if self.negative_rows or self.weak is not None:
            return None
        if self._null_outputs is None:
            self._null_outputs = self.model.null_outputs(CONDITION_MODALITY[self.modality])
        return self._null_outputs

    @property
    def guided(self) -> bool:
        return any(w != 1.0 for w in self.scales)

    def active(self, t: torch.Tensor | float) -> list[bool]:
        """Per group: whether the unconditional rows run at t."""
        level = float(t) if self.interval is not None else 0.0  # a per-row t only without an interval
        return [guidance_active(level, w, self.interval) for w in self.scales]

    def __call__(
        self,
        sample: torch.Tensor,
        t: torch.Tensor | float,
        rows: torch.Tensor | None = None,
        r_timestep: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """rows: (R,) the condition rows `sample` holds, when it holds only some of them (a caption batch whose
        finished rows stop taking forward passes); one guidance scale and the null context only. r_timestep: the
        interval's end for a MeanFlow model (its average velocity over [r, t]; guidance combines the conditional and
        unconditional average velocities); None: r = t."""
        self._interval = {} if r_timestep is None else {"r_timestep": r_timestep}
        model, n, device = self.model, self.n, sample.device
        step, self._step = self._step, self._step + 1
        kv = self._kv if self.cache_context else model.context_kv(self.context, self.context_mask, absorb=None)
        if self.embedded:
            return self._embedded(sample, t, kv)
        per_row_t = self.interval is not None and torch.as_tensor(t).numel() > 1
        if rows is not None or per_row_t:
            return self._some_rows(sample, t, kv, rows, step)
        mask = self.context_mask
        active = self.active(t)
        # unconditional rows only for the groups that are guided at this t
        uncond_rows = torch.cat(
            [torch.arange(g * n, (g + 1) * n, device=device) for g in range(len(active)) if active[g]]
            or [torch.zeros(0, dtype=torch.long, device=device)]
        )
        rows_total = len(self.scales) * n  # conditional rows: the last `rows_total` rows of the context
        cond_start = self.context.shape[0] - rows_total
        null_rows = 0
        if self.weak is None and not self.negative_rows:  # null-context rows (if any) first, then the conditional
            null_rows = len(uncond_rows)
        elif not any(active):  # conditional rows only: views of the cache, no copy
            kv, mask = select_context_rows(kv, slice(cond_start, None)), mask[cond_start:]
        elif not all(active) and self.weak is None:
            keep = torch.cat([uncond_rows, torch.arange(cond_start, self.context.shape[0], device=device)])
            kv, mask = select_context_rows(kv, keep), mask[keep]
        pred_uncond, pred_cond = self._predict(sample, t, kv, mask, uncond_rows, null_rows)
        if not len(uncond_rows):
            return pred_cond
        guided, start = [], 0
        for g, guider in enumerate(self.guiders):
            cond = pred_cond[g * n : (g + 1) * n]
            if active[g]:
                cond = guider(cond, pred_uncond[start : start + n], step)
                start += n
            guided.append(cond)
        return torch.cat(guided) if len(guided) > 1 else guided[0]

    def _embedded(self, sample: torch.Tensor, t, kv) -> torch.Tensor:
        """A guidance-embedded model: one forward of the S*N conditional rows, group g at w = scales[g]."""
        w = torch.tensor(self.scales, dtype=torch.float32, device=sample.device).repeat_interleave(self.n)
        prepared = prepare_context(self.model, sample, self.context_mask, kv=kv)
        with self._cache_scope((sample.shape[0], 0, 0)):
            pred = self.model(sample, t, prepared=prepared, guidance=w, **self._interval)
        self.num_forward_rows += sample.shape[0]
        return pred

    def _predict(self, sample, t, kv, mask, uncond_rows, null_rows, weak_rows=None):
        """(unconditional predictions for `uncond_rows`, conditional predictions for every row): one batched forward
        (null or negative context), or the model and the weak model (autoguidance)."""
        # the cache hooks' state is kept per row layout: the rows, and which of them are unconditional
        layout = (sample.shape[0], len(uncond_rows), null_rows)
        if self.weak is not None:
            with self._cache_scope(layout):
                pred_cond = self.model(
                    sample, t, prepared=prepare_context(self.model, sample, mask, kv=kv), **self._interval
                )
            self.num_forward_rows += sample.shape[0]
            pred_uncond = pred_cond[:0]
            if len(uncond_rows):
                picked = uncond_rows if weak_rows is None else weak_rows[uncond_rows]
                t_rows = t[uncond_rows] if torch.as_tensor(t).numel() > 1 else t
                weak_sample = sample[uncond_rows]
                weak_context = prepare_context(
                    self.weak.model, weak_sample, self._weak_mask[picked], kv=select_context_rows(self._weak_kv, picked)
                )
                pred_uncond = self.weak.model(weak_sample, t_rows, prepared=weak_context, **self._interval)
                self.num_forward_rows += len(uncond_rows)
            if self.modality == "text":
                pred_cond, pred_uncond = pred_cond.float(), pred_uncond.float()
            return pred_uncond, pred_cond
        if len(uncond_rows):
            prepared = prepare_context(
                self.model, sample, mask, kv=kv, null_rows=null_rows, null_outputs=self.null_outputs, repeat=uncond_rows
            )
        else:
            prepared = prepare_context(self.model, sample, mask, kv=kv)
        with self._cache_scope(layout):
            pred = self.model(sample, t, prepared=prepared, **self._interval)
        self.num_forward_rows += sample.shape[0] + len(uncond_rows)
        if self.modality == "text":
            pred = pred.float()
        return pred[: len(uncond_rows)], pred[len(uncond_rows) :]

    def _some_rows(self, sample, t, kv, rows, step) -> torch.Tensor:
        """One group: the condition rows `rows` (None: all), guided where each row's t lies in the interval."""
        if getattr(self.model, "is_cache_enabled", False):  # the row layout would change with every t
            raise ValueError(
                "step caching (transformer.enable_cache) needs every row at one t in each forward; a subset of rows "
                "or a per-row t with a guidance interval changes the rows from step to step"
            )
        if len(self.scales) != 1 or self.negative_rows:
            raise ValueError(
                "a subset of rows, or a per-row t with a guidance interval, needs one guidance scale and the null "
                "context or a weak model as the unconditional branch"
            )
        mask = self.context_mask
        if rows is not None:
            kv, mask = select_context_rows(kv, rows), mask[rows]
        w, count = self.scales[0], sample.shape[0]
        t_rows = torch.as_tensor(t, device=sample.device).reshape(-1).expand(count)
        if w == 1.0:
            guided_rows = torch.zeros(count, dtype=torch.bool, device=sample.device)
        elif self.interval is None:
            guided_rows = torch.ones(count, dtype=torch.bool, device=sample.device)
        else:
            guided_rows = (t_rows >= self.interval[0]) & (t_rows <= self.interval[1])
        uncond_rows = guided_rows.nonzero().flatten()
        weak_rows = rows if rows is not None else torch.arange(count, device=sample.device)
        pred_uncond, pred_cond = self._predict(sample, t, kv, mask, uncond_rows, len(uncond_rows), weak_rows)
        if not len(uncond_rows):
            return pred_cond
        guider = self.guiders[0]
        if len(uncond_rows) == count:
            return guider(pred_cond, pred_uncond, step)
        guided = pred_cond.clone()
        guided[uncond_rows] = guider(pred_cond[uncond_rows], pred_uncond, step)
        return guided


def forward_with_dropout(
    model: MMDiffTransformer2DModel,
    sample: torch.Tensor,
    t: torch.Tensor,
    dropped: torch.Tensor,
    encode: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    r_timestep: torch.Tensor | None = None,
    guidance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training forward with condition dropout: rows where `dropped` (N,) is True see the learned null context.

    `encode(rows)` returns the condition's context and mask for the given row indices (None: every row). Dropped rows
    go first in the batch as null rows (`prepare_context`): their conditions are not encoded and their
    cross-attention is one constant per block. Returns the prediction and the row order it is in (None: the input
    order); a loss that is a mean over rows reorders its target with it. `r_timestep` (N,): a MeanFlow model's
    interval ends; `guidance` (N,): the guidance scales of a model with guidance embeds; both reordered with the rows.

    With none or every row dropped the plain formulation runs instead, which encodes every condition and uses the null
    context even then, so that every parameter has a gradient in every process of a DDP run (a process whose batch
    happened to drop no condition would otherwise leave the null context without one).
    """
    null_modality = CONDITION_MODALITY[modality_of(sample)]
    num_null = int(dropped.sum())
    per_row = {k: v for k, v in (("r_timestep", r_timestep), ("guidance", guidance)) if v is not None}
    if num_null in (0, len(dropped)):
        context, mask = model.drop_context(*encode(None), dropped, null_modality)
        return model(sample, t, context, mask, **per_row), None
    order = torch.argsort(dropped.to(torch.int8), descending=True, stable=True)
    context, mask = encode(order[num_null:])
    t = t[order] if t.ndim else t
    per_row = {k: v[order] if v.ndim else v for k, v in per_row.items()}
    sample = sample[order]
    prepared = prepare_context(model, sample, mask, context=context, null_rows=num_null)
    return model(sample, t, prepared=prepared, **per_row), order
