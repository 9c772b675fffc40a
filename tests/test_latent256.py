"""configs/latent256.yaml's whole path, run on the CPU for a few steps before anyone runs it on a GPU.

Every component is built here, randomly initialised, and saved as the local folders the recipe names:

- an ``AutoencoderKL`` of Stable Diffusion's shape (4 blocks, 2 layers each, 8x downsampling, 4 latent channels,
  GroupNorm 32, scaling factor 0.18215), its widths shrunk from (128, 256, 512, 512) to (32, 32, 64, 64): the real
  widths take about 6 s per 256 px image to encode on two CPU cores;
- a ``CLIPTextModel`` (CLIP ViT-L/14's 77 positions, quick_gelu; 2 layers of width 32) with a CLIP BPE tokenizer
  of a tiny vocabulary (the byte alphabet and a few merges) saved beside it;
- the caption tokenizer is the recipe's own ``clip_bpe`` (open_clip's vocabulary, offline).

Then the recipe as a user runs it: ``mmdiff data latents`` at 256 px (32x32x4 latents), and ``mmdiff train
configs/latent256.yaml`` with the paths overridden and a small DiT (256 image tokens, as DiT-B/2 has at 256 px),
gradient checkpointing on and bf16 autocast, which the CPU has too.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

import mmdiff.training.trainer as trainer_module
from mmdiff.cli import main
from mmdiff.data.tokenizer import _bytes_to_unicode
from mmdiff.data.writer import write_tar_shard

CONFIG = "configs/latent256.yaml"
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
CAPTIONS = ["a red photo of a dog", "the blue sky over a hill", "a green field", "the dog on the red hill"]


def save_clip_text_encoder(folder) -> None:
    """A random CLIPTextModel and a CLIP BPE tokenizer of a tiny vocabulary, saved as one model folder."""
    byte_chars = list(_bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "d o", "do g</w>", "r e", "re d</w>", "h i", "hi l", "hil l</w>", "o f</w>"]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").parent.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert tokenizer.tokenize("the red dog") == ["the</w>", "red</w>", "dog</w>"]
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_images(path) -> None:
    """Four 256 px photos-to-be (smooth noise) with captions, as one image shard."""
    rng = np.random.default_rng(0)
    samples = []
    for i, caption in enumerate(CAPTIONS):
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((256, 256), Image.Resampling.BICUBIC).save(buf, format="PNG")
        samples.append({"__key__": f"img{i}", "png": buf.getvalue(), "txt": caption.encode()})
    write_tar_shard(path, samples)


@pytest.fixture
def bf16_accelerator_state():
    """accelerate keeps one process-wide state, whose mixed precision the first Accelerator of the process fixes (the
    other tests' runs: "no" on the CPU): cleared before this bf16 run and after it, so the runs around it keep theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_256px_recipe_trains_from_latents_with_checkpointing_and_bf16(
    tmp_path, monkeypatch, capsys, bf16_accelerator_state
):
    write_images(tmp_path / "shards" / "shard-000000.tar")
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE, block_out_channels=(32, 32, 64, 64)).save_pretrained(tmp_path / "sd-vae")
    save_clip_text_encoder(tmp_path / "clip-text")

    latents = tmp_path / "latents"
    argv = ["data", "latents", "--shards", str(tmp_path / "shards"), "--vae", str(tmp_path / "sd-vae")]
    assert main([*argv, "--out", str(latents), "--image-size", "256", "--batch-size", "4", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 4
    assert json.loads((latents / "latents_meta.json").read_text())["latent_shape"] == [4, 32, 32]

    # what the run does, observed from outside: no image is encoded, blocks run checkpointed, matmuls in bf16
    def no_encode(*args, **kwargs):
        raise AssertionError("training from precomputed latents must not encode images")

    checkpointed, linear_dtypes = [], set()
    original_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return original_checkpoint(*args, **kwargs)

    def record_linear(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():
            linear_dtypes.add(output.dtype)

    monkeypatch.setattr(trainer_module, "encode_latents", no_encode)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    hook = torch.nn.modules.module.register_module_forward_hook(record_linear)
    run = tmp_path / "run"
    overrides = [
        f"data.train_shards={tmp_path / 'shards'}",
        f"data.latent_shards={latents}",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        f"vae.pretrained_path={tmp_path / 'sd-vae'}",
        f"text_encoder.path={tmp_path / 'clip-text'}",
        "model.hidden_size=64",
        "model.depth=2",
        "model.num_heads=2",
        "model.gradient_checkpointing=true",
        f"train.output_dir={run}",
        "train.batch_size=2",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.checkpoint_every=3",
        "train.trackers=[]",  # the recipe logs to tensorboard, which is not a dependency
        "train.mixed_precision=bf16",
    ]
    try:
        assert main(["train", CONFIG, *overrides]) == 0
    finally:
        hook.remove()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["images_seen"] == 6
    assert all(np.isfinite(v) for v in summary["last_losses"].values()), summary["last_losses"]
    assert len(checkpointed) >= 2 * 3  # both blocks, every step
    assert torch.bfloat16 in linear_dtypes

    saved = (run / "config.yaml").read_text()
    for line in ("image_size: 256", "kind: clip_bpe", "prediction_type: v_prediction", "patch_size: 2"):
        assert line in saved  # the recipe's own settings, not test defaults
    pipeline = run / "pipeline"
    for part in ("vae", "text_encoder", "transformer", "tokenizer"):
        assert (pipeline / part).is_dir(), part
    assert json.loads((pipeline / "vae" / "config.json").read_text())["block_out_channels"] == [32, 32, 64, 64]


@pytest.mark.parametrize("key", ["data", "tokenizer", "vae", "text_encoder", "model", "diffusion", "train"])
def test_every_key_of_the_recipe_is_a_known_setting(key):
    from omegaconf import OmegaConf

    from mmdiff.config import load_config

    cfg = load_config(CONFIG, [])
    for name, value in OmegaConf.load(CONFIG)[key].items():
        assert getattr(getattr(cfg, key), name) == value, (key, name)
