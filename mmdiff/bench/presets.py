"""Benchmark presets (model size, batch, steps) and a description of the machine the numbers came from."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field, replace

import torch

from ..config import ModelConfig


@dataclass(frozen=True)
class BenchPreset:
    """Everything that sizes one benchmark run. Both contenders are built from the same fields.

    model: mmdiff's model config (`model:` of a training config); PixArt is built with the same patch size, width,
        depth, heads and MLP ratio, and its T5 encoder with `model.text_encoder_depth` layers.
    latent_size, in_channels: the latent grid the transformers denoise (tokens = (latent_size / patch)^2).
    context_length: caption tokens, i.e. the cross-attention context length of both (mmdiff's `max_text_length`,
        PixArt's `max_sequence_length`).
    vae_channels: `block_out_channels` of the shared tiny VAE (its downsampling is 2^(len - 1)).
    train_batch: images per training step. sample_batch / sample_steps / guidance_scale: the text-to-image calls;
        guidance_interval: (t_low, t_high) of mmdiff's guidance-interval run.
    caption_batch / caption_steps: captioning calls (the first entry is the cache on/off comparison).
    scaling_latent_sizes / scaling_context_lengths / scaling_batch: the scaling sweep of mmdiff's joint step.
    threads: CPU threads (torch.set_num_threads). device: "cpu" or "cuda". autocast_bf16: bf16 autocast on CUDA.
    peak_matmul_size: n of the n x n matmul that measures the device's peak FLOP/s.
    """

    name: str
    # the transformer: `mmdiff train`'s own model config (its defaults are what training builds), one encoder layer
    model: ModelConfig = field(default_factory=lambda: ModelConfig(text_encoder_depth=1))
    latent_size: int = 16
    in_channels: int = 4
    context_length: int = 32
    vae_channels: tuple[int, ...] = (16, 32)
    train_batch: int = 16
    sample_batch: int = 4
    sample_steps: int = 20
    guidance_scale: float = 4.5
    guidance_interval: tuple[float, float] = (0.2, 0.8)
    caption_batch: int = 8
    caption_steps: tuple[int, ...] = (16, 4, 8, 32)
    scaling_latent_sizes: tuple[int, ...] = (8, 16, 24, 32)
    scaling_context_lengths: tuple[int, ...] = (8, 16, 32, 64)
    scaling_batch: int = 8
    repeats: int = 5
    warmup: int = 2
    threads: int | None = 2
    device: str = "cpu"
    autocast_bf16: bool = False
    peak_matmul_size: int = 1024

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, BenchPreset] = {
    # A few minutes on 2 CPU cores: 64 image tokens, width 256, depth 6, 32-token captions.
    "cpu-small": BenchPreset(name="cpu-small"),
    # DiT-B/2 size: 32x32x4 latents (256 px with an f8 VAE), patch 2 -> 256 tokens, width 768, depth 12, 12 heads,
    # a 77-token context, bf16 autocast. The VAE is tiny but f8 so the pixel size is the usual 256.
    "gpu-b2": BenchPreset(
        name="gpu-b2",
        model=ModelConfig(hidden_size=768, depth=12, num_heads=12, text_encoder_depth=2),
        latent_size=32,
        context_length=77,
        vae_channels=(32, 64, 128, 128),
        train_batch=64,
        sample_batch=16,
        sample_steps=20,
        caption_batch=32,
        caption_steps=(32, 8, 16, 64),
        scaling_latent_sizes=(16, 32, 48, 64),
        scaling_context_lengths=(16, 32, 77, 154),
        scaling_batch=32,
        repeats=10,
        warmup=3,
        threads=None,
        device="cuda",
        autocast_bf16=True,
        peak_matmul_size=8192,
    ),
}


def quick(preset: BenchPreset) -> BenchPreset:
    """A seconds-long smoke version of a preset (CI): tiny model, one repeat, two-step samplers. Keeps its device."""
    return replace(
        preset,
        name=f"{preset.name}-quick",
        model=replace(preset.model, hidden_size=32, depth=2, num_heads=2, text_encoder_depth=1),
        latent_size=8,
        context_length=8,
        vae_channels=(8, 8),
        train_batch=2,
        sample_batch=1,
        sample_steps=2,
        caption_batch=2,
        caption_steps=(2, 3),
        scaling_latent_sizes=(4, 8),
        scaling_context_lengths=(4, 8),
        scaling_batch=2,
        repeats=1,
        warmup=1,
        peak_matmul_size=128,
    )


def machine_info(device: torch.device) -> dict:
    """Where the numbers come from: CPU model, core/thread counts, GPU, library versions."""
    import diffusers
    import transformers

    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
