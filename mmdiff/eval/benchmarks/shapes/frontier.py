"""The speed-quality frontier of text -> image on held-out shapes: the contenders (samplers, step counts, the
guidance interval, diffusers' cache hooks, a flow-matching and a few-step MeanFlow model), how each is run and
measured, and the plot. `scripts/frontier.py` is the command; `mmdiff bench --sections equal_quality` times the
contenders it found at equal quality (docs/performance.md, "The frontier").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from tqdm.auto import tqdm

from ....pipelines import swap_scheduler
from ...caption_metrics import generate_captions
from ...generic import image_space_metrics
from ...harness import EvalRun

CACHES = {
    "fbc 0.2": lambda: FirstBlockCacheConfig(threshold=0.2),
    "taylorseer 2": lambda: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=3, taylor_factors_dtype=torch.float32
    ),
}
INTERVAL = (0.2, 0.8)


@dataclass(frozen=True)
class Contender:
    label: str
    model: str  # "shipped" | "flow" | "few-step"
    scheduler: str | None  # None: the folder's own
    steps: int
    interval: tuple[float, float] | None = None
    cache: str | None = None  # a key of CACHES
    sigmas: tuple[float, ...] | None = None  # where the steps split the path (None: the scheduler's spacing)


CONTENDERS = [
    Contender("v DDIM 25", "shipped", "ddim", 25),
    Contender("v DDIM 25 + interval", "shipped", "ddim", 25, INTERVAL),
    Contender("v DPM++ 10", "shipped", "dpm++", 10),
    Contender("v DPM++ 10 + interval", "shipped", "dpm++", 10, INTERVAL),
    Contender("v DPM++ 8", "shipped", "dpm++", 8),
    Contender("v DPM++ 8 + interval", "shipped", "dpm++", 8, INTERVAL),
    Contender("v DDIM 25 + FBC 0.2", "shipped", "ddim", 25, cache="fbc 0.2"),
    Contender("v DDIM 25 + TaylorSeer 2", "shipped", "ddim", 25, cache="taylorseer 2"),
    Contender("flow UniPC 25", "flow", "unipc", 25),
    Contender("flow UniPC 8", "flow", "unipc", 8),
    Contender("MeanFlow 4 steps", "few-step", None, 4),
    Contender("MeanFlow 2 steps", "few-step", None, 2),
    Contender("MeanFlow 2 steps, split 0.6", "few-step", None, 2, sigmas=(1.0, 0.6)),
    Contender("MeanFlow 1 step", "few-step", None, 1),
]


class BlockCounter:
    """Counts the DiT blocks that ran against the blocks the transformer's forwards would run: a cache hook skips
    blocks (their MLP is never entered), which the rows a step takes do not show."""

    def __init__(self, transformer):
        self.depth, self.forwards, self.blocks = len(transformer.blocks), 0, 0
        transformer.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        for block in transformer.blocks:
            block.mlp.register_forward_hook(lambda *_: setattr(self, "blocks", self.blocks + 1))

    def reset(self) -> None:
        self.forwards = self.blocks = 0

    @property
    def fraction(self) -> float:
        return self.blocks / max(self.forwards * self.depth, 1)


def generate(pipe, prompts: list[str], contender: Contender, w: float, batch_size: int) -> tuple[list, int, float]:
    """Images for `prompts` (image i with seed i), the transformer rows they took and the seconds it took."""
    images, rows = [], 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        out = pipe(
            chunk,
            guidance_scale=w,
            num_inference_steps=contender.steps,
            sigmas=None if contender.sigmas is None else list(contender.sigmas),
            guidance_interval=contender.interval,
            generator=[torch.Generator().manual_seed(first + i) for i in range(len(chunk))],
        )
        images += out.images
        rows += out.num_forward_rows
    return images, rows, time.perf_counter() - start


@dataclass
class LoadedModel:
    """One model of the frontier, loaded once: its eval run, the held-out records, the eval encoder's space (with
    the real images' features), its caption accuracy and the block counter on its transformer."""

    run: EvalRun
    records: object
    space: object
    real_features: torch.Tensor
    caption_accuracy: float
    counter: BlockCounter

    @classmethod
    def open(cls, folder, shards, num_prompts: int, num_captions: int, batch_size: int) -> LoadedModel:
        run = EvalRun.open(folder, shards, num_prompts, num_prompts, "--num-prompts")
        if run.benchmark is None or run.benchmark.name != "shapes":
            raise ValueError(f"{shards}: the frontier scores prompt accuracy on shapes shards (mmdiff data shapes)")
        run.pipe.set_progress_bar_config(disable=True)
        records = run.records.head(num_prompts)
        space = run.feature_spaces(None, None, None, records.images, records.prompts)["eval_encoder"]
        captioned = records.head(num_captions)
        w = run.pipe.sample_config.caption_guidance_scale
        captions = generate_captions(run.pipe, captioned.images, w, None, batch_size, 0)
        caption_accuracy = run.benchmark.caption_metrics(captions, captioned)["all"]
        features = space.image_features(records.images)
        return cls(run, records, space, features, caption_accuracy, BlockCounter(run.pipe.transformer))


def apply_setting(pipe, contender: Contender) -> None:
    """Put `pipe` in the contender's sampling setting: its scheduler and its cache hook (None: no cache)."""
    if contender.scheduler is not None:
        swap_scheduler(pipe, contender.scheduler)
    if getattr(pipe.transformer, "is_cache_enabled", False):
        pipe.transformer.disable_cache()
    if contender.cache is not None:
        pipe.transformer.enable_cache(CACHES[contender.cache]())


def measure(contender: Contender, model: LoadedModel, batch_size: int) -> dict:
    """The contender's row: its setting, rows and blocks per image, images/s, prompt accuracy, FD, captions."""
    pipe, records, w = model.run.pipe, model.records, model.run.pipe.sample_config.guidance_scale
    apply_setting(pipe, contender)
    generate(pipe, records.prompts[:2], contender, w, batch_size)  # warm-up: first-call costs stay out
    model.counter.reset()
    images, forward_rows, seconds = generate(pipe, records.prompts, contender, w, batch_size)
    if contender.cache is not None:
        pipe.transformer.disable_cache()
    benchmark = model.run.benchmark
    accuracy = benchmark.image_metrics(images, records.prompts, pipe.image_size, 0)["prompt_accuracy"]
    fd = image_space_metrics(model.space, images, records.images, records.prompts, real_features=model.real_features)
    return {
        **asdict(contender),
        "guidance_scale": w,
        "scheduler_class": type(pipe.scheduler).__name__,
        "rows_per_image": forward_rows / len(images),
        "blocks_run": model.counter.fraction,  # of the DiT blocks those rows would run (a cache skips some)
        "block_rows_per_image": forward_rows / len(images) * model.counter.fraction,
        "images_per_s": len(images) / seconds,
        "prompt_accuracy": accuracy,
        "fd": fd["fd"],
        "caption_accuracy": model.caption_accuracy,
    }


def run_frontier(
    models: dict[str, str | None],
    shards,
    num_prompts: int = 512,
    num_captions: int = 128,
    only: list[str] | None = None,
    batch_size: int = 64,
) -> tuple[list[dict], list[str]]:
    """(rows, the held-out prompts): every contender (or those labelled in `only`) whose model `models` names ({"shipped", "flow",
    "few-step"}: a folder or hub id, or None), in CONTENDERS' order; the others as rows with "not_run"."""
    rows, loaded = [], {}
    for contender in tqdm([c for c in CONTENDERS if not only or c.label in only], desc="frontier"):
        folder = models.get(contender.model)
        if folder is None:
            rows.append({**asdict(contender), "not_run": f"no --{contender.model}-model given"})
            continue
        if contender.model not in loaded:
            loaded[contender.model] = LoadedModel.open(folder, shards, num_prompts, num_captions, batch_size)
        row = measure(contender, loaded[contender.model], batch_size)
        rows.append(row)
        tqdm.write(
            f"{row['label']:>26}  {row['rows_per_image']:5.1f} rows/image  blocks run {row['blocks_run']:.2f}  "
            f"{row['images_per_s']:6.2f} images/s  accuracy {row['prompt_accuracy']:.3f}  FD {row['fd']:7.2f}  "
            f"captions {row['caption_accuracy']:.3f}"
        )
    prompts = next(iter(loaded.values())).records.prompts if loaded else []
    return rows, list(prompts)


def plot(rows: list[dict], path: Path) -> None:
    """Prompt accuracy against transformer rows per image and against images/s, one marker per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "prompt_accuracy" in r]
    markers = {"shipped": "o", "flow": "s", "few-step": "*"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, name in (
        (axes[0], "rows_per_image", "transformer rows per image"),
        (axes[1], "images_per_s", "images/s"),
    ):
        for r in done:
            ax.scatter(
                r[key], r["prompt_accuracy"], marker=markers[r["model"]], s=90 if r["model"] == "few-step" else 40
            )
            ax.annotate(
                r["label"], (r[key], r["prompt_accuracy"]), fontsize=7, xytext=(4, 2), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel(name + " (log)")
        ax.set_ylabel("prompt accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title("fewer rows per image is better")
    axes[1].set_title("more images/s is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
