"""Tiny, seeded components shared by the tests: a word tokenizer, a 16 px VAE, a 2-layer MMDiT."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from mmdiff.data.tokenizer import train_word_level_tokenizer
from mmdiff.diffusion.gaussian import make_noise_scheduler
from mmdiff.diffusion.process import GaussianProcess
from mmdiff.models.transformer import MMDiffTransformer2DModel
from mmdiff.models.vae import tiny_vae

# `mmdiff train` with test hooks passed in (tests/hooked_train.py), for the tests that need a separate process
HOOKED_TRAIN = Path(__file__).parent / "hooked_train.py"

CAPTIONS = [
    "a small red circle above a large blue square",
    "a large blue square below a small red circle",
    "there is a small green triangle",
    "a large yellow circle to the left of a small purple triangle",
    "a small orange square to the right of a large green circle",
]


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| over whole tensors or arrays.

    Two float32 computations of the same quantity (batched against one by one, cached against recomputed) round
    differently, by a few units in the last place of the *largest* values involved, so their agreement is judged
    relative to the tensor's scale: a few DDIM steps of an untrained model give latents near 2e4, where an absolute
    1e-5 is below one unit in the last place, while an element near zero in the same tensor carries the same absolute
    error as its neighbours, which an element-wise relative tolerance would reject.
    """
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def close_at_scale(actual, expected, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding at the tensors' scale (see `relative_error`)."""
    return relative_error(actual, expected) <= rel


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


def make_model(tokenizer, **overrides) -> MMDiffTransformer2DModel:
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
        adaln="single",  # what `mmdiff train` builds by default (and the shipped model's layout)
    )
    kwargs.update(overrides)
    return perturb(MMDiffTransformer2DModel(**kwargs)).eval()


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

    pipe = build_pipeline(model, vae, GaussianProcess(noise_scheduler).sampling_scheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- tiny training runs (trainer, resume, 2 processes)


@pytest.fixture(scope="session")
def tiny_train_setup(tmp_path_factory) -> dict:
    """Shapes shards (64 images of 16 px in 4 train shards) and prebuilt tokenizer/VAE stage folders.

    The trainer skips a stage whose folder exists, so copying `stages/tokenizer` and `stages/vae` into a run folder
    (:func:`stage_run_dir`) makes runs start with the DiT and share exactly the same tokenizer and VAE.
    """
    from mmdiff.data.shapes import write_shapes_shards
    from mmdiff.data.shards import read_captions
    from mmdiff.training.vae_trainer import save_vae_atomically

    root = tmp_path_factory.mktemp("tiny_train")
    write_shapes_shards(root / "data", 64, image_size=16, seed=0, val_fraction=0.0, shard_size=16)
    train_word_level_tokenizer(read_captions(str(root / "data" / "train"))).save_pretrained(
        root / "stages" / "tokenizer"
    )
    torch.manual_seed(0)
    save_vae_atomically(
        tiny_vae(image_size=16, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4),
        root / "stages" / "vae",
    )
    return {"data": root / "data" / "train", "stages": root / "stages"}


def stage_run_dir(setup: dict, run_dir) -> None:
    """Copy the prebuilt tokenizer and VAE stages into a (new) run folder."""
    import shutil

    for name in ("tokenizer", "vae"):
        shutil.copytree(setup["stages"] / name, run_dir / name)


def tiny_train_overrides(setup: dict, run_dir, **train) -> list[str]:
    """Dotlist overrides for a seconds-long CPU run on the tiny setup.

    Keys of `train` override the train.* defaults below; dotted keys ("data.num_workers") are passed as they are.
    """
    dotted = [f"{k}={v}" for k, v in train.items() if "." in k]
    train = {k: v for k, v in train.items() if "." not in k}
    values = {
        "output_dir": run_dir,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 2,
        "lr": 1e-3,
        "log_every": 1,
        "eval_every": 1000,
        "checkpoint_every": 3,
        "keep_checkpoints": 2,
        **train,
    }
    return [
        f"data.train_shards={setup['data']}",
        "data.image_size=16",
        "data.max_length=12",
        "data.shuffle_buffer=8",
        "model.hidden_size=32",
        "model.depth=1",
        "model.num_heads=2",
        "model.text_encoder_depth=1",
        *(f"train.{k}={v}" for k, v in values.items()),
        *dotted,
    ]


@pytest.fixture
def v_pipe(model, vae, tokenizer):
    """The default training setup: v-prediction on the squaredcos_cap_v2 schedule."""
    from mmdiff.training.trainer import build_pipeline

    scheduler = make_noise_scheduler(
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": False}
    )
    pipe = build_pipeline(model, vae, GaussianProcess(scheduler).sampling_scheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def i2t(pipe):
    """The image-to-text pipeline over the `pipe` fixture's components."""
    from mmdiff.pipelines import MMDiffImageToTextPipeline

    i2t = MMDiffImageToTextPipeline(**pipe.components)
    i2t.set_progress_bar_config(disable=True)
    return i2t


@pytest.fixture
def saved_pipe(pipe, tmp_path):
    """The `pipe` fixture saved to a folder; returns the folder."""
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    return folder


def write_tar(path, members) -> None:
    """A tar of (member name, bytes) pairs exactly as given, bad names included (for the bad-input tests)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
