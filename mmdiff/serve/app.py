"""The page of `mmdiff serve`: a gr.Blocks over a loaded `ServeModel`, three tabs calling `handlers`.

Bad input never reaches a traceback: each event turns the handlers' one-line ValueError / TypeError / OSError into
gr.Error, which the page shows as a message; the server keeps running.

The page is public once served on an outside address, so it bounds what a visitor can make it hold: every queued
event shares one concurrency group (`EVENTS`, CONCURRENCY at a time for the whole server, not per handler), at most
QUEUE_SIZE wait, uploads and generated images are deleted from Gradio's cache (`DELETE_CACHE`), text fields are
capped (`handlers.MAX_PROMPT_CHARS`), and `launch(auth=...)` puts a login in front of it.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no calls out

import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from ..diffusion.masked import SAMPLERS  # noqa: E402
from ..pipelines.schedulers import scheduler_names  # noqa: E402
from . import handlers  # noqa: E402
from .handlers import SAVED, ServeModel  # noqa: E402

# The shapes model makes 32-pixel images: show them large with hard pixel edges, not a browser's blur.
CSS = ".mmdiff-gallery img { image-rendering: pixelated; }"
CONCURRENCY = 4  # events served at once by the whole server; model calls still run one at a time (ServeModel.lock)
QUEUE_SIZE = 64  # requests waiting at most; more are told the queue is full
# Gradio limits each event listener on its own (four handlers at 4 each ran 12 jobs at once): every queued event
# joins this one concurrency group, which holds CONCURRENCY for all of them together.
EVENTS = "mmdiff"
# (every, older than) in seconds: each 10 minutes, Gradio deletes the uploads and generated images this page cached
# more than an hour ago (and all of them when the server stops), so that repeated uploads cannot fill the disk.
DELETE_CACHE = (600, 3600)
QUEUED = {"concurrency_id": EVENTS, "concurrency_limit": CONCURRENCY}
PROGRESS = gr.Progress()  # the default that tells gradio an event reports progress (it passes a fresh tracker)


def _shown(fn):
    """Run a handler; its one-line input errors become a message in the page."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as err:
            raise gr.Error(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        except MemoryError:
            raise gr.Error("out of memory: ask for fewer images or steps") from None

    return wrapper


def _progress_reporter(progress: gr.Progress, what: str):
    return lambda done_total: progress(done_total, desc=what)


def _shown_path(folder: str) -> str:
    """The folder relative to the working directory when it lies under it (shorter in the page)."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd()))
    except ValueError:
        return folder


def build_app(model: ServeModel) -> gr.Blocks:
    """The page for one loaded model; launch with `launch(demo, host, port)` or `demo.launch(...)`."""
    scheduler_choices = [SAVED, *scheduler_names(model.t2i.objective_family)]
    with gr.Blocks(title="mmdiff", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            f"# mmdiff\nModel: `{_shown_path(model.folder)}`, {model.t2i.image_size} px images, on {model.device}. "
            "Guidance scale w = 1 means no guidance."
        )
        with gr.Tab("Text → image", id="t2i"):
            _text_to_image_tab(model, scheduler_choices)
        with gr.Tab("Guidance sweep", id="sweep"):
            _sweep_tab(model)
        with gr.Tab("Image → text", id="i2t"):
            _image_to_text_tab(model)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def _text_to_image_tab(model: ServeModel, scheduler_choices: list[str]) -> None:
    defaults = model.defaults
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="a small red circle above a large blue square",
                lines=2,
                max_length=handlers.MAX_PROMPT_CHARS,
                elem_id="t2i-prompt",
            )
            negative = gr.Textbox(label="Negative prompt (optional)", lines=1, max_length=handlers.MAX_PROMPT_CHARS)
            unconditional = gr.Checkbox(label="Unconditional (ignore the prompt: samples of p(image))", value=False)
            scale = gr.Slider(
                0, 10, value=defaults["guidance_scale"], step=0.1, label="Guidance scale w", elem_id="t2i-scale"
            )
            with gr.Row():
                steps = gr.Number(
                    value=defaults["num_inference_steps"],
                    label="Steps",
                    precision=0,
                    minimum=1,
                    maximum=handlers.MAX_STEPS,
                    elem_id="t2i-steps",
                )
                scheduler = gr.Dropdown(scheduler_choices, value=SAVED, label="Scheduler")
            with gr.Row():
                seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=handlers.MAX_SEED)
                count = gr.Number(
                    value=4, label="Images", precision=0, minimum=1, maximum=handlers.MAX_IMAGES, elem_id="t2i-count"
                )
            use_interval = gr.Checkbox(label="Guidance interval: guide only while t_low ≤ t ≤ t_high", value=False)
            with gr.Row():
                low = gr.Number(value=0.0, label="t_low", minimum=0, maximum=1, step=0.05)
                high = gr.Number(value=1.0, label="t_high", minimum=0, maximum=1, step=0.05)
            run = gr.Button("Generate", variant="primary", elem_id="t2i-run")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Images",
                columns=4,
                height="auto",
                format="png",
                elem_id="t2i-gallery",
                elem_classes="mmdiff-gallery",
            )
            settings = gr.JSON(label="Settings that made them", elem_id="t2i-settings")

    @_shown
    def event(prompt, negative, unconditional, scale, steps, scheduler, seed, count, use, low, high, progress=PROGRESS):
        report = _progress_reporter(progress, "denoising")
        low, high = (low, high) if use else (None, None)
        gallery, settings = handlers.generate(
            model, prompt, negative, scale, steps, scheduler, seed, count, low, high, unconditional, report
        )
        for key in ("prompt_cut", "negative_prompt_cut"):
            if key in settings:
                gr.Warning(settings[key])
        return gallery, settings

    inputs = [prompt, negative, unconditional, scale, steps, scheduler, seed, count, use_interval, low, high]
    run.click(event, inputs, [gallery, settings], api_name="generate", **QUEUED)
    prompt.submit(event, inputs, [gallery, settings], **QUEUED)


def _sweep_tab(model: ServeModel) -> None:
    defaults = model.defaults
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="there is a large green triangle",
                lines=2,
                max_length=handlers.MAX_PROMPT_CHARS,
                elem_id="sweep-prompt",
            )
            scales = gr.Textbox(
                label="Guidance scales",
                value="1, 2, 3, 5",
                max_length=handlers.MAX_SCALES_CHARS,
                elem_id="sweep-scales",
            )
            # Guidance methods: one entry per key of handlers.GUIDANCE_METHODS; a method added there appears in this
            # menu with no change to the page.
            method = gr.Dropdown(
                list(handlers.GUIDANCE_METHODS),
                value=next(iter(handlers.GUIDANCE_METHODS)),
                label="Guidance method",
                interactive=len(handlers.GUIDANCE_METHODS) > 1,
            )
            with gr.Row():
                seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=handlers.MAX_SEED)
                steps = gr.Number(
                    value=defaults["num_inference_steps"],
                    label="Steps",
                    precision=0,
                    minimum=1,
                    maximum=handlers.MAX_STEPS,
                    elem_id="sweep-steps",
                )
                per_scale = gr.Number(value=1, label="Images per scale", precision=0, minimum=1, maximum=8)
            run = gr.Button("Sweep", variant="primary", elem_id="sweep-run")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="One image per scale (the same seed)",
                columns=6,
                height="auto",
                format="png",
                elem_id="sweep-gallery",
                elem_classes="mmdiff-gallery",
            )
            table = gr.Dataframe(label="Scale → scores", interactive=False, elem_id="sweep-table")
            note = gr.Markdown()

    @_shown
    def event(prompt, scales, method, seed, steps, per_scale, progress=PROGRESS):
        report = _progress_reporter(progress, "sweeping")
        gallery, rows, header, note = handlers.sweep(model, prompt, scales, seed, steps, per_scale, method, report)
        return gallery, {"data": rows, "headers": header}, note

    run.click(
        event, [prompt, scales, method, seed, steps, per_scale], [gallery, table, note], api_name="sweep", **QUEUED
    )


def _image_to_text_tab(model: ServeModel) -> None:
    labels = handlers.sample_labels(model)
    defaults = model.defaults
    mask = model.mask_token
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Upload an image", type="filepath", elem_id="i2t-upload")
            sample = gr.Dropdown(labels, value=None, label="…or a held-out sample image", visible=bool(labels))
            shown = gr.Image(label="The image to caption", interactive=False, height=160, elem_id="i2t-preview")
            unconditional = gr.Checkbox(label="Unconditional captions (no image: samples of p(text))", value=False)
            num_uncond = gr.Number(value=4, label="How many", precision=0, minimum=1, maximum=handlers.MAX_CAPTIONS)
            scale = gr.Slider(
                0, 10, value=defaults["caption_guidance_scale"], step=0.1, label="Guidance scale w (on logits)"
            )
            with gr.Row():
                steps = gr.Number(
                    value=defaults["caption_steps"], label="Steps", precision=0, minimum=1, elem_id="i2t-steps"
                )
                remasking = gr.Dropdown(["low_confidence", "random"], value="low_confidence", label="Remasking")
            caption_sampler = gr.Dropdown(
                list(SAMPLERS),
                value=defaults["caption_sampler"],
                label="Sampler (steps and remasking apply to 'schedule'; the others take as many steps as needed)",
            )
            with gr.Row():
                temperature = gr.Number(value=0.0, label="Temperature (0 = argmax)", minimum=0)
                seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=handlers.MAX_SEED)
            fixed = gr.Textbox(
                label=f"Prefix or template (optional): 'a small red', or 'a {mask} circle above a {mask} square'",
                max_length=handlers.MAX_PROMPT_CHARS,
                elem_id="i2t-fixed",
            )
            run = gr.Button("Caption", variant="primary", elem_id="i2t-run")
        with gr.Column(scale=3):
            captions = gr.Textbox(label="Captions", lines=6, elem_id="i2t-captions")
            source = gr.Markdown()

    # the newest choice wins: an upload clears the sample and the reverse; the preview shows what will be read
    on_preview = _shown(lambda file, label: handlers.preview(model, file, label))
    upload.upload(lambda file: None, upload, sample, queue=False).then(on_preview, [upload, sample], shown, **QUEUED)
    upload.clear(lambda: None, None, shown, queue=False)
    sample.select(lambda label: None, sample, upload, queue=False).then(on_preview, [upload, sample], shown, **QUEUED)

    @_shown
    def event(
        file, label, unconditional, count, scale, steps, remasking, temperature, fixed, seed, how, progress=PROGRESS
    ):
        report = _progress_reporter(progress, "unmasking")
        text, where = handlers.caption(
            model, file, label, scale, steps, remasking, temperature, fixed, unconditional, count, seed, report, how
        )
        return "\n".join(text), where

    inputs = [upload, sample, unconditional, num_uncond, scale, steps, remasking, temperature, fixed, seed]
    inputs.append(caption_sampler)
    run.click(event, inputs, [captions, source], api_name="caption", **QUEUED)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None) -> str:
    """Start the server in the background (no share link, no telemetry) and return its address; `demo.close()`
    stops it. `auth` (user, password) puts Gradio's login page in front of the page; without it anyone who can
    reach host:port can use it. A port in use is an OSError."""
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        max_file_size="25mb",
        ssr_mode=False,
        css=CSS,
    )
    return demo.local_url or f"http://{host}:{port}/"
