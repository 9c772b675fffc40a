"""Model FLOPs counted from the shapes, and the device's measured matmul peak, for model FLOPs utilisation (MFU).

Only matrix multiplications are counted (2 FLOPs per multiply-add); norms, activations, softmax and the optimizer are
left out, as is usual for MFU (PaLM, appendix B). With T noisy tokens, S context tokens, width D and MLP ratio r, one
sample's forward pass through one cross-attention DiT block costs

    self-attention projections  qkv + out        8 T D^2
    self-attention scores, weighted values       4 T^2 D
    cross-attention projections q + out          4 T D^2
    cross-attention keys/values from the context 4 S D^2
    cross-attention scores, weighted values      4 T S D
    MLP                                          4 r T D^2

plus, for mmdiff, the block's own adaLN linear on the conditioning vector, 12 D^2 (PixArt has one shared adaLN
linear for the whole model). A training step is 3x the forward FLOPs: the backward pass computes a gradient for the
input and one for the weights of every matmul, each as costly as the forward one.
"""

from __future__ import annotations

import time

import torch

from .presets import BenchPreset

TIMESTEP_FREQ_DIM = 256  # sinusoidal features fed to both models' timestep MLPs


def dit_block_flops(tokens: int, context: int, width: int, mlp_ratio: float, adaln_per_block: bool) -> float:
    """Forward FLOPs of one cross-attention DiT block for one sample (see the module docstring)."""
    t, s, d = tokens, context, width
    flops = 8 * t * d * d + 4 * t * t * d + 4 * t * d * d + 4 * s * d * d + 4 * t * s * d + 4 * mlp_ratio * t * d * d
    return flops + (12 * d * d if adaln_per_block else 0)


def encoder_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of `depth` pre-LN self-attention + MLP layers over `tokens` tokens, one sample."""
    t, d = tokens, width
    return depth * (8 * t * d * d + 4 * t * t * d + 4 * mlp_ratio * t * d * d)


def _image_tokens(preset: BenchPreset, latent_size: int | None = None) -> tuple[int, int]:
    """Noisy image tokens and the values per token (p^2 C) of the patch embedding and image head."""
    side = (latent_size or preset.latent_size) // preset.model.patch_size
    return side * side, preset.model.patch_size**2 * preset.in_channels


def mmdiff_train_flops(
    preset: BenchPreset,
    batch: int,
    vocab_size: int,
    joint: bool = False,
    frozen_text: bool = False,
    context_tokens: int | None = None,
) -> float:
    """Training FLOPs of one mmdiff step: the image task (with the joint text encoder that makes its context, or with
    `frozen_text` the projection of precomputed D-wide features) and, when `joint`, also the text task (the image
    context encoder, the caption stream, the text head). `context_tokens`: the text context's length after mmdiff
    trims the batch's common padding (default: the preset's full context length)."""
    d, r, s = preset.model.hidden_size, preset.model.mlp_ratio, preset.context_length
    c = context_tokens or s
    t, patch_values = _image_tokens(preset)
    t_embed = 2 * (TIMESTEP_FREQ_DIM * d + d * d)
    context = 2 * c * d * d if frozen_text else encoder_flops(c, d, preset.model.text_encoder_depth, r)
    image = (
        2 * t * patch_values * d  # patch embedding
        + t_embed
        + context  # the caption -> context
        + preset.model.depth * dit_block_flops(t, c, d, r, adaln_per_block=True)
        + 4 * d * d
        + 2 * t * d * patch_values  # image head: adaLN + linear
    )
    forward = image
    if joint:
        forward += (
            2 * t * patch_values * d  # image context patch embedding
            + encoder_flops(t, d, preset.model.image_encoder_depth, r)
            + t_embed
            + preset.model.depth * dit_block_flops(s, t, d, r, adaln_per_block=True)
            + 4 * d * d
            + 2 * s * d * vocab_size  # text head
        )
    return 3 * batch * forward


def pixart_train_flops(preset: BenchPreset, batch: int, caption_channels: int) -> float:
    """Training FLOPs of one PixArt image step on precomputed caption features (its frozen T5 is not run)."""
    d, r, s = preset.model.hidden_size, preset.model.mlp_ratio, preset.context_length
    t, patch_values = _image_tokens(preset)
    forward = (
        2 * t * patch_values * d
        + 2 * (TIMESTEP_FREQ_DIM * d + d * d)
        + 12 * d * d  # the one shared adaLN linear (AdaLayerNormSingle)
        + 2 * s * (caption_channels * d + d * d)  # caption projection MLP
        + preset.model.depth * dit_block_flops(t, s, d, r, adaln_per_block=False)
        + 2 * t * d * patch_values
    )
    return 3 * batch * forward


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of the best timed square matmul in `dtype` on `device`, over sizes n and 2n and `repeats` runs of
    each: the peak that MFU divides by.

    On a GPU with bf16 this is the tensor-core rate cuBLAS reaches in practice (n = 8192 saturates an H100-class
    part), usually 70-90% of the datasheet number, so MFU against it is a fair, conservative-to-honest figure. On a
    CPU one n = 1024 matmul is short enough for a noisy neighbour or a clock change to halve its rate (a
    first version measured 0.099 TFLOP/s where a later run saw 0.139 on the same machine, and PixArt's training step
    then came out at "100% MFU"); the larger size and the best of both keep the peak a peak.
    """
    best_rate = 0.0
    for n in (size, 2 * size):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):  # warm-up: kernel selection, clocks
            a @ b
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - start))
    return best_rate
