"""Training-step memory of the shared DiT: an estimate for DiT-B/2 at 256 px, checked against a measured CPU step.

    python scripts/estimate_memory.py                      # DiT-B/2, 256 px, batch 64, bf16: the latent256 recipe
    python scripts/estimate_memory.py --batch-size 32 --check-hidden 256

The estimate counts, per process: the trainable weights (fp32 master copy), their gradients, AdamW's two moments and
the EMA copy, the frozen CLIP ViT-L/14 text encoder and SD's VAE (weights only; parameters counted exactly from the
real configs on the meta device), and the activations autograd saves for the backward pass of one step, which trains
both tasks (text -> image over T image tokens, image -> text over L caption tokens) before one backward:

- per DiT block and token: 26 D elements (self-attention 9 D: LayerNorm in/out, modulated input, q/k/v, attention
  output and its projection; cross-attention 5 D; MLP 12 D with its 4 D hidden twice) plus H x S attention
  probabilities of the masked cross-attention (the math kernel keeps them),
- per image-encoder block and token 17 D; the text head's log-softmax (L x V, fp32 even under autocast), and one
  more L x V while backward holds the logits' gradient (``backward_transient``),
- with gradient checkpointing, each block keeps only its input (D per token) and one block's activations are live
  again during its recomputation.

Activations take ``--activation-bytes`` per element (2 under bf16 autocast; 4 in fp32). The check builds a smaller
model on the CPU (fp32), measures one real training step in a fresh process (peak RSS above the weights, and the
bytes of the tensors autograd saved) and prints the estimate of the same formula at that size beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import dataclass

import torch

CLIP_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, projection_dim=768)  # fmt: skip
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
CLIP_BPE_VOCAB = 49410  # open_clip's 49408 + [PAD] and [MASK]
GB = 1e9


@dataclass
class Size:
    image_size: int = 256
    vae_factor: int = 8
    patch_size: int = 2
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    image_encoder_depth: int = 2
    caption_length: int = 64  # data.max_length
    context_length: int = 77  # text_encoder.max_length
    vocab: int = CLIP_BPE_VOCAB

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.vae_factor // self.patch_size) ** 2


def build_model(size: Size, device: str = "meta"):
    """The shared DiT of `size`, as `mmdiff train` builds it with a frozen 768-wide text encoder."""
    from mmdiff.config import ModelConfig
    from mmdiff.training.stages import transformer_from_config

    config = ModelConfig(patch_size=size.patch_size, hidden_size=size.hidden, depth=size.depth, num_heads=size.heads,
                         text_encoder_depth=0, image_encoder_depth=size.image_encoder_depth)  # fmt: skip
    with torch.device(device):
        return transformer_from_config(config, size.image_size // size.vae_factor, 4, size.vocab, size.caption_length,
                                       external_text_dim=768)  # fmt: skip


def frozen_params() -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
        vae = AutoencoderKL(**SD_VAE)
    return {"clip_text": sum(p.numel() for p in clip.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


def activation_elements(size: Size, batch: int, checkpointing: bool) -> int:
    """Elements autograd saves for one joint step, the text head's logits apart (module docstring)."""
    d, h, t, s, length = size.hidden, size.heads, size.image_tokens, size.context_length, size.caption_length

    def block(tokens: int, context: int) -> int:
        return tokens * (26 * d + h * context)

    image_task = block(t, s)  # image tokens cross-attend the caption's S tokens
    text_task = block(length, t)  # caption tokens cross-attend the T image-context tokens
    per_sample_blocks = size.depth * (image_task + text_task)
    if checkpointing:
        per_sample_blocks = size.depth * (t + length) * d + max(image_task, text_task)
    encoder = size.image_encoder_depth * t * 17 * d
    return batch * (per_sample_blocks + encoder + 4 * t * d)  # + the image head and patch embeddings


def estimate(size: Size, batch: int, activation_bytes: int, ema: bool = True) -> dict[str, float]:
    """Bytes of one training step, by part (weights fp32, AdamW, EMA, frozen components, activations)."""
    params = sum(p.numel() for p in build_model(size).parameters())
    frozen = frozen_params()
    logits = 4 * batch * size.caption_length * size.vocab  # log-softmax runs in fp32 under autocast too
    parts = {
        "trainable_params_M": params / 1e6,
        "weights": 4 * params,
        "grads": 4 * params,
        "adamw_states": 8 * params,
        "ema": 4 * params if ema else 0,
        "frozen_clip_text_and_vae": 4 * sum(frozen.values()),
        "activations": activation_bytes * activation_elements(size, batch, checkpointing=False) + logits,
        "activations_checkpointed": activation_bytes * activation_elements(size, batch, checkpointing=True) + logits,
        "backward_transient": logits,
    }
    fixed = sum(parts[k] for k in ("weights", "grads", "adamw_states", "ema", "frozen_clip_text_and_vae"))
    fixed += parts["backward_transient"]
    parts["total"] = fixed + parts["activations"]
    parts["total_checkpointed"] = fixed + parts["activations_checkpointed"]
    return parts


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def measure_step(size: Size, batch: int, checkpointing: bool) -> dict[str, int]:
    """One joint training step of a fresh model on the CPU (fp32): peak RSS above the weights, and the bytes of the
    distinct tensors autograd saved for backward. Run in a fresh process, so the peak is this step's."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_model(size, device="cpu").train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    latent = size.image_size // size.vae_factor
    latents = torch.randn(batch, 4, latent, latent)
    frozen_hidden = torch.randn(batch, size.context_length, 768)
    text_mask = torch.ones(batch, size.context_length, dtype=torch.bool)
    tokens = torch.randint(0, size.vocab, (batch, size.caption_length))
    timestep = torch.rand(batch)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    baseline = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        text_context, mask = model.encode_external_text(frozen_hidden, text_mask)
        prediction = model(latents, timestep, text_context, mask)
        image_context, image_mask = model.encode_image(latents)
        logits = model(tokens, timestep, image_context, image_mask)
        loss = prediction.pow(2).mean() + torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_bytes = sum(n for ptr, n in saved.items() if ptr not in param_ptrs)
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_rss_above_weights": peak - baseline, "saved_for_backward": saved_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="per process (configs/latent256.yaml: 64)")
    parser.add_argument("--activation-bytes", type=int, default=2, help="2 under bf16 autocast, 4 in fp32")
    parser.add_argument("--check-hidden", type=int, default=192, help="width of the CPU-measured model")
    parser.add_argument("--check-depth", type=int, default=4)
    parser.add_argument("--check-image-size", type=int, default=128)
    parser.add_argument("--check-batch-size", type=int, default=8)
    parser.add_argument("--no-check", action="store_true", help="print the estimate only")
    parser.add_argument("--measure", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    small = Size(image_size=args.check_image_size, hidden=args.check_hidden, depth=args.check_depth,
                 heads=max(1, args.check_hidden // 64))  # fmt: skip
    if args.measure:
        print(json.dumps(measure_step(small, args.check_batch_size, args.measure == "checkpointed")))
        return 0

    big = estimate(Size(), args.batch_size, args.activation_bytes)
    print(f"DiT-B/2 at 256 px ({Size().image_tokens} image tokens), batch {args.batch_size} per process, "
          f"{args.activation_bytes}-byte activations: {big['trainable_params_M']:.1f} M trainable parameters")  # fmt: skip
    for key in ("weights", "grads", "adamw_states", "ema", "frozen_clip_text_and_vae", "activations",
                "activations_checkpointed", "backward_transient", "total", "total_checkpointed"):  # fmt: skip
        print(f"  {key:26s} {big[key] / GB:7.2f} GB")
    if args.no_check:
        return 0

    print(f"\ncheck: a CPU step (fp32) of width {small.hidden}, depth {small.depth}, {small.image_size} px "
          f"({small.image_tokens} image tokens), batch {args.check_batch_size}, measured in a fresh process")  # fmt: skip
    predicted = estimate(small, args.check_batch_size, activation_bytes=4, ema=False)
    for mode in ("plain", "checkpointed"):
        child = [sys.executable, __file__, "--measure", mode, *(argv if argv is not None else sys.argv[1:])]
        measured = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        activations = predicted["activations" if mode == "plain" else "activations_checkpointed"]
        step = predicted["grads"] + predicted["adamw_states"] + activations + predicted["backward_transient"]
        print(f"  {mode:12s} activations: estimated {activations / GB:.3f} GB, saved for backward "
              f"{measured['saved_for_backward'] / GB:.3f} GB (ratio {measured['saved_for_backward'] / activations:.2f})"
              f"; step above the weights: estimated {step / GB:.3f} GB, peak RSS "
              f"{measured['peak_rss_above_weights'] / GB:.3f} GB (ratio {measured['peak_rss_above_weights'] / step:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
