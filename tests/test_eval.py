"""The shapes benchmark: the exact evaluator, FD, caption metrics and NLL, evaluate() and the guidance sweep."""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from mmdiff.data.shapes import (
    left_first_caption,
    parse_caption,
    render_objects,
    render_scene,
    scene_from_attributes,
    write_shapes_shards,
)
from mmdiff.eval import (
    caption_metrics,
    caption_nll,
    detect_objects,
    frechet_distance,
    load_real_scenes,
    render_prompt,
    score_image,
)
from mmdiff.eval.benchmarks.shapes import ShapesBenchmark
from mmdiff.eval.benchmarks.shapes.captions import relation_direction
from mmdiff.eval.benchmarks.shapes.diversity import layout_descriptor, mean_pairwise_distance
from mmdiff.eval.caption_metrics import nll_references, trained_caption_policy
from mmdiff.pipelines import MMDiffImageToTextPipeline
from mmdiff.pipelines.factory import load_pipeline

# A random caption names the same normalised scene as another random one with probability sum_s p(s)^2: half the
# scenes are one of 36 single objects, half one of 36 * 35 * 2 ordered pairs with a normalised relation, so chance
# is about 0.25 / 36 + 0.25 / 2520 ~= 0.007. With 300 images the expected number of matches is ~2.
CHANCE_BOUND = 0.03


def _scenes(num: int, seeds: tuple[int, ...], image_size: int = 32):
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        out += [render_scene(rng, image_size) for _ in range(num // len(seeds))]
    return out


@pytest.fixture(scope="module")
def real_scenes():
    """300 rendered 32 px scenes from three generator seeds: (image, attributes)."""
    return _scenes(300, (0, 1, 2))


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    """Real 32 px validation shards, as `mmdiff data shapes` writes them (random phrasings in txt)."""
    root = tmp_path_factory.mktemp("eval_shapes")
    stats = write_shapes_shards(root, 400, image_size=32, seed=7, val_fraction=0.5, shard_size=100)
    return str(root / "val"), stats


# ---------------------------------------------------------------- the evaluator on real images


def test_evaluator_scores_real_rendered_images(real_scenes):
    correct = [score_image(image, attrs["canonical"])["correct"] for image, attrs in real_scenes]
    assert sum(correct) / len(correct) >= 0.99


@pytest.mark.parametrize("blur", [0.0, 0.7])
def test_evaluator_reads_shapes_off_the_pixel_grid(real_scenes, blur):
    # Generated images place objects anywhere, not on the generator's integer grid, and with softer edges. The same
    # scenes moved by a random sub-pixel offset (and blurred) must read the same: a bounding-box fill ratio read 41 of
    # 96 small squares placed off the grid as circles.
    rng = random.Random(3)
    correct, squares = [], []
    for _, attrs in real_scenes:
        dx, dy = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
        objects = [{**o, "center": [o["center"][0] + dx, o["center"][1] + dy]} for o in attrs["objects"]]
        image = render_objects(objects, 32)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        score = score_image(image, attrs["canonical"])
        correct.append(score["correct"])
        squares += [score["shapes"] for o in attrs["objects"] if o["shape"] == "square"]
    assert sum(correct) / len(correct) >= 0.99
    assert len(squares) > 50 and sum(squares) / len(squares) >= 0.99


def test_evaluator_reads_positions_and_any_size():
    for image, attrs in _scenes(40, (3,), image_size=64):
        objects = detect_objects(image)
        assert len(objects) == len(attrs["objects"])
        for truth in attrs["objects"]:
            nearest = min(objects, key=lambda o: np.hypot(*np.subtract(o["center"], truth["center"])))
            assert np.allclose(nearest["center"], truth["center"], atol=0.5)
            assert nearest["extent"] == truth["extent"]
    scored = [score_image(image, attrs["captions"][-1])["correct"] for image, attrs in _scenes(60, (4,), 64)]
    assert sum(scored) / len(scored) >= 0.99


def test_evaluator_rejects_extra_missing_and_wrong_objects(real_scenes):
    image, attrs = next((im, a) for im, a in real_scenes if len(a["objects"]) == 2)
    first = attrs["objects"][0]
    only_first = f"a {first['size']} {first['color']} {first['shape']}"
    assert not score_image(image, only_first)["correct"]  # an extra object
    assert not score_image(image, only_first)["count"]
    blank = image.copy()
    blank.paste((255, 255, 255), (0, 0, *blank.size))
    assert not score_image(blank, attrs["canonical"])["correct"]  # nothing drawn
    assert not score_image(image, "not a shapes caption")["correct"]


def test_perfect_model_scores_at_least_99_percent(val_shards):
    images, _, _ = load_real_scenes(val_shards[0])
    from mmdiff.data.shards import iterate_records

    own_captions = [caption for _, _, caption, _ in iterate_records(val_shards[0])]  # any phrasing, as stored
    report = ShapesBenchmark().image_metrics(images, own_captions, image_size=32, seed=0)
    assert report["num"] == 200
    assert report["prompt_accuracy"] >= 0.99


def test_shuffled_captions_score_near_chance(real_scenes):
    images = [image for image, _ in real_scenes]
    captions = [attrs["canonical"] for _, attrs in real_scenes]
    random.Random(0).shuffle(captions)
    report = ShapesBenchmark().image_metrics(images, captions, image_size=32, seed=0)
    assert report["prompt_accuracy"] <= CHANCE_BOUND
    assert 0.35 <= report["count"] <= 0.65  # one vs two objects is a fair coin


# ---------------------------------------------------------------- Fréchet distance and diversity


def test_frechet_distance_exact_cases():
    g = np.random.default_rng(0)
    a = g.normal(size=(400, 6)) @ g.normal(size=(6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(6.0)
    # same covariance: only the mean term remains
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-8)
    # b = 2a: Tr(S + 4S - 2 * 2S) = Tr(S), plus the mean term |mu|^2
    expected = float((a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)


def test_layout_diversity_of_real_renders():
    prompt = "a small red circle left of a large blue square"
    renders = render_prompt(prompt, 12, 32, seed=0)
    assert all(score_image(im, prompt)["correct"] for im in renders)
    descriptors = [layout_descriptor(im, prompt) for im in renders]
    assert all(d is not None and d.shape == (6,) for d in descriptors)
    assert mean_pairwise_distance(descriptors) > 0.05  # random layouts differ
    assert mean_pairwise_distance([descriptors[0]] * 5) == 0.0  # a collapsed model has no diversity


# ---------------------------------------------------------------- captions


def test_caption_metrics_true_and_shuffled(real_scenes):
    scenes = [scene_from_attributes(a) for _, a in real_scenes]
    canonical = [a["canonical"] for _, a in real_scenes]
    rephrased = [a["captions"][-1] for _, a in real_scenes]
    perfect = caption_metrics(rephrased, scenes, canonical)
    assert all(perfect[k] == 1.0 for k in ("count", "colors", "shapes", "sizes", "relation", "all", "parse_rate"))
    assert caption_metrics(canonical, scenes, canonical)["exact_match"] == 1.0
    shuffled = list(canonical)
    random.Random(1).shuffle(shuffled)
    low = caption_metrics(shuffled, scenes, canonical)
    assert low["all"] <= CHANCE_BOUND and low["exact_match"] <= CHANCE_BOUND
    assert caption_metrics(["garbage"], scenes[:1], canonical[:1])["all"] == 0.0


def test_caption_nll_bound(pipe):
    images = [im.resize((16, 16)) for im, _ in _scenes(3, (6,))]
    captions = ["a small red circle above a large blue square", "there is a small green triangle", "a"]
    with_image = caption_nll(pipe, images, captions, num_levels=2, seed=0)
    null = caption_nll(pipe, None, captions, num_levels=2, seed=0)
    assert math.isfinite(with_image) and with_image > 0 and math.isfinite(null) and null > 0
    # w = 0 is exactly the unconditional model: the guided bound at w = 0 equals the null-context bound
    assert caption_nll(pipe, images, captions, guidance_scale=0.0, num_levels=2, seed=0) == pytest.approx(
        null, rel=1e-4
    )
    # fixed seed: the same masks every call
    assert caption_nll(pipe, images, captions, num_levels=2, seed=0) == with_image


def test_relation_direction_probe_bookkeeping(pipe):
    # the probe masks the relation word and compares the true word with its opposite: giving it the opposite
    # captions must flip every margin, and captions without a relation are left out
    with torch.no_grad():  # move off the zero-initialised heads so that the logits depend on the inputs
        for param in pipe.transformer.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    images = [im.resize((16, 16)) for im, _ in _scenes(3, (6,))]
    captions = [
        "a small red circle above a large blue square",
        "a large yellow circle to the left of a small purple triangle",
        "there is a small green triangle",
    ]
    swapped = [captions[0].replace("above", "below"), captions[1].replace("left", "right"), captions[2]]
    probe = relation_direction(pipe, images, captions)
    flipped = relation_direction(pipe, images, swapped)
    assert probe["num"] == flipped["num"] == 2
    assert flipped["mean_margin"] == pytest.approx(-probe["mean_margin"], abs=1e-5) and probe["mean_margin"] != 0
    assert flipped["accuracy"] == pytest.approx(1 - probe["accuracy"])
    assert 0 <= probe["null_accuracy"] <= 1 and {"left_right", "above_below"} <= set(probe)


# ---------------------------------------------------------------- evaluate() and the sweep on a tiny random pipeline


@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory):
    """16 px validation shards for the 16 px test pipeline, and a briefly trained 16 px eval encoder."""
    from mmdiff.eval.features.eval_encoder import train_eval_encoder

    root = tmp_path_factory.mktemp("tiny_val")
    write_shapes_shards(root / "data", 8, image_size=16, seed=0, val_fraction=0.5, shard_size=4)
    write_shapes_shards(root / "enc_data", 96, image_size=16, seed=1, val_fraction=0.4, shard_size=32)
    train_eval_encoder(root / "enc_data" / "train", root / "enc_data" / "val", root / "enc", steps=3, batch_size=16)
    return str(root / "data" / "val"), root / "enc"


def test_evaluate_writes_a_reproducible_record(saved_pipe, tiny_val, tmp_path):
    from mmdiff.eval import evaluate

    shards, encoder = tiny_val
    out = tmp_path / "eval.json"
    result = evaluate(
        saved_pipe, shards, num_images=3, num_captions=2, num_inference_steps=2, caption_steps=2, encoder=encoder,
        diversity_prompts=1, diversity_samples=2, nll_levels=1, batch_size=4, device="cpu", out=out,
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert record["prompts"] == result["prompts"] and len(record["prompts"]) == 3
    assert all(parse_caption(p) is not None for p in record["prompts"])
    assert record["model"] == str(saved_pipe) and record["seed"] == 0 and "command" in record
    t2i, i2t = record["text_to_image"], record["image_to_text"]
    assert 0.0 <= t2i["prompt_accuracy"] <= 1.0 and math.isfinite(t2i["fd"])
    assert math.isfinite(i2t["nll_image_bits"]) and math.isfinite(i2t["nll_null_bits"])
    assert i2t["nll_references"] == "canonical" and "skipped" not in i2t["relation_direction"]


def test_left_first_models_are_scored_on_left_first_references(saved_pipe, tiny_val, tmp_path):
    # a captioner trained with data.text_task_phrasings=left_first (its `caption_phrasing` setting in
    # model_index.json) gets its NLL bound on the left-first phrasings of the references, and no relation-direction probe
    from mmdiff.eval import evaluate

    assert left_first_caption("a small red circle right of a large blue square") == (
        "a large blue square left of a small red circle"
    )
    assert (
        left_first_caption("a small red circle below a large blue square")
        == "a large blue square above a small red circle"
    )
    for unchanged in ("a small red circle above a large blue square", "a small red circle", "two red circles"):
        assert left_first_caption(unchanged) == unchanged
    assert trained_caption_policy(MMDiffImageToTextPipeline.from_pretrained(saved_pipe)).name == "all"
    index_path = saved_pipe / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "caption_phrasing": "left_first"}))
    loaded = MMDiffImageToTextPipeline.from_pretrained(saved_pipe)
    assert trained_caption_policy(loaded).name == "left_first"
    canonical = ["a small red circle right of a large blue square", "a small red circle"]
    assert nll_references(loaded, canonical) == ([left_first_caption(canonical[0]), canonical[1]], "left_first")

    _, encoder = tiny_val
    write_shapes_shards(tmp_path / "data", 24, image_size=16, seed=2, val_fraction=0.5, shard_size=12)
    shards = str(tmp_path / "data" / "val")
    images, _, refs = load_real_scenes(shards, 12)
    left_first = [left_first_caption(c) for c in refs]
    assert left_first != refs  # 4 of these 12 references say "right of" or "below"
    result = evaluate(
        saved_pipe, shards, num_images=2, num_captions=12, num_inference_steps=2, caption_steps=2, encoder=encoder,
        diversity_prompts=1, diversity_samples=2, nll_levels=1, batch_size=12, device="cpu",
    )  # fmt: skip
    i2t = result["image_to_text"]
    assert i2t["nll_references"] == "left_first" and i2t["relation_direction"]["num"] == 0
    pipe = load_pipeline(saved_pipe, device="cpu", progress=False)
    assert i2t["nll_image_bits"] == pytest.approx(caption_nll(pipe, images, left_first, 1.0, 1, 12, 0), rel=1e-5)
    assert i2t["nll_image_bits"] != pytest.approx(caption_nll(pipe, images, refs, 1.0, 1, 12, 0))


def test_sweep_has_one_finite_row_per_scale_and_writes_figures(saved_pipe, tiny_val, tmp_path):
    from mmdiff.eval import sweep

    shards, encoder = tiny_val
    out = tmp_path / "sweep"
    record = sweep(
        saved_pipe, shards, scales=[1.0, 3.0], caption_scales=[1.0, 2.0], num_prompts=2, images_per_prompt=2,
        num_captions=2, num_inference_steps=2, caption_steps=2, guidance_interval=(0.2, 0.8), encoder=encoder,
        nll_levels=1, batch_size=8, device="cpu", out_dir=out,
    )  # fmt: skip
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 3.0]
    for row in rows:
        for key in ("prompt_accuracy", "fd", "clip_score", "prompt_accuracy_interval", "fd_interval"):
            assert math.isfinite(float(row[key])), key
    caption_rows = list(csv.DictReader(open(out / "captions.csv")))
    assert len(caption_rows) == 2
    assert all(math.isfinite(float(r["nll_image_bits"])) and math.isfinite(float(r["all"])) for r in caption_rows)
    for name in ("grid.png", "sweep_plot.png", "sweep.json"):
        assert (out / name).stat().st_size > 0
    assert set(record["interval"]) == {"off", "on"}
    # the interval run skips the unconditional rows outside (0.2, 0.8): fewer transformer rows
    assert record["interval"]["on"]["forward_rows"] < record["interval"]["off"]["forward_rows"]


def test_cli_parses_the_eval_commands():
    from mmdiff.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sweep", "--model", "m", "--shards", "s", "--scales", "1", "2"])
    assert args.scales == [1.0, 2.0] and args.nll_levels == 4 and args.interval == [0.2, 0.8]
    args = parser.parse_args(["eval", "--model", "m", "--shards", "s", "--out", "r.json"])
    assert args.num_images == 500 and args.num_captions == 500
    args = parser.parse_args(["eval-encoder", "--shards", "t", "--val-shards", "v", "--out", "d"])
    assert args.shards == "t" and args.val_shards == "v" and args.image_size is None


def test_sweep_compares_methods_at_every_scale(saved_pipe, tiny_val, tmp_path, capsys):
    # mmdiff sweep --guidance-methods: the same prompts and seeds for every method; a table, grid and plot of
    # method x scale; the CFG rows are the sweep's own interval-off rows
    from mmdiff.cli import main
    from mmdiff.pipelines import MMDiffTextToImagePipeline

    weak_folder = tmp_path / "weak"
    weak_pipe = MMDiffTextToImagePipeline.from_pretrained(saved_pipe)
    with torch.no_grad():  # a weaker model of the same setup: other transformer weights, the same VAE and tokenizer
        generator = torch.Generator().manual_seed(3)
        for param in weak_pipe.transformer.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    weak_pipe.save_pretrained(weak_folder)
    shards, encoder = tiny_val
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(saved_pipe), "--shards", str(shards), "--encoder", str(encoder), "--out", str(out)]
    args += ["--scales", "1", "3", "--caption-scales", "1", "--num-prompts", "2", "--images-per-prompt", "2"]
    args += ["--num-captions", "2", "--steps", "2", "--nll-levels", "1", "--no-interval", "--device", "cpu"]
    args += ["--guidance-methods", "cfg", "apg", "cfg_zero_star", "autoguidance", "--weak-model", str(weak_folder)]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "methods.csv")))
    assert [(r["guidance"], float(r["guidance_scale"])) for r in rows] == [
        (m, w) for m in ("cfg", "apg", "cfg_zero_star", "autoguidance") for w in (1.0, 3.0)
    ]
    sweep_rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["fd"] for r in rows[:2]] == [r["fd"] for r in sweep_rows]
    assert rows[0]["fd"] == rows[2]["fd"] == rows[6]["fd"]  # w = 1: every method is the conditional model alone
    assert rows[1]["fd"] != rows[7]["fd"]  # (this untrained model predicts 0 with or without a condition)
    for name in ("methods_grid.png", "methods_plot.png"):
        assert (out / name).stat().st_size > 0
    assert "autoguidance w=3" in capsys.readouterr().out
    assert main([*args[:-4], "--guidance-methods", "autoguidance"]) == 2
    assert "needs --weak-model" in capsys.readouterr().err


def test_a_pipeline_and_its_folder_evaluate_the_same(saved_pipe, tiny_val):
    # the settings that shape an evaluation (sampling defaults, caption phrasing) are the pipeline's own config, so
    # the folder and the object loaded from it give one record
    from mmdiff.eval import evaluate

    index_path = saved_pipe / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(caption_phrasing="left_first", sample_defaults={**index["sample_defaults"], "num_inference_steps": 2})
    index_path.write_text(json.dumps(index))
    shards, encoder = tiny_val
    kwargs = dict(num_images=2, num_captions=2, caption_steps=2, encoder=encoder, diversity_prompts=1,
                  diversity_samples=2, nll_levels=1, batch_size=4, device="cpu")  # fmt: skip
    from_folder = evaluate(saved_pipe, shards, **kwargs)
    from_object = evaluate(load_pipeline(saved_pipe, device="cpu", progress=False), shards, **kwargs)

    def results(record):  # what was measured and with which settings: no name, command line or timings
        if isinstance(record, dict):
            return {k: results(v) for k, v in record.items() if k not in ("model", "command") and "seconds" not in k}
        return record

    from_folder, from_object = results(from_folder), results(from_object)
    assert from_folder["image_to_text"]["nll_references"] == "left_first"
    assert from_folder["num_inference_steps"] == 2  # the folder's sampling default
    assert json.dumps(from_folder, sort_keys=True, default=str) == json.dumps(from_object, sort_keys=True, default=str)
