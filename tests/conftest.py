"""Tiny, seeded components shared by the tests: a word tokenizer, a 16 px VAE, a 2-layer MMDiT."""

from __future__ import annotations

import pytest
import torch

from mmdiff.data.tokenizer import train_word_level_tokenizer
from mmdiff.diffusion.gaussian import make_noise_scheduler
from mmdiff.models.transformer import MMDiTModel
from mmdiff.models.vae import tiny_vae

CAPTIONS = [
    "a small red circle above a large blue square",
    "a large blue square below a small red circle",
    "there is a small green triangle",
    "a large yellow circle to the left of a small purple triangle",
    "a small orange square to the right of a large green circle",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_word_level_tokenizer(CAPTIONS)


@pytest.fixture(scope="session")
def vae():
    torch.manual_seed(0)
    return tiny_vae(image_size=16, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4).eval()


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Move every weight off its initial value: adaLN-Zero heads output exact zeros at init, which would make
    equality tests pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def make_model(tokenizer, **overrides) -> MMDiTModel:
    torch.manual_seed(0)
    kwargs = dict(
        sample_size=8,
        in_channels=4,
        patch_size=2,
        vocab_size=len(tokenizer),
        max_text_length=12,
        hidden_size=32,
        depth=2,
        num_heads=2,
        text_encoder_depth=1,
        image_encoder_depth=1,
    )
    kwargs.update(overrides)
    return perturb(MMDiTModel(**kwargs)).eval()


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture
def noise_scheduler():
    return make_noise_scheduler(
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "epsilon",
            "clip_sample": False,
        }
    )


@pytest.fixture
def pipe(model, vae, noise_scheduler, tokenizer):
    from mmdiff.training.trainer import build_pipeline

    pipe = build_pipeline(model, vae, noise_scheduler, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
