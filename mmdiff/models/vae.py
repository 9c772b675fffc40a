"""The image autoencoder: a tiny diffusers ``AutoencoderKL`` for the shapes data, loading, and latent scaling.

``encode_latents`` / ``decode_latents`` are the one place where the latent scaling formula lives:
``z = (posterior - shift_factor) * scaling_factor`` with both constants read from ``vae.config``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

import torch
from diffusers import AutoencoderKL

from .hooks import input_device


def tiny_vae(
    image_size: int = 32,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (16, 32, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
) -> AutoencoderKL:
    """A small randomly initialised ``AutoencoderKL`` for low-resolution images.

    Each block after the first halves the resolution, so the downsampling factor is
    ``2 ** (len(block_out_channels) - 1)``: 32 px images become ``(latent_channels, 8, 8)`` latents by default.
    The defaults (0.7 M parameters) are sized for CPU training: narrow full-resolution stages, where almost all the
    convolution cost is, and the widest stage at the latent resolution.
    ``scaling_factor`` starts at 1.0 because an untrained VAE has no meaningful latent scale; the trainer measures it
    on data afterwards (see ``measure_scaling_factor``).
    """
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"block_out_channels {tuple(block_out_channels)} must be divisible by {norm_num_groups=}")
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
        scaling_factor=1.0,
    )


def load_vae(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` saved in diffusers layout (``config.json`` + safetensors) from a local folder.

    ``path`` may be the VAE folder itself or a pipeline folder with a ``vae/`` subfolder.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        subfolder = None
    elif os.path.isfile(os.path.join(path, "vae", "config.json")):
        subfolder = "vae"
    else:
        raise FileNotFoundError(f"No VAE found at {path!r}: expected a diffusers AutoencoderKL folder with config.json")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder, use_safetensors=True, **kwargs)


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along each side: ``2 ** (number of encoder blocks - 1)``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae: AutoencoderKL) -> float:
    shift = vae.config.shift_factor
    return 0.0 if shift is None else float(shift)


def encode_latents(
    vae: AutoencoderKL,
    pixel_values: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Encode images into scaled latents for diffusion.

    Args:
        pixel_values: ``(B, 3, H, W)`` in ``[-1, 1]``.
        generator: randomness for sampling the posterior.
        sample: draw from the posterior (training-time augmentation, as in LDM) or take its mode.

    Returns:
        ``(B, C, H / f, W / f)`` latents ``(z - shift_factor) * scaling_factor``, in the VAE's dtype.
        Gradients flow unless the caller wraps this in ``torch.no_grad()``.
    """
    x = pixel_values.to(device=input_device(vae, pixel_values), dtype=vae.dtype)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mode()
    return scale_latents(vae, z)


def scale_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Raw posterior latents ``(B, C, h, w)`` -> the diffusion's latents ``(z - shift_factor) * scaling_factor``."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def encode_posterior(vae: AutoencoderKL, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of images in the scaled latent space of :func:`encode_latents`.

    Args:
        pixel_values: ``(B, 3, H, W)`` in ``[-1, 1]``.

    Returns:
        ``(mean, std)``, each ``(B, C, H / f, W / f)``: ``mean`` is ``encode_latents(..., sample=False)`` and
        ``mean + std * eps`` is its posterior sample for the same ``eps`` (equal up to float rounding).
    """
    x = pixel_values.to(device=input_device(vae, pixel_values), dtype=vae.dtype)
    posterior = vae.encode(x).latent_dist
    return scale_latents(vae, posterior.mode()), posterior.std * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents ``(B, C, h, w)`` back to images ``(B, 3, h * f, w * f)`` clamped to ``[-1, 1]``.

    Undoes ``encode_latents`` exactly: ``z = latents / scaling_factor + shift_factor``.
    """
    z = latents.to(device=input_device(vae, latents), dtype=vae.dtype) / vae.config.scaling_factor + _shift(vae)
    return vae.decode(z).sample.clamp(-1.0, 1.0)


def measure_scaling_factor(
    vae: AutoencoderKL,
    batches: Iterable[torch.Tensor],
    max_batches: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """``1 / std`` of the unscaled posterior samples over data, as in the LDM paper (see ``measure_latent_statistics``)."""
    return measure_latent_statistics(vae, batches, max_batches, generator)[1]


@torch.no_grad()
def measure_latent_statistics(
    vae: AutoencoderKL,
    batches: Iterable[torch.Tensor],
    max_batches: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Mean and ``1 / std`` of the unscaled posterior samples over data.

    Args:
        batches: images ``(B, 3, H, W)`` in ``[-1, 1]``; at most ``max_batches`` are consumed.

    Returns:
        ``(shift_factor, scaling_factor)`` to store with ``vae.register_to_config(...)`` so that scaled latents have
        zero mean and unit variance (a trained VAE's latents are rarely centred; a diffusion prior starting from
        N(0, I) learns faster when they are).
    """
    count, total, total_sq = 0, 0.0, 0.0
    # islice, not enumerate + break: an infinite iterator must not lose a batch past the last one used.
    for images in itertools.islice(batches, max_batches):
        x = images.to(device=vae.device, dtype=vae.dtype)
        # float64 sums: millions of elements in float32 lose the precision the variance needs.
        z = vae.encode(x).latent_dist.sample(generator=generator).double()
        count += z.numel()
        total += z.sum().item()
        total_sq += z.square().sum().item()
    if count < 2:
        raise ValueError("measure_scaling_factor needs at least one non-empty batch")
    mean = total / count
    var = total_sq / count - mean * mean
    if var <= 0.0:
        raise ValueError(f"latents have zero variance ({var=}); cannot measure a scaling factor")
    return float(mean), float(var**-0.5)
