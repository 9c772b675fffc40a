"""A small CNN trained on real shapes images, whose penultimate features define a Fréchet distance (FD).

The classifier has one trunk and five heads that together describe a scene: object count (1 or 2), which colours,
shapes and sizes are present (multi-hot), and the relation of the normalised scene (none, "left of", "above"). A
feature space that must tell these apart is sensitive to exactly what the shapes benchmark cares about, which an
ImageNet Inception network (FID) is not at 32 px.

The FD between feature sets A and B is ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Heusel et al. 2017).
``Tr((S_a S_b)^(1/2))`` is computed without a general matrix square root: ``S_a S_b`` is similar to the symmetric PSD
matrix ``M = S_a^(1/2) S_b S_a^(1/2)`` (same eigenvalues), so the trace is the sum of the square roots of M's
eigenvalues, and both square roots come from ``eigh`` of symmetric matrices (numpy, float64; no scipy).

The model is a diffusers ``ModelMixin``, saved with ``save_pretrained`` (safetensors + config.json), plus a
``training.json`` that records the data, seed, steps and held-out accuracy.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from mmdiff.data.loader import image_to_tensor, iterate_records, resize_center_crop
from mmdiff.data.shapes import COLORS, SHAPES, SIZES, parse_caption, render_scene, scene_from_attributes

COLOR_NAMES = list(COLORS)
SCENE_RELATIONS = (None, "left of", "above")  # a normalised scene only uses these
HEADS = {"count": 2, "colors": len(COLOR_NAMES), "shapes": len(SHAPES), "sizes": len(SIZES), "relation": 3}
MULTI_HOT = ("colors", "shapes", "sizes")


class ShapesFeatureClassifier(ModelMixin, ConfigMixin):
    """Conv trunk (stride-2 stages, global average pool) -> feature (N, feature_dim) -> five attribute heads."""

    @register_to_config
    def __init__(self, image_size: int = 32, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(), nn.Conv2d(c_out, c_out, 3, 2, 1), nn.GELU()]
            c_in = c_out
        # The pooled map would lose where objects are; a 2x2 pool keeps coarse position for the relation head.
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.to_feature = nn.Sequential(nn.Linear(4 * c_in, feature_dim), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in HEADS.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> penultimate features (N, feature_dim)."""
        return self.to_feature(self.trunk(pixels))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, S, S) in [-1, 1] -> {head: logits (N, classes)}."""
        feature = self.features(pixels)
        return {name: head(feature) for name, head in self.heads.items()}


def scene_targets(scene: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Targets of one normalised scene: count / relation class ids () and multi-hot colors / shapes / sizes."""
    names = {"colors": COLOR_NAMES, "shapes": list(SHAPES), "sizes": list(SIZES)}
    keys = {"colors": "color", "shapes": "shape", "sizes": "size"}
    targets = {
        "count": torch.tensor(len(scene["objects"]) - 1),
        "relation": torch.tensor(SCENE_RELATIONS.index(scene["relation"])),
    }
    for head in MULTI_HOT:
        hot = torch.zeros(len(names[head]))
        for obj in scene["objects"]:
            hot[names[head].index(obj[keys[head]])] = 1.0
        targets[head] = hot
    return targets


def images_to_tensor(images: list[Image.Image] | torch.Tensor, image_size: int) -> torch.Tensor:
    """PIL images (any size) or a float (N, 3, H, W) tensor in [0, 1] -> (N, 3, image_size, image_size) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        pixels = images.float() * 2.0 - 1.0
        if pixels.shape[-1] != image_size:
            pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True)
        return pixels
    return torch.stack([image_to_tensor(resize_center_crop(im.convert("RGB"), image_size)) for im in images])


def load_real_scenes(
    shards: str | list[str], max_images: int | None = None
) -> tuple[list[Image.Image], list[dict[str, Any]], list[str]]:
    """The first `max_images` records of shards that have a readable scene: images, normalised scenes, captions."""
    images, scenes, captions = [], [], []
    for _key, image, caption, attrs in iterate_records(shards):
        scene = scene_from_attributes(attrs) if attrs and "objects" in attrs else parse_caption(caption)
        if scene is None:
            continue
        images.append(image)
        scenes.append(scene)
        captions.append(attrs.get("canonical", caption) if attrs else caption)
        if max_images is not None and len(images) >= max_images:
            break
    return images, scenes, captions


def rendered_scenes(num: int, image_size: int = 32, seed: int = 0) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """`num` freshly rendered real scenes (images and normalised scenes), for tests and quick runs without shards."""
    rng = random.Random(seed)
    pairs = [render_scene(rng, image_size) for _ in range(num)]
    return [image for image, _ in pairs], [scene_from_attributes(attrs) for _, attrs in pairs]


def _losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = logits["count"].new_zeros(())
    for name, out in logits.items():
        if name in MULTI_HOT:
            loss = loss + F.binary_cross_entropy_with_logits(out, targets[name])
        else:
            loss = loss + F.cross_entropy(out, targets[name])
    return loss


@torch.no_grad()
def classifier_accuracy(
    model: ShapesFeatureClassifier, pixels: torch.Tensor, targets: dict[str, torch.Tensor], batch_size: int = 256
) -> dict[str, float]:
    """Per-head accuracy (a multi-hot head is right when every bit is right) on (N, 3, S, S) pixels."""
    model.eval()
    correct = {name: 0 for name in HEADS}
    device = next(model.parameters()).device
    for start in range(0, len(pixels), batch_size):
        logits = model(pixels[start : start + batch_size].to(device))
        for name, out in logits.items():
            target = targets[name][start : start + batch_size].to(device)
            if name in MULTI_HOT:
                correct[name] += int(((out > 0).float() == target).all(1).sum())
            else:
                correct[name] += int((out.argmax(1) == target).sum())
    return {name: n / max(len(pixels), 1) for name, n in correct.items()}


def train_feature_classifier(
    out_dir: str | os.PathLike,
    train_shards: str | list[str] | None = None,
    val_shards: str | list[str] | None = None,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    image_size: int = 32,
    max_images: int | None = None,
    num_rendered: int = 4000,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Train the FD feature classifier on real shapes images and save it to `out_dir`.

    Training images come from `train_shards` (the first `max_images`), or, without shards, from `num_rendered`
    freshly rendered scenes. Held-out accuracy is measured on `val_shards` (or 500 renders with another seed).
    Writes `out_dir/{config.json, diffusion_pytorch_model.safetensors, training.json}`; returns the training record.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    if train_shards:
        images, scenes, _ = load_real_scenes(train_shards, max_images)
    else:
        images, scenes = rendered_scenes(num_rendered, image_size, seed)
    if not images:
        raise ValueError(f"no usable shapes records in {train_shards!r}")
    if val_shards:
        val_images, val_scenes, _ = load_real_scenes(val_shards, 1000)
    else:
        val_images, val_scenes = rendered_scenes(500, image_size, seed + 1)
    pixels = images_to_tensor(images, image_size)
    targets = {k: torch.stack([scene_targets(s)[k] for s in scenes]) for k in HEADS}
    val_pixels = images_to_tensor(val_images, image_size)
    val_targets = {k: torch.stack([scene_targets(s)[k] for s in val_scenes]) for k in HEADS}

    model = ShapesFeatureClassifier(image_size=image_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    model.train()
    for _ in tqdm(range(steps), desc="eval-classifier", dynamic_ncols=True):
        index = torch.randint(len(pixels), (min(batch_size, len(pixels)),), generator=generator)
        loss = _losses(model(pixels[index].to(device)), {k: v[index].to(device) for k, v in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    record = {
        "train_shards": train_shards,
        "val_shards": val_shards,
        "num_train_images": len(pixels),
        "num_val_images": len(val_pixels),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "val_accuracy": classifier_accuracy(model, val_pixels, val_targets),
        "train_seconds": round(time.time() - start, 1),
    }
    out = Path(out_dir)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


def load_feature_classifier(folder: str | os.PathLike, device: str = "cpu") -> ShapesFeatureClassifier:
    """A saved classifier (safetensors only), in eval mode."""
    return ShapesFeatureClassifier.from_pretrained(folder, use_safetensors=True).to(device).eval()


@torch.no_grad()
def extract_features(
    model: ShapesFeatureClassifier, images: list[Image.Image] | torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Penultimate features (N, feature_dim) float64 of PIL images or a (N, 3, H, W) tensor in [0, 1]."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start : start + batch_size], model.config.image_size)
        out.append(model.features(pixels.to(device)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.feature_dim))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0.0))) @ vectors.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D); see the module doc.

    Needs at least 2 rows per set; with fewer rows than D the covariances are singular, which the formula handles,
    but the estimate is biased upwards: compare FDs computed with the same sample counts.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0.0)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # tiny negative values are round-off
