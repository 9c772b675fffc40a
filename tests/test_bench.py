"""`mmdiff bench --quick`: the CI smoke run completes and writes finite numbers under the expected keys (not timed)."""

from __future__ import annotations

import json

import pytest

from mmdiff.bench.run import all_finite
from mmdiff.bench.timing import paired_ratio
from mmdiff.cli import main


def test_bench_quick_writes_a_finite_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["preset"]["name"] == "cpu-small-quick"
    assert {"cpu", "torch", "diffusers", "transformers", "torch_threads"} <= set(report["machine"])
    assert report["machine"]["torch_threads"] == 1
    assert all_finite(report)
    assert isinstance(report["malloc_keeps_freed_memory"], bool)

    train = report["train"]["results"]
    assert set(train) == {"pixart", "mmdiff", "mmdiff_flow", "mmdiff_frozen_text", "mmdiff_joint"}
    for record in train.values():
        assert record["per_s"] > 0 and record["peak_mem_mb"] >= 0 and record["tflops_per_s"] > 0
        assert len(record["times_s"]) == report["preset"]["repeats"]
    # MFU divides by the best of the peak measurements taken before and after the timed sections
    assert len(report["peak_flops_measured"]) == 2 and report["peak_flops_per_s"] == max(report["peak_flops_measured"])
    for record in train.values():
        assert record["mfu"] == pytest.approx(record["tflops_per_s"] * 1e12 / report["peak_flops_per_s"])
    assert set(report["train"]["ratios"]) == {
        "mmdiff/pixart", "mmdiff_frozen_text/pixart", "mmdiff_joint/pixart", "mmdiff_flow/mmdiff"
    }  # fmt: skip

    sample = report["sample"]["results"]
    assert set(sample) == {"pixart", "mmdiff", "mmdiff_interval", "mmdiff_flow"}  # flow: the flow Euler sampler
    assert all(r["per_s"] > 0 for r in sample.values())
    # every contender but the base also gets the per-round paired ratio, from its own times
    assert "paired_ratio" not in sample["pixart"]
    for name in ("mmdiff", "mmdiff_interval", "mmdiff_flow"):
        assert sample[name]["paired_ratio"] == paired_ratio(sample["pixart"]["times_s"], sample[name]["times_s"])

    by_steps = report["caption"]["by_steps"]
    assert set(by_steps) == {str(k) for k in report["preset"]["caption_steps"]}
    # the samplers on the shipped model: the 16-step schedule runs 2 x 16 rows per caption (CFG), the adaptive
    # samplers fewer
    samplers = report["caption"]["samplers"]["results"]
    assert samplers["schedule K=16"]["rows_per_caption"] == 32
    assert all(r["rows_per_caption"] < 32 and r["per_s"] > 0 for n, r in samplers.items() if n != "schedule K=16")
    assert all(r["cached_kv"]["per_s"] > 0 and r["recompute_kv"]["per_s"] > 0 for r in by_steps.values())

    scaling = report["scaling"]
    assert [r["latent_size"] for r in scaling["latent"]] == report["preset"]["scaling_latent_sizes"]
    assert all(r["step_ms"] > 0 for r in scaling["latent"] + scaling["caption_length"])
    assert "mmdiff bench" in capsys.readouterr().out


def test_paired_ratio_is_the_median_of_the_per_round_ratios():
    # a contender 1.25x faster on a machine that drifts 3x over the run: every round says 1.25
    drift = [1.0, 1.5, 3.0, 3.0, 2.0]
    base = [2.5 * d for d in drift]
    assert paired_ratio(base, [2.0 * d for d in drift]) == pytest.approx(1.25)
    # one disturbed run of the contender moves one round's ratio, not the median
    disturbed = [2.0 * d for d in drift]
    disturbed[1] *= 4
    assert paired_ratio(base, disturbed) == pytest.approx(1.25)
    assert paired_ratio([1.0, 2.0, 9.0], [1.0, 1.0, 1.0]) == 2.0  # base/contender: > 1 when the contender is faster
    with pytest.raises(ValueError, match="same number of rounds"):
        paired_ratio([1.0, 2.0], [1.0])


def test_bench_rejects_a_cuda_preset_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--preset", "gpu-b2", "--quick", "--out", str(tmp_path / "b.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_caption_context_cache_switch_gives_the_same_captions(pipe):
    """The benchmark's uncached baseline recomputes the context K/V each step; it must not change the result."""
    import torch

    from mmdiff.pipelines.image_to_text import MMDiffImageToTextPipeline

    i2t = MMDiffImageToTextPipeline(**pipe.components)
    i2t.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outputs = []
    for cached in (True, False):
        i2t.cache_context_kv = cached
        out = i2t(images, num_inference_steps=4, guidance_scale=2.0, guidance_interval=(0.3, 1.0), return_tokens=True)
        outputs.append(out)
    assert torch.equal(outputs[0].token_ids, outputs[1].token_ids)
    torch.testing.assert_close(outputs[0].confidences, outputs[1].confidences)


def _frontier_row(label, model, accuracy, block_rows, **setting):
    return {
        "label": label, "model": model, "scheduler": setting.get("scheduler"), "steps": setting.get("steps", 1),
        "interval": None, "cache": None, "guidance_scale": 3.0, "prompt_accuracy": accuracy, "fd": 1.0,
        "caption_accuracy": 1.0, "rows_per_image": block_rows, "block_rows_per_image": block_rows,
        "images_per_s": setting.get("per_s", 1.0), **({"cache": setting["cache"]} if "cache" in setting else {}),
    }  # fmt: skip


def test_equal_quality_picks_each_models_cheapest_setting_within_a_point_of_the_reference(tmp_path, capsys):
    from mmdiff.bench.equal_quality import pick_settings, read_frontier

    frontier = {
        "rows": [
            _frontier_row("v DDIM 25", "shipped", 0.960, 50),
            _frontier_row("v DPM++ 10", "shipped", 0.952, 20),  # within one point: chosen over the reference
            _frontier_row("v DPM++ 8", "shipped", 0.940, 16),  # cheaper but two points off
            _frontier_row("MeanFlow 2 steps", "few-step", 0.955, 2),
            _frontier_row("MeanFlow 1 step", "few-step", 0.951, 1),  # the cheapest within a point
            _frontier_row("flow UniPC 8", "flow", 0.90, 16),  # never reaches it
            _frontier_row("v DDIM 25 + FBC 0.2", "shipped", 0.94, 21, cache="fbc 0.2"),  # a family of its own: missed
            _frontier_row("v DDIM 25 + TaylorSeer 2", "shipped", 0.958, 50, cache="taylorseer 2", per_s=2.0),
            {"label": "flow UniPC 25", "model": "flow", "not_run": "no --flow-model given"},
        ]
    }
    reference, chosen = pick_settings(frontier)
    assert reference["label"] == "v DDIM 25"
    assert [row["label"] for row in chosen] == [
        "v DDIM 25",
        "v DPM++ 10",
        "MeanFlow 1 step",
        "v DDIM 25 + TaylorSeer 2",
    ]
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps({"rows": frontier["rows"][1:]}))
    with pytest.raises(ValueError, match="has no measured 'v DDIM 25' row"):
        read_frontier(path)
    # the section without a frontier, or with a bad one: one line, exit 2, before anything runs
    assert main(["bench", "--sections", "equal_quality", "--out", str(tmp_path / "b.json")]) == 2
    assert "needs --frontier FRONTIER.json" in capsys.readouterr().err
    assert main(["bench", "--frontier", str(path), "--out", str(tmp_path / "b.json")]) == 2
    assert not (tmp_path / "b.json").exists()


def test_the_frontier_measures_rows_blocks_and_accuracy_on_the_shipped_model():
    from mmdiff.eval.benchmarks.shapes.frontier import run_frontier
    from mmdiff.paths import SHIPPED_MODEL, VAL_SAMPLE, find_repo_file

    labels = ["v DPM++ 8 + interval", "v DDIM 25 + FBC 0.2", "MeanFlow 1 step"]
    rows, prompts = run_frontier(
        {"shipped": str(find_repo_file(SHIPPED_MODEL))}, str(find_repo_file(VAL_SAMPLE)), 4, 2, labels, 4
    )
    interval, cached, few_step = rows
    assert len(prompts) == 4 and few_step["not_run"] == "no --few-step-model given"
    # 8 steps: the conditional row at each, the unconditional one only inside (0.2, 0.8)
    assert 8 < interval["rows_per_image"] < 16 and interval["blocks_run"] == 1.0
    assert cached["rows_per_image"] == 50 and 0 < cached["blocks_run"] < 1  # the cache skips blocks, not rows
    assert cached["block_rows_per_image"] < 50
    for row in (interval, cached):
        assert 0 <= row["prompt_accuracy"] <= 1 and row["fd"] > 0 and row["images_per_s"] > 0
