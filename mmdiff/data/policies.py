"""The caption policies by name, and the one place where a data config becomes a policy.

``data.text_task_phrasings`` names the policy (saved pipeline folders record that name) and ``data.caption_choice``
is its choice; :func:`caption_policy` resolves both. The policies themselves live with the data they are for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.shapes import LeftFirstPolicy

CAPTION_POLICIES: dict[str, type[CaptionPolicy]] = {
    CaptionPolicy.name: CaptionPolicy,
    LeftFirstPolicy.name: LeftFirstPolicy,
}
# The values of `data.text_task_phrasings`.
TEXT_TASK_PHRASINGS = tuple(CAPTION_POLICIES)


def caption_policy(data: Any = None, caption_choice: str | None = None) -> CaptionPolicy:
    """The caption policy of a data config (a ``DataConfig``, a mapping such as the ``data`` section of a saved
    ``mmdiff_config.yaml``, or None): ``text_task_phrasings`` (default "all") names it, ``caption_choice`` (default
    "random"; the argument, when given, overrides the config) is its choice. Raises ValueError for unknown values."""

    def get(key: str, default: str) -> str:
        value = data.get(key) if isinstance(data, Mapping) else getattr(data, key, None)
        return default if value is None else str(value)

    name = get("text_task_phrasings", "all")
    if name not in CAPTION_POLICIES:
        raise ValueError(f"text_task_phrasings must be one of {TEXT_TASK_PHRASINGS}, got {name!r}")
    return CAPTION_POLICIES[name](caption_choice or get("caption_choice", "random"))
