"""Generic evaluation on any data: the figures can be trusted, eval and sweep run on non-shapes shards, training
logs them, and bad input is refused with the problem named."""

from __future__ import annotations

import csv
import io
import json
import math
import random

import pytest
import torch
from conftest import write_tar
from PIL import Image

from mmdiff.cli import main
from mmdiff.data.shapes import write_shapes_shards
from mmdiff.eval.benchmarks.shapes.diversity import render_prompt
from mmdiff.eval.features.eval_encoder import load_eval_encoder, train_eval_encoder
from mmdiff.eval.generic import image_space_metrics
from mmdiff.eval.metrics import r_precision
from mmdiff.eval.records import load_eval_records

TINY = {"channels": (8, 16), "feature_dim": 32, "embed_dim": 16, "text_width": 16, "text_layers": 1, "text_heads": 2}
R = 8
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 40)}


def _encoder(train, val, out, **kw):
    kw = {"steps": 150, "batch_size": 32, "lr": 3e-3, "gallery_size": R, "model_config": TINY, "progress": False, **kw}
    return train_eval_encoder(train, val, out, **kw)


@pytest.fixture(scope="module")
def shapes_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    write_shapes_shards(root / "data", 600, image_size=16, seed=0, val_fraction=0.3, shard_size=100)
    record = _encoder(root / "data" / "train", root / "data" / "val", root / "enc")
    return root, load_eval_encoder(root / "enc"), record


def test_real_images_score_like_the_encoders_retrieval_and_shuffled_prompts_like_chance(shapes_encoder):
    root, encoder, record = shapes_encoder
    records = load_eval_records(str(root / "data" / "val"), 120)
    prompts = records.prompts[:60]
    # a perfect generator: fresh real renders of each prompt (new layouts), against the records' real images
    drawn = [render_prompt(p, 1, 16, seed=1000 + i)[0] for i, p in enumerate(prompts)]
    image_emb, text_emb = encoder.embed_images(drawn), encoder.embed_texts(prompts)
    own = r_precision(image_emb, text_emb, prompts, R=R, seed=0)["r_precision"]
    held_out = record["retrieval"]["image_to_text_top1"]
    assert held_out > 3 / R  # the encoder learnt something, so the comparison means something
    assert abs(own - held_out) <= 0.2, (own, held_out)
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    chance = [
        r_precision(image_emb, encoder.embed_texts(shuffled), shuffled, R=R, seed=s)["r_precision"] for s in range(5)
    ]
    assert abs(sum(chance) / len(chance) - 1 / R) <= 0.1
    # FD of the perfect generator is near the real-vs-real floor (other records of the same data), and far below the
    # FD of images that are wrong (colours inverted)
    figures = image_space_metrics(encoder, drawn, records.images[:60], prompts, records.images[60:120], seed=0)
    inverted = [im.point(lambda v: 255 - v) for im in drawn]
    wrong = image_space_metrics(encoder, inverted, records.images[:60], prompts, seed=0)
    assert figures["fd"] < 2.0 * figures["fd_real_floor"] and wrong["fd"] > 3 * figures["fd"]
    assert figures["precision"] > wrong["precision"] and figures["clip_score"] > wrong["clip_score"]


def _stripes(path, num: int, size: int, seed: int) -> None:
    """Non-shapes data: stripes in two colours, captioned in words the shapes parser does not know."""
    rng, members = random.Random(seed), []
    for i in range(num):
        a, b = rng.sample(list(COLOURS), 2)
        vertical = rng.random() < 0.5
        image = Image.new("RGB", (size, size), COLOURS[a])
        for k in range(0, size, 4):
            box = (k, 0, k + 1, size - 1) if vertical else (0, k, size - 1, k + 1)
            image.paste(COLOURS[b], box)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        caption = f"{'vertical' if vertical else 'horizontal'} stripes in {a} and {b}"
        members += [(f"{i:05d}.png", buf.getvalue()), (f"{i:05d}.txt", caption.encode())]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(path, members)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    _stripes(root / "train" / "s-000000.tar", 200, 16, 0)
    _stripes(root / "val" / "s-000000.tar", 48, 16, 1)
    _encoder(root / "train", root / "val", root / "enc", steps=40)
    return root


def test_eval_and_sweep_run_on_data_that_is_not_shapes(saved_pipe, stripes, tmp_path):
    from mmdiff.eval import evaluate, sweep

    shards, enc = str(stripes / "val"), stripes / "enc"
    result = evaluate(
        saved_pipe, shards, num_images=6, num_captions=4, num_inference_steps=2, caption_steps=2, encoder=enc,
        nll_levels=1, batch_size=8, device="cpu", out=tmp_path / "eval.json",
    )  # fmt: skip
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["benchmark"] is None and record["encoders"] == {"eval_encoder": result["encoders"]["eval_encoder"]}
    t2i, i2t = record["text_to_image"], record["image_to_text"]
    for key in ("fd", "fd_real_floor", "kid", "precision", "recall", "clip_score", "r_precision"):
        assert math.isfinite(t2i[key]), key
    assert "prompt_accuracy" not in t2i  # no exact benchmark for these data
    for key in ("bleu4", "cider_d", "rouge_l", "clip_score", "nll_image_bits", "nll_null_bits"):
        assert math.isfinite(i2t[key]), key
    out = tmp_path / "sweep"
    sweep(
        saved_pipe, shards, scales=[1.0, 3.0], caption_scales=[1.0, 2.0], num_prompts=3, images_per_prompt=2,
        num_captions=4, num_inference_steps=2, caption_steps=2, guidance_interval=None, encoder=enc, nll_levels=1,
        batch_size=8, device="cpu", out_dir=out,
    )  # fmt: skip
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 3.0]
    assert all(math.isfinite(float(r["fd"])) and math.isfinite(float(r["clip_score"])) for r in rows)
    captions = list(csv.DictReader(open(out / "captions.csv")))
    assert all(math.isfinite(float(r["cider_d"])) for r in captions)
    assert (out / "sweep_plot.png").stat().st_size > 0 and (out / "grid.png").stat().st_size > 0


def test_bad_evaluation_input_names_the_problem_and_writes_nothing(
    saved_pipe, stripes, shapes_encoder, tmp_path, capsys
):
    out = tmp_path / "eval.json"
    base = ["eval", "--model", str(saved_pipe), "--num-images", "2", "--num-captions", "2", "--steps", "2"]
    base += ["--caption-steps", "2", "--nll-levels", "1", "--out", str(out)]
    shards = ["--shards", str(stripes / "val")]
    cases = [
        # an encoder trained on other data (shapes words) for stripes captions
        ([*shards, "--encoder", str(shapes_encoder[0] / "enc")], "trained on other data"),
        ([*shards, "--encoder", str(tmp_path / "missing")], "not found"),
        ([*shards, "--encoder", str(stripes / "enc"), "--inception", str(tmp_path / "none.pth")], "not found"),
        ([*shards, "--encoder", str(stripes / "enc"), "--num-images", "500"], "holds 48 usable records"),
        ([*shards, "--encoder", str(stripes / "enc"), "--num-images", "0"], "num_images must be a positive integer"),
    ]
    nocaption = tmp_path / "nocap" / "x-000000.tar"
    nocaption.parent.mkdir()
    write_tar(nocaption, [("a.png", b"\x89PNG"), ("b.txt", b"")])
    cases.append((["--shards", str(nocaption)], "no usable image-caption records"))
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's loading bar, if it loaded
        assert last.startswith("mmdiff eval: error:") and message in last, last
        assert not out.exists()


def test_an_encoder_trained_at_another_resolution_is_refused(saved_pipe, tmp_path, capsys):
    _stripes(tmp_path / "big" / "train" / "s-000000.tar", 64, 32, 0)
    _stripes(tmp_path / "big" / "val" / "s-000000.tar", 40, 32, 1)
    _encoder(tmp_path / "big" / "train", tmp_path / "big" / "val", tmp_path / "enc32", steps=2)
    _stripes(tmp_path / "small" / "s-000000.tar", 8, 16, 2)
    args = [
        "eval",
        "--model",
        str(saved_pipe),
        "--shards",
        str(tmp_path / "small"),
        "--encoder",
        str(tmp_path / "enc32"),
    ]
    assert main([*args, "--num-images", "2", "--num-captions", "2", "--out", str(tmp_path / "e.json")]) == 2
    assert "trained at 32 px" in capsys.readouterr().err and not (tmp_path / "e.json").exists()


def test_training_logs_the_generic_evaluation_and_plot_draws_it(tmp_path):
    from mmdiff.config import load_config
    from mmdiff.eval.in_training import TrainingEvalHooks
    from mmdiff.training.trainer import train

    write_shapes_shards(tmp_path / "data", 96, image_size=32, seed=0, val_fraction=0.25, shard_size=32)
    _encoder(tmp_path / "data" / "train", tmp_path / "data" / "val", tmp_path / "enc", steps=2, gallery_size=4)
    overrides = [
        f"data.train_shards={tmp_path / 'data' / 'train'}", f"data.val_shards={tmp_path / 'data' / 'val'}",
        "data.max_length=12", "data.shuffle_buffer=16", "vae.block_out_channels=[16,16,16]", "vae.train_steps=2",
        "vae.batch_size=8", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.text_encoder_depth=1",
        f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8", "train.max_steps=4", "train.warmup_steps=1",
        "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=4", f"train.eval_encoder={tmp_path / 'enc'}",
        "train.eval_images=4", "train.eval_sampling_steps=2",
    ]  # fmt: skip
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="train.eval_encoder is evaluated by mmdiff's evaluation harness"):
        train(load_config(None, overrides))  # the training core alone does not evaluate images
    train(load_config(None, overrides), hooks=TrainingEvalHooks())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_fd" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(math.isfinite(r["eval_fd"]) and math.isfinite(r["eval_clip_score"]) for r in evals)
    assert main(["plot", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "training_plot.png").is_file()
