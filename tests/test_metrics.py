"""Generic evaluation metrics (FD, KID, precision/recall, CLIP score, R-precision, BLEU/CIDEr-D/ROUGE-L) and the
pretrained feature spaces loaded from local files (open_clip, InceptionV3), with tiny random weights and no network."""

from __future__ import annotations

import io
import json
import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmdiff.eval.features.pretrained import InceptionEncoder, OpenCLIPEncoder, inception_weights_to_safetensors
from mmdiff.eval.metrics import (
    caption_scores,
    clip_score,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    r_precision,
    tokenize_caption,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEXTS = ["a small red circle", "a large blue square above a green triangle", "there is a yellow circle"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (a weights download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


class _Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse to build it."""


def _unit(g: torch.Generator, n: int, dim: int = 32) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)


def _images() -> list[Image.Image]:
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (24, 40))]


# ---------------------------------------------------------------- text -> image: distributions


def test_frechet_distance_zero_for_a_set_with_itself_and_squared_shift_for_a_shifted_one():
    a = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    shift = torch.linspace(-1.0, 2.0, 8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # same covariance: only |mu_a - mu_b|^2 remains
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)


def test_kid_near_zero_for_identical_sets_and_large_for_shifted_ones():
    a = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    same = kernel_inception_distance(a, a, subset_size=100, subsets=20)
    shifted = kernel_inception_distance(a, a + 1.0, subset_size=100, subsets=20)
    assert abs(same["kid"]) < 0.02 * shifted["kid"]
    assert shifted["kid_std"] >= 0 and kernel_inception_distance(a, a + 1.0, 100, 20) == shifted  # seeded


def test_precision_recall_one_for_a_set_with_itself_and_zero_for_far_apart_sets():
    a = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(a, a, k=3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(a, a + 100.0, k=3) == {"precision": 0.0, "recall": 0.0}


# ---------------------------------------------------------------- text <-> image: alignment


def test_clip_score_is_100_times_the_mean_cosine_clamped_at_zero():
    g = torch.Generator().manual_seed(0)
    emb = _unit(g, 6)
    assert clip_score(emb, emb) == pytest.approx(100.0)
    assert clip_score(emb, -emb) == 0.0
    # cosines 1 and -0.5: torchmetrics' convention clamps the mean (25), not each pair (which would give 50)
    e0, e1 = torch.eye(2, dtype=torch.float64)
    pair = torch.stack([e0, -0.5 * e0 + math.sqrt(0.75) * e1])
    assert clip_score(torch.stack([e0, e0]), pair) == pytest.approx(25.0)


@pytest.mark.parametrize("direction", ["image_to_text", "text_to_image"])
def test_r_precision_one_when_each_image_is_its_text_and_chance_when_shuffled(direction):
    g = torch.Generator().manual_seed(0)
    n, R = 2000, 4
    texts = [f"prompt {i}" for i in range(n)]
    image_emb = _unit(g, n)
    perfect = r_precision(image_emb, image_emb.clone(), texts, R=R, seed=0, direction=direction)
    assert perfect["r_precision"] == 1.0 and perfect["R"] == R and perfect["num"] == n
    shuffled = image_emb[torch.randperm(n, generator=g)]
    chance = r_precision(image_emb, shuffled, texts, R=R, seed=1, direction=direction)
    assert abs(chance["r_precision"] - 1 / R) < 0.05  # binomial std ~0.01 at n = 2000
    assert r_precision(image_emb, shuffled, texts, R=R, seed=1, direction=direction) == chance


def test_r_precision_never_draws_a_repeat_of_the_own_prompt_and_ties_are_misses():
    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt {i}" for i in range(8)]
    texts = [p for p in prompts for _ in range(4)]  # every prompt drawn 4 times, as a sweep does
    text_emb = _unit(g, 8).repeat_interleave(4, dim=0)  # repeats of a prompt embed identically
    image_emb = torch.nn.functional.normalize(text_emb + 0.01 * torch.randn(32, 32, generator=g), dim=-1)
    # a repeat drawn as a distractor would tie with the own text and count as a miss
    assert r_precision(image_emb, text_emb, texts, R=8)["r_precision"] == 1.0
    collapsed = torch.ones(32, 32, dtype=torch.float64) / math.sqrt(32)
    assert r_precision(collapsed, collapsed, texts, R=8)["r_precision"] == 0.0
    with pytest.raises(ValueError, match="R = 9 needs R >= 2 and at least R distinct texts, got 8"):
        r_precision(image_emb, text_emb, texts, R=9)


# ---------------------------------------------------------------- image -> text: n-gram scores


def test_tokenize_caption_lowercases_and_drops_punctuation():
    assert tokenize_caption(" A Red circle, LEFT-of the blue square. ") == "a red circle left of the blue square"


def test_caption_scores_identical_disjoint_and_hand_worked_cases():
    refs = [["a b c d"], ["e f g h"]]
    same = caption_scores(["a b c d", "e f g h"], refs)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-8) and same["rouge_l"] == 1.0
    assert same["cider_d"] == pytest.approx(10.0)  # identical, >= 4 words, unlike the other image's references
    disjoint = caption_scores(["p q r s", "t u v w"], refs)
    assert disjoint["bleu4"] == pytest.approx(0.0, abs=1e-8)
    assert disjoint["cider_d"] == 0.0 and disjoint["rouge_l"] == 0.0
    # BLEU and ROUGE-L by hand: "a red circle above a blue square" against "a red circle above a green square";
    # clipped n-gram matches 6/7, 4/6, 3/5, 2/4, equal lengths (no brevity penalty), so
    # BLEU-4 = (6/7 * 4/6 * 3/5 * 2/4)^(1/4) = (6/35)^(1/4); the LCS has 6 of 7 words both ways: ROUGE-L = 6/7.
    worked = caption_scores(
        ["a red circle above a blue square", "e f g h"],
        [["a red circle above a green square"], ["e f g h"]],
    )
    assert worked["bleu1"] == pytest.approx(10 / 11, rel=1e-6)  # pooled with image 2's 4/4: (6 + 4) / (7 + 4)
    assert caption_scores(["a red circle above a blue square"] * 2, [["a red circle above a green square"]] * 2)[
        "bleu4"
    ] == pytest.approx((6 / 35) ** 0.25, rel=1e-6)
    assert worked["rouge_l"] == pytest.approx((6 / 7 + 1) / 2)
    # CIDEr-D by hand: candidates "a b c d" (= its reference) and "e f x y" (reference "e f g h"). Every reference
    # n-gram occurs in 1 of 2 images, so each has tf-idf weight log 2 (unseen x, y too: df is floored at 1).
    # Image 2: unigrams share e, f: 2 / (2 * 2) = 1/2; bigrams share "e f": 1 / (sqrt 3 * sqrt 3) = 1/3; no 3- or
    # 4-gram; equal lengths, so no penalty: 10 * (1/2 + 1/3) / 4 = 25/12. Image 1 scores 10: mean (10 + 25/12) / 2.
    cider = caption_scores(["a b c d", "e f x y"], refs)["cider_d"]
    assert cider == pytest.approx((10 + 25 / 12) / 2)


# ---------------------------------------------------------------- minimum sample counts


def test_every_metric_finite_on_two_samples_or_names_its_minimum():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    figures = [
        frechet_distance(a, b),
        *kernel_inception_distance(a, b, subset_size=2, subsets=5).values(),
        *precision_recall(a, b, k=1).values(),
        clip_score(_unit(g, 2), _unit(g, 2)),
        r_precision(_unit(g, 2), _unit(g, 2), ["x", "y"], R=2)["r_precision"],
        *caption_scores(["a red circle", "a blue square"], [["a red circle"], ["a green square"]]).values(),
    ]
    assert all(math.isfinite(f) for f in figures)
    with pytest.raises(ValueError, match="FD needs at least 2 samples per set, got 1 and 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match=r"KID subset size must lie in \[2, 2\]"):
        kernel_inception_distance(a, b, subset_size=3)
    with pytest.raises(ValueError, match="precision/recall with k = 3 needs at least 4 samples"):
        precision_recall(a, b, k=3)
    with pytest.raises(ValueError, match="CIDEr-D's idf.* needs at least 2 samples"):
        caption_scores(["a red circle"], [["a red circle"]])
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(a, torch.full((2, 8), math.nan))
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(a, b[:, :4])


# ---------------------------------------------------------------- open_clip from local files


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip model saved in open_clip's hub layout: (model, folder)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, folder


def _reference_embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own normalised image and text embeddings of _images() and TEXTS, through open_clip's public API."""
    import open_clip

    preprocess = open_clip.image_transform(TINY_CLIP["vision_cfg"]["image_size"], is_train=False)
    tokens = open_clip.tokenize(TEXTS, context_length=TINY_CLIP["text_cfg"]["context_length"])
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(im) for im in _images()]), normalize=True)
        return images, model.encode_text(tokens, normalize=True)


def test_open_clip_folder_loads_offline_and_equals_the_models_outputs(tiny_clip):
    model, folder = tiny_clip
    encoder = OpenCLIPEncoder.from_local(folder)
    images, texts = encoder.embed_images(_images()), encoder.embed_texts(TEXTS)
    assert images.shape == (2, 16) and texts.shape == (3, 16)
    assert torch.isfinite(images).all() and torch.isfinite(texts).all()
    assert torch.allclose(images.norm(dim=-1), torch.ones(2)) and torch.allclose(texts.norm(dim=-1), torch.ones(3))
    ref_images, ref_texts = _reference_embeddings(model)
    assert torch.allclose(images, ref_images, atol=1e-6) and torch.allclose(texts, ref_texts, atol=1e-6)
    features = encoder.image_features(_images())  # before normalisation
    assert torch.allclose(torch.nn.functional.normalize(features, dim=-1), images, atol=1e-6)
    assert str(folder / "open_clip_model.safetensors") in encoder.name and encoder.has_text


def test_open_clip_config_and_checkpoint_forms_load_the_same_model(tiny_clip, tmp_path):
    import open_clip

    model, folder = tiny_clip
    weights = folder / "open_clip_model.safetensors"
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))  # a bare config, as in open_clip's model_configs/
    (tmp_path / "mmdiff-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "mmdiff-test-tiny-clip.json")  # registered as a "built-in" name
    torch.save(model.state_dict(), tmp_path / "weights.pth")  # read back with weights_only=True
    _, ref_texts = _reference_embeddings(model)
    for source, checkpoint in [
        (TINY_CLIP, weights),
        (tmp_path / "tiny.json", weights),
        (folder, tmp_path / "weights.pth"),
        ("mmdiff-test-tiny-clip", weights),
    ]:
        encoder = OpenCLIPEncoder.from_local(source, checkpoint)
        assert torch.allclose(encoder.embed_texts(TEXTS), ref_texts, atol=1e-6), source
        assert str(checkpoint) in encoder.name


def test_open_clip_bad_input_names_the_file(tiny_clip, tmp_path):
    _, folder = tiny_clip
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OpenCLIPEncoder.from_local(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        OpenCLIPEncoder.from_local(TINY_CLIP, tmp_path / "missing.safetensors")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(ValueError, match="no_weights: no weights file"):
        OpenCLIPEncoder.from_local(tmp_path / "no_weights")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="open_clip_config.json: not a JSON open_clip config"):
        OpenCLIPEncoder.from_local(tmp_path / "broken", folder / "open_clip_model.safetensors")
    wider = {**TINY_CLIP, "embed_dim": 8}  # the tiny checkpoint does not fit this architecture
    with pytest.raises(ValueError, match="open_clip_model.safetensors: not a valid checkpoint"):
        OpenCLIPEncoder.from_local(wider, folder / "open_clip_model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.safetensors: not a valid checkpoint"):
        OpenCLIPEncoder.from_local(TINY_CLIP, tmp_path / "junk.safetensors")
    torch.save({"visual.proj": _Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth: not a readable weights file"):
        OpenCLIPEncoder.from_local(TINY_CLIP, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="neither a built-in open_clip model name"):
        OpenCLIPEncoder.from_local("ViT-Nonexistent", folder / "open_clip_model.safetensors")
    with pytest.raises(ValueError, match="ViT-B-32: give its weights file as checkpoint_path"):
        OpenCLIPEncoder.from_local("ViT-B-32")
    with pytest.raises(ValueError, match="hub names would download"):
        OpenCLIPEncoder.from_local("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


# ---------------------------------------------------------------- InceptionV3 from local files


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random (He-initialised) weights, saved as .safetensors and as .pth."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    # its constructor always loads weights: skip that to keep the random init (a path is given, so no download)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], empty)
    for module in extractor.modules():
        if isinstance(module, torch.nn.Conv2d):  # He init keeps activations O(1) through 90 layers (default: ~1e-8)
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    state = {k: v.contiguous() for k, v in extractor.state_dict().items()}
    folder = tmp_path_factory.mktemp("inception")
    save_file(state, str(folder / "inception.safetensors"))
    torch.save(state, folder / "inception.pth")
    return folder


def test_inception_loads_safetensors_and_pth_to_identical_pool_features(inception_weights):
    images = [*_images(), _images()[0]]  # two sizes: batched by size, no resizing outside the extractor
    first = InceptionEncoder.from_local(inception_weights / "inception.safetensors")
    features = first.image_features(images)
    assert features.shape == (3, 2048) and torch.isfinite(features).all() and features.abs().mean() > 1e-3
    assert torch.equal(features[0], features[2]) and not torch.allclose(features[0], features[1])
    second = InceptionEncoder.from_local(inception_weights / "inception.pth")  # torch.load(weights_only=True)
    assert torch.equal(second.image_features(images), features)
    assert not first.has_text and "inception.safetensors" in first.name
    with pytest.raises(ValueError, match="InceptionV3 has no text side"):
        first.embed_texts(["a red circle"])


def test_inception_pth_converts_to_identical_safetensors(inception_weights, tmp_path):
    from safetensors.torch import load_file

    converted = inception_weights_to_safetensors(
        inception_weights / "inception.pth", tmp_path / "converted.safetensors"
    )
    original = load_file(str(inception_weights / "inception.safetensors"))
    tensors = load_file(str(converted))
    assert tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in original)


def test_inception_bad_input_names_the_file(inception_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        InceptionEncoder.from_local(tmp_path / "absent.safetensors")
    torch.save({"weight": _Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth: not a readable weights file"):
        InceptionEncoder.from_local(tmp_path / "pickled.pth")
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: not InceptionV3 weights"):
        InceptionEncoder.from_local(tmp_path / "other.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.npz: weights must be"):
        InceptionEncoder.from_local(tmp_path / "weights.npz")
