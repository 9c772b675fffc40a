"""The functions the web page calls, as plain Python: no Gradio here, so they are tested and reused directly.

`ServeModel` holds both pipelines over one set of components, loaded once, and a lock: the model runs one request
at a time (the page stays responsive; Gradio's queue holds the others). Every handler checks its input first and
raises the pipeline's own one-line ValueError / TypeError for bad input; the page shows that line. Text fields are
capped in length and refused when they hold what no tokenizer reads as text (control characters, lone surrogates);
a prompt longer than the model reads is sampled from its first tokens, and the result says so (`prompt_cut`).
"""

from __future__ import annotations

import dataclasses
import numbers
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..checks import check_text, finite_number, is_number, shown_number
from ..diffusion.masked import REMASKING, SAMPLERS
from ..pipelines import MMDiffTextToImagePipeline, as_image_to_text
from ..pipelines.schedulers import make_scheduler, scheduler_names

MAX_IMAGES = 16  # images per text -> image request
MAX_SCALES = 12  # guidance scales per sweep
MAX_STEPS = 200  # denoising steps per request
MAX_CAPTIONS = 16  # unconditional captions per request
MAX_PIXELS = 4096 * 4096  # uploads above this are refused before they are decoded
MAX_SEED = 2**63 - 1
# Characters a text field takes: T5, the encoder that reads the longest prompts mmdiff loads, reads 512 tokens, about
# 2 000 characters of English; the shapes model reads 16 tokens. Longer input is refused, not echoed back whole.
MAX_PROMPT_CHARS = 2_000
MAX_SCALES_CHARS = 1_000  # the sweep's list of at most MAX_SCALES numbers
SAVED = "as saved"  # the scheduler choice that keeps the folder's own scheduler

# Progress reports (done, total) -> None; the page passes gr.Progress, tests pass nothing.
Progress = Callable[[tuple[int, int]], Any] | None


# Guidance methods of the sweep tab: page label -> the pipelines' `guidance=` name (mmdiff.diffusion.guidance).
# Autoguidance needs a weak model, which the page does not load: it is offered by `mmdiff sweep --weak-model`.
METHOD_LABELS = {
    "classifier-free guidance": "cfg",
    "adaptive projected guidance (APG)": "apg",
    "CFG-Zero*": "cfg_zero_star",
    "tangential damping CFG": "tcfg",
}


def _guided_sweep(method: str) -> Callable[..., Any]:
    def run(model: ServeModel, **kwargs) -> Any:
        return model.t2i.guidance_sweep(guidance=method, **kwargs)

    return run


GUIDANCE_METHODS: dict[str, Callable[..., Any]] = {label: _guided_sweep(name) for label, name in METHOD_LABELS.items()}


@dataclass
class ServeModel:
    """Both pipelines of one folder, sharing components, with the lock every model call takes."""

    t2i: MMDiffTextToImagePipeline
    folder: str = ""
    samples: list[tuple[str, PIL.Image.Image, str]] = field(default_factory=list)  # (key, image, reference caption)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.i2t = as_image_to_text(self.t2i)
        self.saved_scheduler = self.t2i.scheduler
        self.t2i.set_progress_bar_config(disable=True)
        self.i2t.set_progress_bar_config(disable=True)

    @property
    def defaults(self) -> dict[str, Any]:
        """Steps, guidance scales and the caption sampler for the page to start with: the folder's saved sample
        settings (`pipe.sample_config`) and its text scheduler's sampler."""
        return {**dataclasses.asdict(self.t2i.sample_config), "caption_sampler": self.i2t.text_scheduler.config.sampler}

    @property
    def caption_length(self) -> int:
        return self.i2t.transformer.config.max_text_length

    @property
    def device(self) -> torch.device:
        return self.t2i._execution_device

    @property
    def mask_token(self) -> str:
        return self.t2i.tokenizer.mask_token

    def generator(self, seed: Any) -> torch.Generator:
        seed = _integer("seed", seed, 0, MAX_SEED)
        return torch.Generator(self.device).manual_seed(seed)

    def use_scheduler(self, name: str | None) -> str:
        """Set the sampler for the next call (under the lock); returns the name it runs with."""
        if not name or name == SAVED:
            self.t2i.scheduler = self.saved_scheduler
            return type(self.saved_scheduler).__name__
        self.t2i.scheduler = make_scheduler(name, self.saved_scheduler.config, self.t2i.objective_family)
        return name


def load_model(folder: str | Path, device: str | None = None, samples: str | Path | None = None) -> ServeModel:
    """Load a saved pipeline folder once (PipelineLoadError / FileNotFoundError name the problem) and, when given,
    the held-out sample images of a shard file (up to 16)."""
    from ..pipelines.factory import load_pipeline

    t2i = load_pipeline(str(folder), MMDiffTextToImagePipeline, device=device, progress=False)
    return ServeModel(t2i, folder=str(folder), samples=read_samples(samples) if samples else [])


def read_samples(spec: str | Path, count: int = 16) -> list[tuple[str, PIL.Image.Image, str]]:
    """The first `count` records of image-caption shards: (key, image, reference caption), as `mmdiff demo` reads."""
    from ..demo import first_records

    return [(key, image, caption) for key, image, caption, _ in first_records(spec, count)]


# ------------------------------------------------------------------ checks


def _shown(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else shown_number(value)


def _number(name: str, value: Any, low: float, high: float) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (finite_number(value) and low <= value <= high):  # finite_number: False for 10**400 too
        raise ValueError(f"{name} must lie in [{_shown(low)}, {_shown(high)}], got {_shown(value)}")
    return float(value)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    number = _number(name, value, low, high)
    if isinstance(value, numbers.Integral):
        return int(value)  # as given: a float would round seeds above 2**53
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(number)


def parse_interval(low: Any, high: Any) -> tuple[float, float] | None:
    """The optional guidance interval of two number fields: both empty = none; one empty is an error."""
    if low is None and high is None:
        return None
    if low is None or high is None:
        raise ValueError("guidance interval: give both t_low and t_high in [0, 1], or leave both empty")
    return (_number("guidance interval t_low", low, 0, 1), _number("guidance interval t_high", high, 0, 1))


def parse_scales(text: Any) -> list[float]:
    """'1, 2, 3.5' -> [1.0, 2.0, 3.5]; commas or spaces between numbers."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("guidance scales: give a list of numbers, e.g. 1, 2, 3, 5")
    if len(text) > MAX_SCALES_CHARS:
        raise ValueError(f"guidance scales: at most {MAX_SCALES_CHARS:,} characters, got {len(text):,}")
    scales = []
    for part in text.replace(",", " ").split():
        try:
            scales.append(float(part))
        except ValueError:
            raise ValueError(f"guidance scales: {part!r} is not a number (give e.g. 1, 2, 3, 5)") from None
    if len(scales) > MAX_SCALES:
        raise ValueError(f"guidance scales: at most {MAX_SCALES} scales per sweep, got {len(scales)}")
    return [_number("guidance scale", w, 0, 100) for w in scales]


def field_text(name: str, text: Any, limit: int = MAX_PROMPT_CHARS) -> str:
    """A text field, stripped ('' for None), checked by `mmdiff.checks.check_text` (length, control characters, lone
    surrogates)."""
    return "" if text is None else check_text(name, text, limit).strip()


def check_prompt(prompt: Any, unconditional: bool) -> str:
    """The prompt, stripped (`field_text`); '' only when unconditional samples were asked for. A prompt with nothing
    visible in it (spaces, zero-width characters) is empty."""
    if unconditional:
        return ""
    text = field_text("the prompt", prompt)
    if not any(unicodedata.category(char)[0] not in "ZC" for char in text):
        raise ValueError("the prompt is empty: type a caption, or tick 'unconditional' for samples of p(image)")
    return text


def prompt_cut(model: ServeModel, prompt: str, what: str = "the prompt") -> str | None:
    """None when the model reads all of `prompt`; otherwise a line saying that it was cut to the tokens the text
    encoder reads (the joint encoder: the transformer's max_text_length; a frozen one: its own budget) and what
    those tokens say."""
    pipe = model.t2i
    if not prompt:
        return None
    if pipe.text_encoder is not None:
        from ..data.tokenizer import clip_bpe_tokenizer

        tokenizer, limit = pipe.text_encoder_tokenizer or clip_bpe_tokenizer(), pipe.frozen_max_length
        ids = tokenizer(prompt, truncation=False, verbose=False)["input_ids"]  # with BOS/EOS, as the encoder reads it
    else:
        tokenizer, limit = pipe.tokenizer, model.caption_length
        ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    if len(ids) <= limit:
        return None
    read = tokenizer.decode(ids[:limit], skip_special_tokens=True).strip()
    return f"{what} was cut: the model reads its first {limit} of {len(ids)} tokens, {read!r}"


def read_image_file(path: Any) -> PIL.Image.Image:
    """An uploaded file as an RGB PIL image; a non-image, damaged or huge file is one ValueError naming the file."""
    if not isinstance(path, str | Path):
        raise TypeError(f"expected an uploaded file, got {type(path).__name__}")
    name = Path(path).name
    if not Path(path).is_file():
        raise ValueError(f"{name} is no longer on the server (old uploads are deleted): upload it again")
    try:
        image = PIL.Image.open(path)
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name} is not an image (upload a .png, .jpg, .webp, ... file)") from None
    except PIL.Image.DecompressionBombError as err:  # its header claims over twice PIL's limit (an Exception)
        raise ValueError(f"{name} is too large ({err}); the limit is {MAX_PIXELS:,} pixels") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{name} cannot be read as an image: {err}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{name} is too large ({width} x {height} pixels); the limit is {MAX_PIXELS:,} pixels")
    try:
        image.load()
    except Exception as err:  # damaged files raise OSError, SyntaxError, EOFError, ...
        raise ValueError(f"{name} is damaged: {type(err).__name__}: {err}") from None
    return image.convert("RGB")


def _step_callback(progress: Progress, total: int) -> Callable | None:
    if progress is None:
        return None

    def callback(pipe, step, timestep, tensors):
        progress((step + 1, total))
        return {}

    return callback


# ------------------------------------------------------------------ text -> image


def generate(
    model: ServeModel,
    prompt: str,
    negative_prompt: str = "",
    guidance_scale: float = 3.0,
    steps: int = 25,
    scheduler: str = SAVED,
    seed: int = 0,
    num_images: int = 4,
    interval_low: float | None = None,
    interval_high: float | None = None,
    unconditional: bool = False,
    progress: Progress = None,
) -> tuple[list[tuple[PIL.Image.Image, str]], dict[str, Any]]:
    """Images for one prompt: [(image, label)] for the gallery and the settings that made them (with `prompt_cut`
    / `negative_prompt_cut` lines when the model read only the first tokens)."""
    prompt = check_prompt(prompt, unconditional)
    negative = field_text("the negative prompt", negative_prompt) or None
    scale = _number("guidance scale", guidance_scale, 0, 100)
    steps = _integer("steps", steps, 1, MAX_STEPS)
    count = _integer("number of images", num_images, 1, MAX_IMAGES)
    interval = parse_interval(interval_low, interval_high)
    names = scheduler_names(model.t2i.objective_family)
    if scheduler not in (SAVED, None, "") and scheduler not in names:
        raise ValueError(f"unknown scheduler {scheduler!r} for this model; choose one of {[SAVED, *names]}")
    generator = model.generator(seed)
    with model.lock:
        sampler = model.use_scheduler(scheduler)
        images = model.t2i(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=scale,
            guidance_interval=interval,
            num_images_per_prompt=count,
            generator=generator,
            callback_on_step_end=_step_callback(progress, steps),
        ).images
    settings = {
        "prompt": prompt,
        "negative_prompt": negative,
        "guidance_scale": scale,
        "guidance_interval": list(interval) if interval else None,
        "steps": steps,
        "scheduler": sampler,
        "seed": int(seed),
        "num_images": count,
        "size": list(images[0].size),
    }
    for key, text, what in (("prompt_cut", prompt, "the prompt"), ("negative_prompt_cut", negative, "the negative")):
        cut = prompt_cut(model, text or "", what)
        if cut:
            settings[key] = cut
    return [(image, f"seed {int(seed)} · #{i} · w = {scale:g}") for i, image in enumerate(images)], settings


# ------------------------------------------------------------------ guidance sweep


def benchmark_scores(model: ServeModel, prompt: str, images: list[PIL.Image.Image], seed: int) -> dict | None:
    """What the model's benchmark computes for these images of one prompt (find_benchmark decides from the
    prompt whether one reads it), or None when no benchmark does."""
    from ..eval.benchmarks import find_benchmark
    from ..eval.records import EvalRecords

    records = EvalRecords("", keys=["prompt"], images=[], prompts=[prompt], references=[[prompt]], attributes=[None])
    benchmark = find_benchmark(records)
    if benchmark is None:
        return None
    scores = benchmark.image_metrics(images, [prompt] * len(images), model.t2i.image_size, seed)
    return {"benchmark": benchmark.name, **{k: v for k, v in scores.items() if isinstance(v, int | float)}}


SCORE_KEYS = ("prompt_accuracy", "count", "colors", "shapes", "sizes", "relation")


def sweep(
    model: ServeModel,
    prompt: str,
    scales: str = "1, 2, 3, 5",
    seed: int = 0,
    steps: int = 25,
    images_per_scale: int = 1,
    method: str = "classifier-free guidance",
    progress: Progress = None,
) -> tuple[list[tuple[PIL.Image.Image, str]], list[list[Any]], list[str], str]:
    """One prompt and seed across guidance scales: gallery [(image, 'w = 2')], a table (one row per scale) with its
    header, and a note saying which benchmark scored the images (or that none could)."""
    prompt = check_prompt(prompt, unconditional=False)
    scale_list = parse_scales(scales)
    steps = _integer("steps", steps, 1, MAX_STEPS)
    per_scale = _integer("images per scale", images_per_scale, 1, 8)
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance method {method!r}; choose one of {list(GUIDANCE_METHODS)}")
    generator = model.generator(seed)
    if progress is not None:
        progress((0, 1))
    with model.lock:
        model.use_scheduler(SAVED)
        out = GUIDANCE_METHODS[method](
            model,
            prompt=prompt,
            guidance_scales=scale_list,
            num_inference_steps=steps,
            num_images_per_prompt=per_scale,
            generator=generator,
        )
    gallery = [(image, f"w = {w:g}") for w, group in zip(out.guidance_scales, out.images) for image in group]
    header = ["guidance scale"]
    rows: list[list[Any]] = []
    note = "no benchmark reads this prompt: images only (the shapes benchmark reads shapes captions)"
    cut = prompt_cut(model, prompt)
    for w, group in zip(out.guidance_scales, out.images):
        scores = benchmark_scores(model, prompt, list(group), int(seed))
        row: list[Any] = [w]
        if scores is not None:
            keys = [k for k in SCORE_KEYS if k in scores] or [k for k in scores if k not in ("benchmark", "num")]
            header = ["guidance scale", *keys]
            row += [round(float(scores[k]), 3) for k in keys]
            note = f"scores from the {scores['benchmark']} benchmark (fraction of the {per_scale} image(s) per scale)"
        rows.append(row)
    return gallery, rows, header, f"{note}; {cut}" if cut else note


# ------------------------------------------------------------------ image -> text


def caption(
    model: ServeModel,
    image_file: str | None = None,
    sample: str | None = None,
    guidance_scale: float = 2.0,
    steps: int | None = 16,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    fixed_words: str = "",
    unconditional: bool = False,
    num_unconditional: int = 4,
    seed: int = 0,
    progress: Progress = None,
    sampler: str = "entropy",
) -> tuple[list[str], str]:
    """Captions of an uploaded file or a held-out sample (its label from `sample_labels`), or unconditional ones;
    returns the captions and a line about where they came from. `steps` and `remasking` apply to the "schedule"
    sampler; "entropy" and "threshold" take the folder's bound and threshold and as many steps as needed."""
    scale = _number("guidance scale", guidance_scale, 0, 100)
    steps = _integer("steps", steps, 1, MAX_STEPS)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    schedule = sampler == "schedule"
    sampling = {"sampler": sampler} | ({"num_inference_steps": steps, "remasking": remasking} if schedule else {})
    temperature = _number("temperature", temperature, 0, 10)
    prompt = field_text("the prefix or template", fixed_words) or None
    if unconditional:
        image, num, source = None, _integer("unconditional captions", num_unconditional, 1, MAX_CAPTIONS), "p(text)"
    elif image_file:
        image, num, source = read_image_file(image_file), None, f"the uploaded {Path(image_file).name}"
    elif sample:
        key, image, reference = sample_by_label(model, sample)
        num, source = None, f"held-out sample {key} (reference: {reference!r})"
    else:
        raise ValueError("no image: upload one, pick a held-out sample, or tick 'unconditional'")
    generator = model.generator(seed)
    with model.lock:
        text = model.i2t(
            image,
            prompt=prompt,
            guidance_scale=scale,
            temperature=temperature,
            num_captions=num,
            generator=generator,
            callback_on_step_end=_step_callback(progress, steps if schedule else model.caption_length),
            **sampling,
        ).text
    how = f"{steps} steps, {remasking}" if schedule else f"{sampler} sampler"
    return text, f"{len(text)} caption(s) of {source}, w = {scale:g}, {how}"


def sample_labels(model: ServeModel) -> list[str]:
    return [f"{i}: {reference}" for i, (_, _, reference) in enumerate(model.samples)]


def sample_by_label(model: ServeModel, label: str) -> tuple[str, PIL.Image.Image, str]:
    try:
        return model.samples[int(str(label).split(":", 1)[0])]
    except (ValueError, IndexError):
        raise ValueError(f"no held-out sample {label!r}") from None


def preview(model: ServeModel, image_file: str | None, sample: str | None) -> PIL.Image.Image | None:
    """The image a caption request would read (for the page's preview); None when there is none yet."""
    if image_file:
        return read_image_file(image_file)
    if sample:
        return sample_by_label(model, sample)[1]
    return None
