"""Conditioning and guidance: the layer between the model / noise processes and the pipelines, training and eval.

- `TextConditioner`: captions -> text context (jointly trained or frozen encoder), empty prompts -> null context.
- `GuidanceSpec`: a call's guidance (scales, method, interval, rescale, weak model), validated once.
- `GuidedModel` with its `Condition`: the classifier-free-guidance batch for sampling and likelihoods (guided model
  predictions), with its speed-ups.
- `prepare_context`: the fast paths (cached K/V, null rows, repeated rows) as one prepared per-block context.
- `forward_with_dropout`: the training forward with condition dropout (dropped rows on the null context).
"""

from mmdiff.conditioning.guided import Condition, GuidanceSpec, GuidedModel, forward_with_dropout
from mmdiff.conditioning.prepared import prepare_context
from mmdiff.conditioning.text import TextConditioner, tokenize_for_frozen_encoder

__all__ = [
    "Condition",
    "GuidanceSpec",
    "GuidedModel",
    "TextConditioner",
    "forward_with_dropout",
    "prepare_context",
    "tokenize_for_frozen_encoder",
]
