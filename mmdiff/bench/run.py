"""`mmdiff bench`: mmdiff against diffusers' PixArt at matched size, written to a JSON file and printed as a table.

Sections (each contender alternated with the other over the repeats, after warm-up; medians and ratios):
    train    image-task training step (mmdiff vs PixArt), plus mmdiff's full two-direction step: images/s, peak memory
    sample   text-to-image with CFG (mmdiff vs PixArtAlphaPipeline), then mmdiff with the guidance interval: images/s
    caption  captions/s with and without the context K/V cache, for several step counts
    scaling  mmdiff's two-direction step time against latent tokens and against caption length
    equal_quality  (with --frontier) the trained shapes models at the cheapest setting within one point of the
             shipped model's 25-step prompt accuracy, against PixArt's pipeline at 25 steps (`equal_quality.py`)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch

from . import contenders as C
from .equal_quality import bench_equal_quality, read_frontier
from .flops import measure_peak_flops, mmdiff_train_flops, pixart_train_flops
from .presets import PRESETS, BenchPreset, machine_info, quick
from .timing import Contender, keep_freed_memory, paired_ratio, peak_memory_mb, summarize, time_alternating

SECTIONS = ("train", "sample", "caption", "scaling")  # the default; equal_quality needs a frontier file
ALL_SECTIONS = (*SECTIONS, "equal_quality")


def resolve_preset(
    name: str,
    quick_mode: bool = False,
    repeats: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> BenchPreset:
    """The named preset with the command-line overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = quick(PRESETS[name]) if quick_mode else PRESETS[name]
    overrides = {"repeats": repeats, "warmup": warmup, "threads": threads, "device": device}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if preset.repeats < 1 or preset.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {preset.repeats} and {preset.warmup}")
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"preset {preset.name} needs a CUDA device and none is available; use --preset cpu-small")
    return preset


def run_bench(
    preset: BenchPreset, out: str | Path, sections=SECTIONS, compile_models: bool = False, frontier=None
) -> dict:
    """Run the chosen sections of the benchmark, write the JSON report to `out` and return it. `frontier`: the
    JSON of `scripts/frontier.py`, which the equal_quality section needs (`equal_quality.py`)."""
    unknown = set(sections) - set(ALL_SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {ALL_SECTIONS}")
    if "equal_quality" in sections and frontier is None:
        raise ValueError("the equal_quality section needs --frontier FRONTIER.json (scripts/frontier.py writes it)")
    if frontier is not None:
        read_frontier(frontier)  # a bad file is refused before any section runs
    threads_before = torch.get_num_threads()
    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    try:
        return _run_sections(preset, out, sections, compile_models, frontier)
    finally:  # an in-process caller (the tests) keeps its own thread count
        torch.set_num_threads(threads_before)


def _run_sections(preset: BenchPreset, out: str | Path, sections, compile_models: bool, frontier) -> dict:
    device = torch.device(preset.device)
    started = time.time()
    dtype = torch.bfloat16 if preset.autocast_bf16 and device.type == "cuda" else torch.float32
    report = {
        "preset": preset.as_dict(),
        "machine": machine_info(device),
        # CPU: both contenders reuse freed memory instead of faulting it in every step (see keep_freed_memory)
        "malloc_keeps_freed_memory": keep_freed_memory() if device.type == "cpu" else False,
        "dtype": "bf16 autocast" if dtype == torch.bfloat16 else "float32",
        "compile": compile_models,
        # measured before and again after the timed sections: on a shared CPU one measurement can catch a slow
        # moment (0.10 where others saw 0.15-0.18 TFLOP/s) and put MFU above 100%; the best of them is the peak
        "peak_flops_measured": [measure_peak_flops(device, dtype, preset.peak_matmul_size)],
    }
    tokenizer, vae = C.build_tokenizer(), C.build_vae(preset, device)
    autocast = C.autocast_context(preset, device)
    steps = {
        "train": lambda: bench_train(preset, tokenizer, device, autocast, compile_models),
        "sample": lambda: bench_sample(preset, tokenizer, vae, device, autocast, compile_models),
        "caption": lambda: bench_caption(preset, tokenizer, vae, device, autocast, compile_models),
        "scaling": lambda: bench_scaling(preset, tokenizer, device, autocast),
        "equal_quality": lambda: bench_equal_quality(preset, frontier, device, autocast),
    }
    for name in sections:
        report[name] = steps[name]()
        gc.collect()
    report["peak_flops_measured"].append(measure_peak_flops(device, dtype, preset.peak_matmul_size))
    report["peak_flops_per_s"] = peak = max(report["peak_flops_measured"])
    for record in report.get("train", {}).get("results", {}).values():
        record["mfu"] = record["tflops_per_s"] * 1e12 / peak
    report["wall_s"] = time.time() - started
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    return report


def _compare(contenders: list[Contender], preset: BenchPreset) -> dict:
    times = time_alternating(contenders, preset.repeats, preset.warmup)
    results = {c.name: summarize(c, times[c.name]) for c in contenders}
    base = contenders[0].name  # the first contender is the one the others are compared with
    for c in contenders[1:]:
        results[c.name]["paired_ratio"] = paired_ratio(times[base], times[c.name])
    return results


def bench_train(preset: BenchPreset, tokenizer, device, autocast, compile_models: bool) -> dict:
    """Image-task training steps of both transformers and mmdiff's joint step, alternated; then one step each for
    peak memory."""
    batch, vocab = preset.train_batch, len(tokenizer)
    # mmdiff trims the context to the batch's longest caption: count its FLOPs at that length (PixArt: padded length)
    trimmed = int((C.caption_ids(tokenizer, batch, preset.context_length) != tokenizer.pad_token_id).sum(1).max())
    pixart = C.compile_transformer(C.build_pixart(preset, device), compile_models)
    mmdiff = C.compile_transformer(C.build_mmdiff(preset, vocab, device), compile_models)
    frozen = C.compile_transformer(
        C.build_mmdiff(preset, vocab, device, external_text_dim=preset.model.hidden_size), compile_models
    )
    joint = C.compile_transformer(C.build_mmdiff(preset, vocab, device), compile_models)
    flow = C.compile_transformer(C.build_mmdiff(preset, vocab, device), compile_models)
    contenders = [
        Contender(
            "pixart",
            C.pixart_image_step(pixart, preset, batch, device, autocast),
            batch,
            device,
            pixart_train_flops(preset, batch, preset.model.hidden_size),
        ),
        Contender(
            "mmdiff",
            C.mmdiff_image_step(mmdiff, tokenizer, preset, batch, device, autocast),
            batch,
            device,
            mmdiff_train_flops(preset, batch, vocab, context_tokens=trimmed),
        ),
        Contender(
            "mmdiff_flow",
            C.mmdiff_flow_image_step(flow, tokenizer, preset, batch, device, autocast),
            batch,
            device,
            mmdiff_train_flops(preset, batch, vocab, context_tokens=trimmed),
        ),
        Contender(
            "mmdiff_frozen_text",
            C.mmdiff_frozen_image_step(frozen, preset, batch, device, autocast),
            batch,
            device,
            mmdiff_train_flops(preset, batch, vocab, frozen_text=True, context_tokens=trimmed),
        ),
        Contender(
            "mmdiff_joint",
            C.mmdiff_joint_step(joint, tokenizer, batch, device, autocast, preset.latent_size, preset.in_channels),
            batch,
            device,
            mmdiff_train_flops(preset, batch, vocab, joint=True, context_tokens=trimmed),
        ),
    ]
    results = _compare(contenders, preset)
    for contender in contenders:
        results[contender.name]["peak_mem_mb"] = peak_memory_mb(contender.run, device)
    params = {
        "pixart": sum(p.numel() for p in pixart.parameters()),
        "mmdiff": sum(p.numel() for p in mmdiff.parameters()),
    }
    return {
        "unit": "images/s",
        "batch": batch,
        "params": params,
        "results": results,
        "ratios": {
            "mmdiff/pixart": results["mmdiff"]["per_s"] / results["pixart"]["per_s"],
            "mmdiff_frozen_text/pixart": results["mmdiff_frozen_text"]["per_s"] / results["pixart"]["per_s"],
            "mmdiff_joint/pixart": results["mmdiff_joint"]["per_s"] / results["pixart"]["per_s"],
            "mmdiff_flow/mmdiff": results["mmdiff_flow"]["per_s"] / results["mmdiff"]["per_s"],
        },
    }


def bench_sample(preset: BenchPreset, tokenizer, vae, device, autocast, compile_models: bool) -> dict:
    """Text-to-image with CFG at the same steps and scale: PixArt, mmdiff, mmdiff with the guidance interval."""
    mmdiff = C.compile_transformer(C.build_mmdiff(preset, len(tokenizer), device), compile_models)
    pixart = C.compile_transformer(C.build_pixart(preset, device), compile_models)
    t2i, _ = C.mmdiff_pipelines(mmdiff, vae, tokenizer)
    pixart_pipe = C.pixart_pipeline(pixart, C.build_t5(preset, len(tokenizer), device), vae, tokenizer)
    runs = C.sampling_runs(preset, t2i, pixart_pipe, autocast)
    contenders = [Contender(name, run, preset.sample_batch, device) for name, run in runs.items()]
    with torch.no_grad():
        results = _compare(contenders, preset)
    return {
        "unit": "images/s",
        "batch": preset.sample_batch,
        "steps": preset.sample_steps,
        "guidance_scale": preset.guidance_scale,
        "guidance_interval": list(preset.guidance_interval),
        "results": results,
        "ratios": {
            "mmdiff/pixart": results["mmdiff"]["per_s"] / results["pixart"]["per_s"],
            "mmdiff_interval/pixart": results["mmdiff_interval"]["per_s"] / results["pixart"]["per_s"],
            "mmdiff_interval/mmdiff": results["mmdiff_interval"]["per_s"] / results["mmdiff"]["per_s"],
            "mmdiff_flow/mmdiff": results["mmdiff_flow"]["per_s"] / results["mmdiff"]["per_s"],
        },
    }


def bench_caption(preset: BenchPreset, tokenizer, vae, device, autocast, compile_models: bool) -> dict:
    """Captioning with CFG, context K/V cached vs recomputed every step, for each step count."""
    mmdiff = C.compile_transformer(C.build_mmdiff(preset, len(tokenizer), device), compile_models)
    _, i2t = C.mmdiff_pipelines(mmdiff, vae, tokenizer)
    by_steps = {}
    for steps in preset.caption_steps:
        contenders = [
            Contender(name, C.caption_run(preset, i2t, steps, cached, autocast), preset.caption_batch, device)
            for name, cached in (("recompute_kv", False), ("cached_kv", True))
        ]
        results = _compare(contenders, preset)
        results["ratio_cached/recompute"] = results["cached_kv"]["per_s"] / results["recompute_kv"]["per_s"]
        by_steps[str(steps)] = results
    return {
        "unit": "captions/s",
        "batch": preset.caption_batch,
        "guidance_scale": 2.0,
        "by_steps": by_steps,
        "samplers": bench_caption_samplers(preset, device, autocast),
    }


# Each sampler at its best setting whose caption accuracy on the shipped model is within 0.5 points of the 16-step
# schedule (measured with `mmdiff eval-samplers` on 512 held-out images, docs/results/caption-samplers.md); ReMDM
# has no such setting (best: 94.3 % at 8 steps), so it is not here.
BENCH_SAMPLERS = {
    "schedule K=16": {"sampler": "schedule", "num_inference_steps": 16},
    "entropy 0.003 (default)": {"sampler": "entropy", "entropy_bound": 0.003},
    "threshold 0.98": {"sampler": "threshold", "threshold": 0.98},
    "threshold 0.99, blocks of 8": {"sampler": "threshold", "threshold": 0.99, "block_length": 8},
}


def bench_caption_samplers(preset: BenchPreset, device, autocast) -> dict:
    """The caption samplers on the shipped model and held-out scenes (a random model's confidences would say nothing
    about how many steps a confidence-driven sampler takes): captions/s and transformer rows per caption."""
    from ..paths import SHIPPED_MODEL, VAL_SAMPLE, find_repo_file

    try:
        folder, val = find_repo_file(SHIPPED_MODEL), find_repo_file(VAL_SAMPLE)
    except FileNotFoundError as err:
        return {"not_run": str(err)}
    from ..data.shards import iterate_records
    from ..pipelines import as_image_to_text
    from ..pipelines.factory import load_pipeline

    i2t = as_image_to_text(load_pipeline(folder, device=str(device), progress=False))
    images = [record[1] for _, record in zip(range(preset.caption_batch), iterate_records(str(val)), strict=False)]
    rows: dict[str, float] = {}

    def run_with(settings: dict, name: str):
        def run():
            with autocast:
                out = i2t(images, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **settings)
            rows[name] = out.num_forward_rows / len(images)
            return out

        return run

    contenders = [Contender(name, run_with(kw, name), len(images), device) for name, kw in BENCH_SAMPLERS.items()]
    results = _compare(contenders, preset)
    base = results["schedule K=16"]
    for name, result in results.items():
        result["rows_per_caption"] = rows[name]
        result["speedup"] = result["per_s"] / base["per_s"]
        result["fewer_rows"] = rows["schedule K=16"] / rows[name]
    return {"model": str(folder), "images": len(images), "results": results}


def bench_scaling(preset: BenchPreset, tokenizer, device, autocast) -> dict:
    """mmdiff's two-direction training step time against latent tokens (image size) and caption length."""
    batch, vocab = preset.scaling_batch, len(tokenizer)

    def step_ms(model, latent_size: int) -> float:
        run = C.mmdiff_joint_step(model, tokenizer, batch, device, autocast, latent_size, preset.in_channels)
        seconds = time_alternating([Contender("mmdiff_joint", run, batch, device)], preset.repeats, preset.warmup)
        return 1000 * statistics.median(seconds["mmdiff_joint"])

    model = C.build_mmdiff(preset, vocab, device)
    latent = [
        {"latent_size": size, "tokens": (size // preset.model.patch_size) ** 2, "step_ms": step_ms(model, size)}
        for size in preset.scaling_latent_sizes
    ]
    caption = []
    for length in preset.scaling_context_lengths:
        model = C.build_mmdiff(preset, vocab, device, context_length=length)
        caption.append({"caption_length": length, "step_ms": step_ms(model, preset.latent_size)})
    return {"batch": batch, "step": "mmdiff joint (both directions)", "latent": latent, "caption_length": caption}


# ---------------------------------------------------------------- table


def format_table(report: dict) -> str:
    """The report as a plain-text table: one row per contender, its rate, median time, ratio and memory."""
    lines = [
        f"mmdiff bench  preset={report['preset']['name']}  device={report['machine']['device']}  "
        f"threads={report['machine']['torch_threads']}  dtype={report['dtype']}  torch={report['machine']['torch']}  "
        f"diffusers={report['machine']['diffusers']}",
        f"cpu: {report['machine']['cpu']}"
        + (f"  gpu: {report['machine']['gpu']}" if "gpu" in report["machine"] else ""),
        f"measured matmul peak: {report['peak_flops_per_s'] / 1e12:.3f} TFLOP/s (best of "
        + ", ".join(f"{p / 1e12:.3f}" for p in report["peak_flops_measured"])
        + " before/after)",
        f"{'section':<9} {'contender':<22} {'rate':>12} {'median':>10} {'vs base':>8} {'paired':>7} {'peak MiB':>9} "
        f"{'MFU':>6}",
    ]

    def row(section: str, name: str, rec: dict, unit: str, base: float | None) -> str:
        ratio = f"{rec['per_s'] / base:.2f}x" if base else "1.00x"
        paired = f"{rec['paired_ratio']:.2f}x" if "paired_ratio" in rec else "-"
        mem = f"{rec['peak_mem_mb']:.0f}" if "peak_mem_mb" in rec else "-"
        mfu = f"{100 * rec['mfu']:.1f}%" if "mfu" in rec else "-"
        rate = f"{rec['per_s']:.2f} {unit}"
        return (
            f"{section:<9} {name:<22} {rate:>12} {1000 * rec['median_s']:>8.1f}ms {ratio:>8} {paired:>7} {mem:>9} "
            f"{mfu:>6}"
        )

    if "train" in report:
        res = report["train"]["results"]
        for name in ("pixart", "mmdiff", "mmdiff_flow", "mmdiff_frozen_text", "mmdiff_joint"):
            lines.append(row("train", name, res[name], "img/s", res["pixart"]["per_s"] if name != "pixart" else None))
    if "sample" in report:
        res = report["sample"]["results"]
        for name in ("pixart", "mmdiff", "mmdiff_interval", "mmdiff_flow"):
            lines.append(row("sample", name, res[name], "img/s", res["pixart"]["per_s"] if name != "pixart" else None))
    if "caption" in report:
        for steps, res in report["caption"]["by_steps"].items():
            for name in ("recompute_kv", "cached_kv"):
                base = res["recompute_kv"]["per_s"] if name == "cached_kv" else None
                lines.append(row("caption", f"{name} K={steps}", res[name], "cap/s", base))
        samplers = report["caption"].get("samplers", {}).get("results", {})
        for name, res in samplers.items():
            base = samplers["schedule K=16"]["per_s"] if name != "schedule K=16" else None
            lines.append(row("caption", name, res, "cap/s", base) + f"  {res['rows_per_caption']:.1f} rows/caption")
    if "equal_quality" in report:
        eq = report["equal_quality"]["results"]
        for name, res in eq.items():
            base = eq["pixart 25"]["per_s"] if name != "pixart 25" else None
            quality = f"  accuracy {res['prompt_accuracy']:.3f}" if "prompt_accuracy" in res else ""
            lines.append(row("equal-q", name[:22], res, "img/s", base) + quality)
    if "scaling" in report:
        sc = report["scaling"]
        lines.append(f"scaling (mmdiff joint step, batch {sc['batch']}):")
        lines.append("  latent tokens: " + ", ".join(f"{r['tokens']}: {r['step_ms']:.0f}ms" for r in sc["latent"]))
        lines.append(
            "  caption length: "
            + ", ".join(f"{r['caption_length']}: {r['step_ms']:.0f}ms" for r in sc["caption_length"])
        )
    return "\n".join(lines)


def all_finite(value) -> bool:
    """True when every number in a nested report is finite (what the CI smoke test checks)."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True
