"""Precomputed VAE latents: `mmdiff data latents`, the loader reading latent shards, and training from them."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_tar
from PIL import Image

from mmdiff.cli import main
from mmdiff.data.dataset import collate_batch, make_dataloader
from mmdiff.data.images import prepare_image
from mmdiff.data.latents import (
    META_FILE,
    LatentsMismatchError,
    check_latents_match,
    encode_shards_to_latents,
    latents_from_batch,
    npy_bytes,
    read_latents_meta,
)
from mmdiff.data.shapes import png_bytes
from mmdiff.data.shards import SkipStats, iterate_records, read_shard
from mmdiff.data.writer import write_tar_shard
from mmdiff.models.vae import encode_latents, load_vae, tiny_vae
from mmdiff.training.vae_trainer import save_vae_atomically

SCALE, SHIFT = 0.7, 0.05  # not 1 and 0, so a latent space that forgot either would not match


def _save_vae(folder, seed=0, scale=SCALE, shift=SHIFT):
    torch.manual_seed(seed)
    vae = tiny_vae(image_size=16, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    save_vae_atomically(vae, folder)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return _save_vae(tmp_path_factory.mktemp("latents_vae") / "vae")


@pytest.fixture(scope="module")
def latent_dir(tiny_train_setup, vae_dir, tmp_path_factory):
    """float32 latents of the 64 tiny training images (4 shards of 16), one latent shard per input shard."""
    out = tmp_path_factory.mktemp("latents") / "f32"
    encode_shards_to_latents(tiny_train_setup["data"], vae_dir, out, 16, batch_size=5, device="cpu", dtype="float32")
    return out


def _latent_records(folder):
    """{key: (caption, mean, std)} read back with np.load(allow_pickle=False) only."""
    out = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        for rec in read_shard(str(shard), Counter()):
            mean = np.load(io.BytesIO(rec["latents.npy"]), allow_pickle=False)
            std = np.load(io.BytesIO(rec["latents_std.npy"]), allow_pickle=False)
            out[rec["__key__"]] = (rec["txt"].decode(), torch.from_numpy(mean).float(), torch.from_numpy(std).float())
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encoding_is_deterministic_and_equals_encoding_on_the_fly(tiny_train_setup, vae_dir, tmp_path, dtype):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = encode_shards_to_latents(
        tiny_train_setup["data"], vae_dir, a, 16, batch_size=7, device="cpu", dtype=dtype
    )
    encode_shards_to_latents(tiny_train_setup["data"], vae_dir, b, 16, batch_size=7, device="cpu", dtype=dtype)
    assert summary["written"] == 64 and summary["skipped"] == {} and summary["latent_shape"] == [4, 8, 8]
    assert summary["shards"] == [f"shard-{i:06d}.tar" for i in range(4)]  # one latent shard per input shard
    assert all((a / s).read_bytes() == (b / s).read_bytes() for s in summary["shards"])
    meta = json.loads((a / META_FILE).read_text())
    assert meta["vae"]["scaling_factor"] == SCALE and meta["vae"]["shift_factor"] == SHIFT
    assert meta["image_size"] == 16 and meta["dtype"] == dtype and meta["written"] == 64

    vae = load_vae(vae_dir).eval()
    stored = _latent_records(a)
    source = list(iterate_records(str(tiny_train_setup["data"])))
    assert [key for key, *_ in source] == list(stored)  # same records, same order
    pixels = torch.stack([prepare_image(image, 16) for _, image, _, _ in source])
    mean = torch.stack([stored[key][1] for key, *_ in source])
    std = torch.stack([stored[key][2] for key, *_ in source])
    assert [stored[key][0] for key, *_ in source] == [caption for _, _, caption, _ in source]
    tol = {"atol": 1e-3, "rtol": 1e-3} if dtype == "float16" else {"atol": 1e-6, "rtol": 1e-5}
    with torch.no_grad():
        torch.testing.assert_close(mean, encode_latents(vae, pixels, sample=False), **tol)
        # The trainer's draw from stored (mean, std) equals the trainer's on-the-fly posterior sample.
        on_the_fly = encode_latents(vae, pixels, generator=torch.Generator().manual_seed(3))
    from_latents = latents_from_batch({"latents": mean, "latents_std": std}, "cpu", torch.Generator().manual_seed(3))
    torch.testing.assert_close(from_latents, on_the_fly, **tol)
    assert (from_latents - mean).abs().max() > 1e-3  # and it is a sample, not the mean


def test_bad_records_are_counted_not_fatal(vae_dir, tmp_path):
    good = png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    members = [(f"ok{i}.{e}", d) for i in range(3) for e, d in (("png", good), ("txt", b"a small red square"))]
    members += [("corrupt.png", good[:40] + b"\0" * 20), ("corrupt.txt", b"a red square")]
    members += [("empty.png", good), ("empty.txt", b"  "), ("badutf8.png", good), ("badutf8.txt", b"\xff\xfe")]
    members += [("noimage.txt", b"a caption without image")]
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "a.tar", members)
    write_tar(src / "b.tar", members[:6])
    cut = (src / "b.tar").read_bytes()
    (src / "b.tar").write_bytes(cut[: len(cut) // 2])
    summary = encode_shards_to_latents(src, vae_dir, tmp_path / "out", 16, batch_size=2, device="cpu")
    assert summary["written"] >= 3  # ok0..ok2 of a.tar, plus whatever complete records b.tar kept
    assert summary["skipped"] == {
        "corrupt_image": 1,
        "empty_caption": 1,
        "bad_utf8": 1,
        "no_image": 1,
        "corrupt_tar": 1,
    }

    # Latent records that are unreadable, pickled, of the wrong shape or not finite are skipped as corrupt_latents.
    latent = np.zeros((4, 8, 8), np.float16)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    bad = {
        "garbage": b"not an npy file",
        "truncated": npy_bytes(latent)[:100],
        "pickled": pickled.getvalue(),
        "raw_pickle": pickle.dumps(latent),
        "wrong_shape": npy_bytes(np.zeros((4, 4, 4), np.float16)),
        "nan": npy_bytes(np.full((4, 8, 8), np.nan, np.float32)),
        "integers": npy_bytes(np.zeros((4, 8, 8), np.int64)),
    }
    samples = [{"__key__": k, "txt": b"a small red square", "latents.npy": v} for k, v in bad.items()]
    samples.append({"__key__": "fine", "txt": b"a small red square", "latents.npy": npy_bytes(latent)})
    write_tar_shard(tmp_path / "lat" / "shard-000000.tar", samples)
    from mmdiff.data.tokenizer import train_word_level_tokenizer

    tok = train_word_level_tokenizer(["a small red square"])
    loader = make_dataloader(
        str(tmp_path / "lat"), tok, 16, 6, 4, repeat=False, drop_last=False, shuffle_buffer=0, latent_shape=(4, 8, 8)
    )
    stats, keys = SkipStats(), []
    for batch in loader:
        stats.accumulate(batch["skips"])
        keys += batch["keys"]
    assert keys == ["fine"] and stats.as_dict() == {"corrupt_latents": len(bad)}


def test_loader_yields_latent_batches(latent_dir, tiny_train_setup):
    from mmdiff.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_train_setup["stages"] / "tokenizer")
    stored = _latent_records(latent_dir)
    loader = make_dataloader(str(latent_dir), tok, 16, 12, 4, shuffle_buffer=8, latent_shape=(4, 8, 8))
    batch = next(iter(loader))
    assert "pixel_values" not in batch
    assert batch["latents"].shape == batch["latents_std"].shape == (4, 4, 8, 8)
    assert batch["latents"].dtype == torch.float32 and batch["input_ids"].shape == (4, 12)
    for key, mean, std in zip(batch["keys"], batch["latents"], batch["latents_std"]):
        assert torch.equal(mean, stored[key][1]) and torch.equal(std, stored[key][2])
    # Another expected latent shape: every record is refused, so the endless stream fails clearly.
    with pytest.raises(RuntimeError, match="corrupt_latents"):
        next(iter(make_dataloader(str(latent_dir), tok, 16, 12, 4, latent_shape=(4, 16, 16))))
    image_sample = {"pixel_values": torch.zeros(3, 16, 16), "input_ids": torch.zeros(12, dtype=torch.long)}
    latent_sample = {"latents": torch.zeros(4, 8, 8), "input_ids": torch.zeros(12, dtype=torch.long)}
    with pytest.raises(ValueError, match="mixes image records and precomputed-latent records"):
        collate_batch([{**image_sample, "caption": "", "key": "a"}, {**latent_sample, "caption": "", "key": "b"}])


def _train_step_1(setup, vae_dir, run, sample_posterior, **data):
    from conftest import tiny_train_overrides

    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    run.mkdir(parents=True)
    shutil.copytree(setup["stages"] / "tokenizer", run / "tokenizer")
    overrides = tiny_train_overrides(setup, run, max_steps=1, checkpoint_every=100)
    overrides += [f"vae.pretrained_path={vae_dir}", f"vae.sample_posterior={sample_posterior}"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    return train(load_config(None, overrides))


@pytest.mark.parametrize("sample_posterior", [True, False])
def test_training_from_latents_gives_the_step_1_loss_of_training_from_images(
    tiny_train_setup, vae_dir, latent_dir, tmp_path, monkeypatch, sample_posterior
):
    # Same data order (one latent shard per image shard), same per-batch generator, same posterior draw: the only
    # difference is float rounding of the scaled latents ((m + s * eps - shift) * scale vs (m - shift) * scale +
    # s * scale * eps, and conv results over other batch compositions), hence a 1e-5 relative tolerance.
    import mmdiff.training.trainer as trainer

    from_images = _train_step_1(tiny_train_setup, vae_dir, tmp_path / "images", sample_posterior)

    def no_encode(*args, **kwargs):
        raise AssertionError("training from precomputed latents must not encode images")

    monkeypatch.setattr(trainer, "encode_latents", no_encode)
    from_latents = _train_step_1(
        tiny_train_setup, vae_dir, tmp_path / "latents", sample_posterior, latent_shards=latent_dir
    )
    assert from_latents["steps"] == from_images["steps"] == 1 and from_latents["images_seen"] == 4
    for key in ("loss_image", "loss_text"):
        assert from_latents["last_losses"][key] == pytest.approx(from_images["last_losses"][key], rel=1e-5)
    assert (tmp_path / "latents" / "pipeline" / "vae" / "config.json").is_file()  # the VAE is still saved


def test_latents_of_another_vae_or_resolution_are_refused(tiny_train_setup, vae_dir, latent_dir, tmp_path):
    other = _save_vae(tmp_path / "other_vae", scale=0.5)
    with pytest.raises(LatentsMismatchError) as err:
        _train_step_1(tiny_train_setup, other, tmp_path / "run", True, latent_shards=latent_dir)
    message = str(err.value)
    assert f"VAE {vae_dir.resolve()}" in message and f"VAE {other}" in message
    assert "scaling_factor 0.7 (latents) != 0.5 (training)" in message and "weights_sha256" not in message

    meta = read_latents_meta(latent_dir)
    reseeded = load_vae(_save_vae(tmp_path / "reseeded", seed=1))  # same config and scale, other weights
    with pytest.raises(LatentsMismatchError, match="weights_sha256"):
        check_latents_match(meta, reseeded, 16, "reseeded")
    with pytest.raises(LatentsMismatchError, match=r"latent shape \[4, 8, 8\] .* != \[4, 16, 16\]"):
        check_latents_match(meta, load_vae(vae_dir), 32, str(vae_dir))
    assert check_latents_match(meta, load_vae(vae_dir), 16, str(vae_dir)) == (4, 8, 8)

    from mmdiff.config import ConfigError

    incomplete = tmp_path / "incomplete"
    shutil.copytree(latent_dir, incomplete)
    (incomplete / META_FILE).unlink()
    with pytest.raises(ConfigError, match=f"data.latent_shards=.*{META_FILE} not found"):
        _train_step_1(tiny_train_setup, vae_dir, tmp_path / "run2", True, latent_shards=incomplete)


def test_member_names_escaping_the_folder_are_refused(vae_dir, tmp_path):
    good = png_bytes(Image.new("RGB", (16, 16), (30, 30, 200)))
    members = [("../up.png", good), ("../up.txt", b"x"), ("/abs/p.png", good), ("/abs/p.txt", b"x")]
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "evil.tar", members + [("sub/ok.png", good), ("sub/ok.txt", b"a blue square")])
    summary = encode_shards_to_latents(src, vae_dir, tmp_path / "out", 16, device="cpu")
    assert summary["written"] == 1 and summary["skipped"] == {"unsafe_name": 4}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["sub/ok.latents.npy", "sub/ok.latents_std.npy", "sub/ok.txt"]
    with pytest.raises(ValueError, match="escape"):  # the shard writer the encoder uses refuses such keys itself
        write_tar_shard(tmp_path / "out" / "x.tar", [{"__key__": "../x", "latents.npy": b""}])
    with pytest.raises(ValueError, match="holds input shards"):  # writing into the input folder would delete it
        encode_shards_to_latents(src, vae_dir, src, 16, device="cpu")
    assert (src / "evil.tar").is_file()


def test_cli_data_latents_prints_a_json_summary(tiny_train_setup, vae_dir, tmp_path, capsys):
    src = tiny_train_setup["data"] / "shard-000000.tar"
    args = ["data", "latents", "--shards", str(src), "--vae", str(vae_dir), "--out", str(tmp_path / "out")]
    assert main(args + ["--image-size", "16", "--batch-size", "8", "--shard-size", "10", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 16 and summary["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert summary["dtype"] == "float16" and summary["latent_shape"] == [4, 8, 8]
    assert main(args + ["--image-size", "15", "--device", "cpu"]) == 2  # not divisible by the VAE factor
    assert "not divisible" in capsys.readouterr().err
