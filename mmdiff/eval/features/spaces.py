"""Which feature spaces an evaluation uses, loaded from local files or hub ids, and the checks that they fit the
data.

`resolve_encoders(encoder, clip, inception, benchmark, ...)` returns ({space name: EvalEncoder} in report order, notes):
the mmdiff eval encoder (`--encoder DIR`, else the benchmark's shipped one), then open_clip (`--clip`), then
InceptionV3 (`--inception`). Each may be a hub id ("org/name"), fetched into the Hugging Face cache
(`mmdiff.hub.resolve_pretrained`, safetensors only). The first is the primary space. With none of them the generic
image metrics are not computed (caption n-gram scores and the NLL bound need no encoder) and `evaluate` says how to
get one.
"""

from __future__ import annotations

import os
from typing import Any

from mmdiff.hub import resolve_pretrained
from mmdiff.paths import find_repo_file

# a caption set whose words the encoder mostly does not know was written for other data
MIN_VOCABULARY_COVERAGE = 0.5


def load_encoder_space(folder: str | os.PathLike, device: str = "cpu"):
    """An `mmdiff eval-encoder` folder as an EvalEncoder (FileNotFoundError / ValueError naming the problem)."""
    from .eval_encoder import load_eval_encoder

    return load_eval_encoder(folder, device)


def resolve_encoders(
    encoder: str | os.PathLike | None,
    clip: str | os.PathLike | None,
    inception: str | os.PathLike | None,
    benchmark,
    device: str,
    image_size: int,
    real_images: list,
    captions: list[str],
) -> tuple[dict[str, Any], list[str]]:
    """The feature spaces of one evaluation and notes; each is a local path or a hub id (nothing is downloaded
    unless a hub id is given).

    An encoder the user names must fit the data (`check_encoders_fit`, else ValueError); the benchmark's default one
    is left out with a note when it does not (a 16 px model on shapes, say), since nobody asked for it.
    """
    spaces: dict[str, Any] = {}
    notes: list[str] = []
    if encoder is not None:
        spaces["eval_encoder"] = load_encoder_space(resolve_pretrained(encoder, what="eval encoder"), device)
        check_encoders_fit(spaces, image_size, real_images, captions)
    elif benchmark is not None and benchmark.default_encoder:
        try:
            default = {"eval_encoder": load_encoder_space(find_repo_file(benchmark.default_encoder), device)}
            check_encoders_fit(default, image_size, real_images, captions)
            spaces.update(default)
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"the {benchmark.name} benchmark's default eval encoder is not used: {err}")
    if clip is not None:
        from .pretrained import OpenCLIPEncoder

        spaces["open_clip"] = OpenCLIPEncoder.from_local(
            resolve_pretrained(clip, what="open_clip model"), device=device
        )
    if inception is not None:
        from .pretrained import InceptionEncoder

        weights = resolve_pretrained(inception, what="InceptionV3 weights")
        spaces["inception"] = InceptionEncoder.from_local(weights, device=device)
    if not spaces:
        notes.append(
            "no feature space: FD, KID, precision/recall, CLIP score and R-precision need --encoder (train one on "
            "your shards with `mmdiff eval-encoder`), --clip or --inception"
        )
    return spaces, notes


def check_encoders_fit(spaces: dict[str, Any], image_size: int, real_images: list, captions: list[str]) -> None:
    """Refuse an mmdiff eval encoder that never saw images like these (the real ones, and the model's own
    `image_size` x `image_size` outputs) or these captions' words; open_clip and Inception resize any image and read
    any English, so they fit everything."""
    from PIL import Image

    from .eval_encoder import check_encoder_fits, text_coverage

    encoder = spaces.get("eval_encoder")
    if encoder is None:
        return
    check_encoder_fits(encoder, list(real_images))
    check_encoder_fits(encoder, [Image.new("RGB", (image_size, image_size))])  # what the model generates
    coverage = text_coverage(encoder, captions)
    if coverage < MIN_VOCABULARY_COVERAGE:
        raise ValueError(
            f"the eval encoder {encoder.name} was trained on other data: only {coverage:.0%} of these captions' "
            "words are in its vocabulary; train one on these shards with `mmdiff eval-encoder`"
        )
