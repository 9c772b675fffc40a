"""`mmdiff demo` (the shipped-model path) on a tiny saved pipeline: every promised file is written and readable."""

from __future__ import annotations

import csv
import json
import math

from PIL import Image

from mmdiff.cli import main
from mmdiff.paths import VAL_SAMPLE, find_repo_file


def test_shipped_val_sample_is_held_out_validation_data():
    from mmdiff.data.loader import iterate_records

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
