"""Evaluation on any shards: reading records, choosing the benchmark, and `mmdiff plot` of a run's metrics."""

from __future__ import annotations

import io
import json

import pytest
from conftest import write_tar
from PIL import Image

from mmdiff.cli import main
from mmdiff.data.shapes import write_shapes_shards
from mmdiff.eval.benchmarks import find_benchmark
from mmdiff.eval.records import load_eval_records
from mmdiff.eval.training_plot import generic_eval_keys, read_metrics


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_records_from_plain_image_caption_shards(tmp_path):
    write_tar(
        tmp_path / "mine-000000.tar",
        [
            ("a.png", _png("red")),
            ("a.txt", b"a photo of a red wall"),
            ("b.png", _png("blue")),  # no caption: skipped and counted
            ("c.png", _png("green")),
            ("c.txt", b"green paint"),
            ("c.json", json.dumps({"captions": ["green paint", "a wall painted green"]}).encode()),
        ],
    )
    records = load_eval_records(str(tmp_path / "mine-000000.tar"))
    assert records.prompts == ["a photo of a red wall", "green paint"]
    assert records.references == [["a photo of a red wall"], ["green paint", "a wall painted green"]]
    assert records.skipped == {"no_caption": 1} and len(records) == 2
    assert find_benchmark(records) is None  # not shapes: generic metrics only
    assert load_eval_records(str(tmp_path / "mine-000000.tar"), 1).prompts == ["a photo of a red wall"]


def test_shards_without_captions_name_the_problem(tmp_path):
    write_tar(tmp_path / "x-000000.tar", [("a.png", _png("red")), ("b.png", _png("blue"))])
    with pytest.raises(ValueError, match=r"no usable image-caption records.*2 no_caption"):
        load_eval_records(str(tmp_path / "x-000000.tar"))


def test_shapes_shards_use_the_shapes_benchmark_with_every_phrasing_as_reference(tmp_path):
    write_shapes_shards(tmp_path / "shapes", 8, image_size=16, seed=0, val_fraction=0.5, shard_size=4)
    records = load_eval_records(str(tmp_path / "shapes" / "val"))
    benchmark = find_benchmark(records)
    assert benchmark is not None and benchmark.name == "shapes"
    for prompt, references, attrs in zip(records.prompts, records.references, records.attributes, strict=True):
        assert prompt == attrs["canonical"] and references[0] == prompt
        assert set(attrs["captions"]) <= set(references)


def test_plot_draws_losses_and_in_training_figures(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 0, "eval_loss_image": 0.9, "eval_loss_text": 3.0, "eval_fd": 40.0, "eval_clip_score": 10.0},
        {"step": 10, "loss_image": 0.5, "loss_text": 1.0, "lr": 1e-3},
        {"step": 20, "loss_image": 0.4, "loss_text": 0.8, "lr": 1e-3, "eval_loss_image": 0.5, "eval_fd": 20.0},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 3')  # a torn last line
    assert len(read_metrics(run)) == 3
    assert generic_eval_keys(read_metrics(run)) == ["eval_fd", "eval_clip_score"]
    assert main(["plot", str(run)]) == 0
    assert (run / "training_plot.png").stat().st_size > 0 and "training_plot.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
