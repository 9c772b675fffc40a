"""The mmdiff eval encoder (issue 14): training, saving, loading, retrieval and the use-time checks, on tiny shards."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiff.cli import main
from mmdiff.data.shapes import render_scene, write_shapes_shards
from mmdiff.data.tokenizer import encode_captions, train_word_level_tokenizer
from mmdiff.eval.features.contrastive_training import _caption_choices, _embed_pixels, read_pairs, write_atomically
from mmdiff.eval.features.eval_encoder import (
    ContrastiveEvalEncoder,
    MMDiffEvalEncoder,
    check_encoder_fits,
    contrastive_loss,
    load_eval_encoder,
    retrieval_accuracy,
    text_coverage,
    train_eval_encoder,
)

TINY = {"channels": (8, 16), "feature_dim": 32, "embed_dim": 16, "text_width": 16, "text_layers": 1, "text_heads": 2}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(root, 300, image_size=16, seed=0, val_fraction=0.3, shard_size=50)
    return root


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoders") / "enc"
    record = train_eval_encoder(
        shards / "train",
        shards / "val",
        out,
        steps=60,
        batch_size=32,
        lr=3e-3,
        gallery_size=8,
        eval_every=30,
        model_config=TINY,
        progress=False,
    )
    return out, record


def _rendered(num: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed)
    pairs = [render_scene(rng, size) for _ in range(num)]
    return [image for image, _ in pairs], [attrs["canonical"] for _, attrs in pairs]


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    images, captions = _rendered(16, 16)
    tokenizer = train_word_level_tokenizer(captions)
    model = ContrastiveEvalEncoder(len(tokenizer), image_size=16, max_length=12, **TINY)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    pixels = pixels.float() / 127.5 - 1
    ids = encode_captions(tokenizer, captions, 12)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = contrastive_loss(*model(pixels, ids), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_duplicate_captions_are_not_negatives():
    """Two pairs with the same caption: masking them out of each other's negatives lowers the loss of that batch."""
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    plain = contrastive_loss(emb, emb, scale)
    grouped = contrastive_loss(emb, emb, scale, groups=torch.tensor([0, 0, 1]))
    assert grouped < plain
    assert torch.isfinite(grouped)


def test_folder_holds_safetensors_tokenizer_and_training_record(trained):
    out, record = trained
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "tokenizer").is_dir()
    saved = json.loads((out / "training.json").read_text())
    assert saved["retrieval"] == record["retrieval"]
    for key in ("image_to_text_top1", "text_to_image_top1", "gallery_size", "full_gallery", "how"):
        assert key in saved["retrieval"]
    assert saved["image_size"] == 16 and saved["steps"] == 60
    assert saved["train_data"]["num_records"] == 210 and len(saved["train_data"]["fingerprint"]) == 12
    assert saved["vocabulary"]["val_word_coverage"] == 1.0
    assert [row[0] for row in saved["retrieval_curve"]["rows"]] == [30]  # measured during training, then at the end
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_brief_training_retrieves_above_chance(trained):
    retrieval = trained[1]["retrieval"]
    assert retrieval["gallery_size"] == 8 and retrieval["num_galleries"] >= 10  # 90 val pairs, chance 1 / 8
    assert retrieval["image_to_text_top1"] > 2 * retrieval["chance"]
    assert retrieval["text_to_image_top1"] > 2 * retrieval["chance"]


def test_embeddings_are_normalised_with_the_right_shapes(trained):
    encoder = load_eval_encoder(trained[0])
    images, captions = _rendered(5, 16, seed=3)
    assert encoder.image_size == 16 and encoder.has_text and str(trained[0]) in encoder.name
    features = encoder.image_features(images)
    image_emb, text_emb = encoder.embed_images(images), encoder.embed_texts([*captions, ""])
    assert features.shape == (5, TINY["feature_dim"])
    assert image_emb.shape == (5, TINY["embed_dim"]) and text_emb.shape == (6, TINY["embed_dim"])
    for emb in (image_emb, text_emb):
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5)
    # batching must not change the result, and training measured retrieval on the same numbers
    encoder.batch_size = 2
    assert torch.allclose(encoder.embed_images(images), image_emb, atol=1e-5)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    assert torch.allclose(_embed_pixels(encoder, pixels), image_emb, atol=1e-6)


def test_save_then_load_gives_identical_embeddings(tmp_path):
    torch.manual_seed(1)
    images, captions = _rendered(6, 16, seed=5)
    tokenizer = train_word_level_tokenizer(captions)
    model = ContrastiveEvalEncoder(len(tokenizer), image_size=16, max_length=12, **TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    before = MMDiffEvalEncoder(model, tokenizer)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    after = load_eval_encoder(tmp_path)
    assert torch.equal(after.image_features(images), before.image_features(images))
    assert torch.equal(after.embed_texts(captions), before.embed_texts(captions))


def test_retrieval_identity_is_one_and_a_derangement_is_zero():
    n = 64
    emb = torch.eye(n)
    captions = [f"caption {i}" for i in range(n)]
    perfect = retrieval_accuracy(emb, emb, captions, gallery_size=8)
    assert perfect["image_to_text_top1"] == perfect["text_to_image_top1"] == 1.0
    assert perfect["full_gallery"]["image_to_text_top1"] == 1.0 and perfect["num_pairs"] == n
    shifted = emb[torch.arange(n).roll(1)]  # every text points at another pair's image
    wrong = retrieval_accuracy(emb, shifted, captions, gallery_size=8)
    assert wrong["full_gallery"]["image_to_text_top1"] == wrong["full_gallery"]["text_to_image_top1"] == 0.0
    assert wrong["image_to_text_top1"] <= 1 / 8 + 1e-9  # a wrong text can only land in a gallery by chance


def test_retrieval_counts_an_equal_caption_as_a_hit():
    emb = torch.eye(4)
    swapped = emb[[1, 0, 2, 3]]  # pairs 0 and 1 share a caption, their texts are swapped
    captions = ["a red circle", "a red circle", "a blue square", "a green triangle"]
    result = retrieval_accuracy(emb, swapped, captions, gallery_size=3)
    assert result["full_gallery"]["image_to_text_top1"] == 1.0 and result["full_gallery"]["distinct_captions"] == 3
    assert result["num_galleries"] == 1  # galleries never hold the same caption twice


def test_resolution_mismatch_is_refused_naming_both_sizes(trained):
    encoder = load_eval_encoder(trained[0])
    check_encoder_fits(encoder, _rendered(3, 16)[0])
    big = _rendered(3, 32)[0]
    with pytest.raises(ValueError, match=r"trained at 16 px.*these images are 32 px"):
        check_encoder_fits(encoder, big)
    check_encoder_fits(encoder, big, allow_resize=True)


def test_vocabulary_mismatch_is_measured(trained):
    encoder = load_eval_encoder(trained[0])
    assert text_coverage(encoder, _rendered(10, 16)[1]) == 1.0
    assert text_coverage(encoder, ["a photograph of a dog running on the beach"]) < 0.5


def test_load_names_the_problem(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_encoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_eval_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ShapesFeatureClassifier"}))
    with pytest.raises(ValueError, match="eval-classifier"):
        load_eval_encoder(tmp_path)
    (tmp_path / "config.json").write_text((trained[0] / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        load_eval_encoder(tmp_path)


def test_failed_save_leaves_nothing_and_foreign_folders_are_kept(tmp_path):
    def broken(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "enc", broken, lambda _: True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an mmdiff eval encoder"):
        write_atomically(tmp_path / "notes", lambda folder: None, lambda _: False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_records_keep_every_phrasing_and_default_size(shards):
    pairs, size = read_pairs(shards / "val", max_records=5)
    assert size == 16 and pairs.pixels.shape == (5, 3, 16, 16) and pairs.pixels.dtype == torch.uint8
    attrs = {"canonical": "a red circle", "captions": ["a red circle", "there is a red circle"]}
    assert _caption_choices("there is a red circle", attrs) == ["a red circle", "there is a red circle"]
    assert _caption_choices("my own caption", None) == ["my own caption"]


def test_command_trains_and_reports(shards, tmp_path, capsys):
    args = ["eval-encoder", "--shards", str(shards / "train"), "--val-shards", str(shards / "val")]
    args += ["--out", str(tmp_path / "enc"), "--steps", "2", "--batch-size", "8", "--max-records", "16"]
    assert main(args) == 0
    assert "image->text" in capsys.readouterr().out
    assert load_eval_encoder(tmp_path / "enc").training["train_data"]["num_records"] == 16
