"""`mmdiff demo` (the shipped-model path) on a tiny saved pipeline: every promised file is written and readable."""

from __future__ import annotations

import csv
import json
import math

from PIL import Image

from mmdiff.cli import main
from mmdiff.paths import VAL_SAMPLE, find_repo_file


def test_shipped_val_sample_is_held_out_validation_data():
    from mmdiff.data.shards import iterate_records

    records = list(iterate_records(str(find_repo_file(VAL_SAMPLE))))
    assert len(records) == 64
    assert all(key.startswith("val-") and image.size == (32, 32) and attrs for key, image, _, attrs in records)


def test_demo_writes_images_captions_and_a_sweep(saved_pipe, tmp_path, capsys):
    out = tmp_path / "outputs"
    assert main(["demo", "--model", str(saved_pipe), "--out", str(out)]) == 0
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 32 and Image.open(images[0]).size == (16, 16)  # 8 prompts x 4, at the pipeline's size
    assert len(json.loads((out / "images" / "prompts.json").read_text())) == 8
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 16 and all(set(c) == {"key", "reference", "generated"} for c in captions)
    assert all(isinstance(c["generated"], str) and "<mask>" not in c["generated"] for c in captions)
    for name in ("generated_grid.png", "captioned_images.png", "sweep/grid.png", "sweep/sweep_plot.png"):
        assert Image.open(out / name).size[0] > 100, name
    rows = list(csv.DictReader(open(out / "sweep" / "sweep.csv")))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 2.0, 3.0, 5.0]
    assert all(math.isfinite(float(r["prompt_accuracy"])) for r in rows)
    printed = capsys.readouterr().out
    assert "evaluator:" in printed and "small guidance sweep" in printed


def test_demo_refuses_a_missing_model_folder(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-sweep"]) == 2
    assert "nope" in capsys.readouterr().err


def test_shipped_model_loads_and_reads_held_out_images(tmp_path):
    """The shipped pipeline folder loads through the real (safetensors-only) loader and is the trained model: on 16
    held-out scenes its captions get count, colours and sizes right far above chance (docs/results/shipped-model.md: 99-100 % on 512)."""
    from mmdiff.eval import evaluate
    from mmdiff.paths import SHIPPED_MODEL

    result = evaluate(
        find_repo_file(SHIPPED_MODEL), str(find_repo_file(VAL_SAMPLE)), num_images=4, num_captions=16,
        guidance_scale=1.5, caption_guidance_scale=1.5, num_inference_steps=10, diversity_prompts=1,
        diversity_samples=2, nll_levels=1, batch_size=16, device="cpu", out=tmp_path / "eval.json",
    )  # fmt: skip
    captions = result["image_to_text"]
    assert captions["num"] == 16 and captions["parse_rate"] == 1.0
    assert captions["count"] >= 0.9 and captions["colors"] >= 0.8 and captions["sizes"] >= 0.8
    # the null context knows far less about a caption than the image does
    assert captions["nll_image_bits"] < 0.6 * captions["nll_null_bits"]
    assert math.isfinite(result["text_to_image"]["fd"])
