"""The mmdiff evaluation encoder: a small contrastive (CLIP-style) image-text model trained on the user's own shards.

Two towers map an image and a caption into one joint space of width E, where matching pairs have a high cosine:

- image tower: conv stages (a stride-2 conv, then a conv; GroupNorm, GELU) -> adaptive average pool to a
  `pool_size` x `pool_size` grid (a global pool would throw away where objects are, and captions say "left of")
  -> linear + GELU -> the image features (N, F) that FD / KID / precision-recall are computed on -> linear
  projection -> (N, E);
- text tower: token + position embeddings over a word-level tokenizer trained on the training captions -> a few
  pre-norm transformer layers with a key padding mask -> masked mean pool -> linear projection -> (N, E);
- a learned temperature (`logit_scale`, CLIP's log(1 / 0.07) start, capped at log 100) and the symmetric InfoNCE loss.

`ContrastiveEvalEncoder` is the network (a diffusers model: save_pretrained / from_pretrained with safetensors);
`MMDiffEvalEncoder` holds it with its tokenizer and implements the `EvalEncoder` protocol of `metrics.py`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmdiff.data.images import prepare_image
from mmdiff.data.tokenizer import encode_captions

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: a sharper softmax makes training unstable


def default_channels(image_size: int) -> tuple[int, ...]:
    """Conv widths: one stride-2 stage per halving until the map is about 4 px (at least 3), widths 32, 64, 128, ..."""
    stages = max(3, math.ceil(math.log2(max(image_size, 8) / 4)))
    return tuple(min(32 * 2**i, 256) for i in range(stages))


class ContrastiveEvalEncoder(ModelMixin, ConfigMixin):
    """Image tower (N, 3, S, S) -> features (N, F) -> (N, E) and text tower (N, L) -> (N, E), plus the temperature."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        image_size: int = 32,
        channels: tuple[int, ...] = (32, 64, 128),
        pool_size: int = 4,
        feature_dim: int = 256,
        embed_dim: int = 128,
        text_width: int = 128,
        text_layers: int = 2,
        text_heads: int = 4,
        text_mlp_ratio: int = 2,
        max_length: int = 32,
        pad_token_id: int = 0,
        source_min_size: int | None = None,
        source_max_size: int | None = None,
    ):
        """`source_min_size` / `source_max_size`: the shorter sides of the training images before they were resized
        to `image_size` (recorded so that the eval can tell which images the encoder has seen the like of)."""
        super().__init__()
        stages: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            groups = math.gcd(8, c_out)
            # downsampling first keeps full-resolution work to one conv: most of the CPU time otherwise
            stages += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(groups, c_out),
                nn.GELU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.GroupNorm(groups, c_out),
                nn.GELU(),
            ]
            c_in = c_out
        self.image_trunk = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(pool_size), nn.Flatten())
        self.image_head = nn.Sequential(nn.Linear(c_in * pool_size**2, feature_dim), nn.GELU())
        self.image_projection = nn.Linear(feature_dim, embed_dim)

        self.token_embed = nn.Embedding(vocab_size, text_width)
        self.text_pos_embed = nn.Parameter(torch.zeros(max_length, text_width))
        layer = nn.TransformerEncoderLayer(
            text_width,
            text_heads,
            text_mlp_ratio * text_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # nested tensors would make train and eval mode take different kernels for the same weights
        self.text_blocks = nn.TransformerEncoder(layer, text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(text_width)
        self.text_projection = nn.Linear(text_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.text_pos_embed, std=0.02)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> pooled image features (N, F), the space of FD / KID / precision-recall."""
        return self.image_head(self.image_trunk(pixels))  # (N, F)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> unnormalised joint embeddings (N, E)."""
        return self.image_projection(self.image_features(pixels))  # (N, E)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids right-padded with `pad_token_id` -> unnormalised joint embeddings (N, E)."""
        input_ids = input_ids[:, : self.config.max_length]
        keep = input_ids != self.config.pad_token_id  # (N, L)
        # an empty caption still attends to (and pools) its first position, instead of producing NaNs
        keep[:, 0] = True
        x = self.token_embed(input_ids) + self.text_pos_embed[: input_ids.shape[1]]  # (N, L, W)
        x = self.text_blocks(x, src_key_padding_mask=~keep)  # (N, L, W)
        x = self.text_norm(x)
        weights = keep.unsqueeze(-1).to(x.dtype)  # (N, L, 1)
        pooled = (x * weights).sum(1) / weights.sum(1)  # (N, W)
        return self.text_projection(pooled)  # (N, E)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Paired batch -> L2-normalised image and text embeddings, each (N, E)."""
        image = F.normalize(self.encode_image(pixels), dim=-1)  # (N, E)
        text = F.normalize(self.encode_text(input_ids), dim=-1)  # (N, E)
        return image, text


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of N pairs of normalised (N, E) embeddings: row i's positive is column i.

    `groups` (N,) marks pairs with the same caption (the shapes data repeats one-object captions many times in a
    batch): such off-diagonal pairs are true matches, so they are removed from the negatives rather than pushed apart.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_emb @ text_emb.T  # (N, N)
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def images_to_pixels(images: list[PIL.Image.Image], image_size: int) -> torch.Tensor:
    """PIL images of any mode and size -> (N, 3, image_size, image_size) in [-1, 1] (shorter side resized, centre
    crop), exactly as training prepares them."""
    return torch.stack([prepare_image(image, image_size) for image in images])


class MMDiffEvalEncoder:
    """A trained `ContrastiveEvalEncoder` with its tokenizer as an `EvalEncoder` (batched, no grad, eval mode)."""

    has_text = True

    def __init__(
        self,
        model: ContrastiveEvalEncoder,
        tokenizer,
        name: str = "mmdiff eval encoder",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        folder: str | os.PathLike | None = None,
        training: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer, self.name, self.device, self.batch_size = tokenizer, name, device, batch_size
        self.folder, self.training = folder, training or {}
        self.image_size: int | None = int(model.config.image_size)

    @torch.no_grad()
    def _images(self, images: list[PIL.Image.Image], project: bool) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = images_to_pixels(images[start : start + self.batch_size], self.image_size).to(self.device)
            features = self.model.encode_image(pixels) if project else self.model.image_features(pixels)
            out.append(features.float().cpu())
        width = self.model.config.embed_dim if project else self.model.config.feature_dim
        return torch.cat(out) if out else torch.zeros(0, width)

    def image_features(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """(N, F) pooled image-tower features (before the projection), for FD / KID / precision-recall."""
        return self._images(images, project=False)

    def embed_images(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """(N, E) L2-normalised joint image embeddings."""
        return F.normalize(self._images(images, project=True), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N, max_length) ids, right-padded; longer captions are truncated."""
        return encode_captions(self.tokenizer, texts, self.model.config.max_length)[0]

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, E) L2-normalised joint text embeddings."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = self.tokenize(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(ids).float().cpu())
        emb = torch.cat(out) if out else torch.zeros(0, self.model.config.embed_dim)
        return F.normalize(emb, dim=-1)


def _class_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_eval_encoder_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a saved `ContrastiveEvalEncoder` (its config.json names the class)."""
    return _class_name(Path(folder)) == ContrastiveEvalEncoder.__name__
