"""Train the image autoencoder: L1 + MSE reconstruction plus a small KL term, then measure the latent scale.

The result is saved atomically in diffusers layout (safetensors) together with its metrics log
``<out_dir>/vae_metrics.jsonl`` (one JSON object per logged step, plus a final summary line).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from mmdiff.models.vae import measure_latent_statistics
from mmdiff.training.checkpoint import atomic_dir

METRICS_FILE = "vae_metrics.jsonl"


def _cosine_lambda(num_steps: int, min_ratio: float = 0.1):
    """LR multiplier decaying from 1 to ``min_ratio`` along a half cosine over ``num_steps``."""

    def factor(step: int) -> float:
        progress = min(step / max(num_steps, 1), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _vae_losses(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction (L1 + MSE, per pixel) and KL (summed per image, averaged over the batch) losses."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample.float()
    target = images.float()
    recon_loss = F.l1_loss(recon, target) + F.mse_loss(recon, target)
    kl = posterior.kl().float().mean()
    return recon_loss, kl


def save_vae_atomically(vae: AutoencoderKL, out_dir: str | os.PathLike, metrics: list[dict] | None = None) -> Path:
    """Save ``vae`` (safetensors) to ``out_dir`` so that a crash never leaves a half-written folder.

    Written through :func:`~mmdiff.training.checkpoint.atomic_dir`: a hidden temporary sibling renamed into place
    when complete; an existing ``out_dir`` is moved aside and deleted only after the new one is in place.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp_dir:
        vae.save_pretrained(tmp_dir, safe_serialization=True)
        if metrics:
            with open(tmp_dir / METRICS_FILE, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in metrics)
    return out_dir


def train_vae(
    vae: AutoencoderKL,
    batches: Iterable[torch.Tensor],
    num_steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    progress: bool = True,
    seed: int = 0,
    cosine_lr: bool = True,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    scaling_batches: int = 8,
) -> dict:
    """Train ``vae`` in place, measure and store its latent scaling factor, and optionally save it.

    Args:
        batches: yields images ``(B, 3, H, W)`` in ``[-1, 1]``; ``num_steps`` batches are used for training and up to
            ``scaling_batches`` more for measuring the scaling factor.
        kl_weight: weight of the KL term; small, so the latents stay informative (LDM-style "KL-reg").
        out_dir: if given, the trained VAE and ``vae_metrics.jsonl`` are saved there atomically.
        device: any torch device; bf16 autocast is used only on CUDA.
        cosine_lr: decay the learning rate along a half cosine to 10% of ``lr`` at the last step (else constant).
        seed: seeds the posterior sampling, so a run is reproducible given the same data and initial weights.

    Returns:
        ``initial_recon_loss`` (step 0, before any update), ``final_recon_loss`` (mean over the last logging window),
        ``scaling_factor``, ``steps_per_second``, ``num_steps``, ``out_dir`` (str or None) and ``history``
        (the logged metric dicts, also written to ``vae_metrics.jsonl``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    batches = iter(batches)  # also accept a list or a DataLoader
    device = torch.device(device)
    vae.to(device).train()
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = _cosine_lambda(num_steps) if cosine_lr else (lambda _step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator(device=device).manual_seed(seed)
    use_autocast = device.type == "cuda"

    history: list[dict] = []
    window: list[float] = []
    initial_recon = float("nan")
    bar = tqdm(range(num_steps), desc="vae", disable=not progress)
    start = time.perf_counter()
    for step in bar:
        images = next(batches).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            recon_loss, kl = _vae_losses(vae, images, generator)
        loss = recon_loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()

        recon_value = recon_loss.item()
        if step == 0:
            initial_recon = recon_value
        window.append(recon_value)
        bar.set_postfix(recon=f"{recon_value:.4f}", kl=f"{kl.item():.1f}", refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
            history.append(
                {
                    "step": step + 1,
                    "recon_loss": sum(window) / len(window),
                    "kl": kl.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": time.perf_counter() - start,
                }
            )
            window = []
    steps_per_second = num_steps / (time.perf_counter() - start)

    vae.eval()
    scale_generator = torch.Generator(device=device).manual_seed(seed + 1)
    shift_factor, scaling_factor = measure_latent_statistics(
        vae, batches, max_batches=scaling_batches, generator=scale_generator
    )
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)

    summary = {
        "initial_recon_loss": initial_recon,
        "final_recon_loss": history[-1]["recon_loss"],
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "steps_per_second": steps_per_second,
        "num_steps": num_steps,
    }
    if out_dir is not None:
        out_dir = save_vae_atomically(vae, out_dir, history + [{"summary": summary}])
    return {**summary, "out_dir": None if out_dir is None else str(out_dir), "history": history}
