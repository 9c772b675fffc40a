"""Tiny VAE: shapes, the latent scaling formula, scaling-factor measurement, training and saving."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from mmdiff.models.vae import (
    decode_latents,
    encode_latents,
    load_vae,
    measure_scaling_factor,
    tiny_vae,
    vae_downsample_factor,
)
from mmdiff.training.vae_trainer import train_vae

SMALL = {"block_out_channels": (8, 16, 16), "norm_num_groups": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny convolutions on one thread: on a busy CI machine, intra-op threads spin-waiting for each other
    made a 30-step run 50x slower, and tensors this small gain nothing from parallelism."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` in [-1, 1]: a flat background with one axis-aligned coloured rectangle each."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size).clone()
    for i in range(n):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        images[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g)
    return images * 2 - 1


def test_tiny_vae_latent_shape():
    torch.manual_seed(0)
    vae = tiny_vae()
    assert vae_downsample_factor(vae) == 4
    with torch.no_grad():
        z = encode_latents(vae, synthetic_images(2))
        assert z.shape == (2, 4, 8, 8)
        assert decode_latents(vae, z).shape == (2, 3, 32, 32)
    assert vae_downsample_factor(tiny_vae(block_out_channels=(8, 8), norm_num_groups=4)) == 2


def test_scaling_factor_and_shift_come_from_config():
    torch.manual_seed(0)
    vae = tiny_vae(**SMALL).eval()
    images = synthetic_images(2)
    with torch.no_grad():
        vae.register_to_config(scaling_factor=1.0, shift_factor=None)
        raw = encode_latents(vae, images, sample=False)
        vae.register_to_config(scaling_factor=0.37)
        scaled = encode_latents(vae, images, sample=False)
        torch.testing.assert_close(scaled, raw * 0.37)
        raw_decoded = vae.decode(raw).sample.clamp(-1, 1)
        torch.testing.assert_close(decode_latents(vae, scaled), raw_decoded, rtol=1e-4, atol=1e-5)

        vae.register_to_config(shift_factor=0.5)
        shifted = encode_latents(vae, images, sample=False)
        torch.testing.assert_close(shifted, (raw - 0.5) * 0.37)
        torch.testing.assert_close(decode_latents(vae, shifted), raw_decoded, rtol=1e-4, atol=1e-5)

        # Sampling is reproducible with a generator and differs from the posterior mode.
        a = encode_latents(vae, images, generator=torch.Generator().manual_seed(3))
        b = encode_latents(vae, images, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, shifted)


def test_measure_scaling_factor_normalises_latents():
    torch.manual_seed(0)
    vae = tiny_vae(**SMALL).eval()
    batches = [synthetic_images(4, seed=s) for s in range(3)]
    factor = measure_scaling_factor(vae, batches, generator=torch.Generator().manual_seed(1))
    assert factor > 0
    vae.register_to_config(scaling_factor=factor)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = torch.cat([encode_latents(vae, b, generator=g) for b in batches])
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_measure_scaling_factor_consumes_at_most_max_batches():
    vae = tiny_vae(**SMALL).eval()
    stream = iter([synthetic_images(2, seed=s) for s in range(5)])
    measure_scaling_factor(vae, stream, max_batches=2)
    assert len(list(stream)) == 3


def test_train_vae_lowers_loss_and_saves_loadable_folder(tmp_path):
    torch.manual_seed(0)
    vae = tiny_vae(**SMALL)
    images = synthetic_images(8)
    with torch.no_grad():
        before = (decode_latents(vae, encode_latents(vae, images, sample=False)) - images).abs().mean().item()

    out_dir = tmp_path / "vae"
    result = train_vae(
        vae, itertools.repeat(images), num_steps=30, lr=1e-2, out_dir=out_dir, log_every=10, progress=False
    )
    assert result["final_recon_loss"] < 0.5 * result["initial_recon_loss"]
    assert result["steps_per_second"] > 0
    assert [h["step"] for h in result["history"]] == [10, 20, 30]

    assert (out_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("vae.tmp-*")), "the temporary folder must be renamed away"
    metrics = [json.loads(line) for line in (out_dir / "vae_metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["summary"]["scaling_factor"] == pytest.approx(result["scaling_factor"])

    loaded = load_vae(out_dir).eval()
    assert loaded.config.scaling_factor == pytest.approx(result["scaling_factor"])
    assert loaded.config.scaling_factor != 1.0
    with torch.no_grad():
        after = (decode_latents(loaded, encode_latents(loaded, images, sample=False)) - images).abs().mean().item()
        torch.testing.assert_close(
            encode_latents(loaded, images, sample=False), encode_latents(vae.cpu().eval(), images, sample=False)
        )
    assert after < 0.5 * before

    # Saving again over an existing folder replaces it atomically and leaves no stray folders behind.
    train_vae(loaded, itertools.repeat(images), num_steps=1, out_dir=out_dir, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_load_vae_pipeline_layout_and_missing_path(tmp_path):
    tiny_vae(**SMALL).save_pretrained(tmp_path / "pipeline" / "vae")
    assert load_vae(tmp_path / "pipeline", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        load_vae(missing)
