"""Caption policies: which caption of a record each task trains on.

A record has a caption (its ``txt``) and maybe alternative phrasings (its attributes' ``"captions"`` list). For every
record the data stream asks a policy for two captions: the *input* caption, which the text -> image task conditions
on, and the *target* caption, which the image -> text task learns to generate. Batches carry both as ``input_ids``
and ``target_ids``. The default :class:`CaptionPolicy` gives both tasks the same caption; a dataset with its own
needs subclasses it (as the shapes dataset does in ``shapes.py``), and ``policies.py`` names the policies for
``data.text_task_phrasings``.
"""

from __future__ import annotations

import random

# The values of `data.caption_choice`.
CAPTION_CHOICES = ("random", "txt")


class CaptionPolicy:
    """Both tasks get the same caption (``data.text_task_phrasings: all``): with ``choice="random"`` a phrasing drawn
    from the record's phrasings (one draw from the stream's rng; the txt caption when there are none), with
    ``choice="txt"`` always the txt caption.

    Policies draw only from the ``rng`` they are given, the seeded per-consumer rng of the data stream, and must make
    the same draws for the same record every time: a resumed run replays the stream through them.
    """

    name = "all"  # its `data.text_task_phrasings` value
    reference_phrasing = "canonical"  # what `reference` makes of canonical captions

    def __init__(self, choice: str = "random") -> None:
        if choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice must be 'random' or 'txt', got {choice!r}")
        self.choice = choice

    def choose(self, caption: str, phrasings: list[str], rng: random.Random) -> tuple[str, str]:
        """(input caption, target caption) of a record with txt ``caption`` and alternative ``phrasings``."""
        if self.choice == "random" and phrasings:
            caption = rng.choice(phrasings)
        return caption, caption

    def reference(self, caption: str) -> str:
        """A reference caption (e.g. a canonical one) as the image -> text task was trained to phrase it: the same
        caption here. Caption scores that depend on the phrasing (the NLL bound) take it on these."""
        return caption

    def __repr__(self) -> str:
        return f"{type(self).__name__}(choice={self.choice!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.choice == self.choice

    def __hash__(self) -> int:
        return hash((type(self), self.choice))
