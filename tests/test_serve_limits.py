"""`mmdiff serve` as a public page: what one visitor can make it hold. Text fields that are too long, control
characters and lone surrogates are refused; a prompt longer than the model reads is cut and the result says so;
seeds of 400 digits and decompression bombs are one-line messages; Gradio's cache is cleaned (`delete_cache`); one
concurrency limit holds for the whole server (checked on a real server with three handlers at once); `--auth` puts a
login in front of the page. The handlers run on the tiny `pipe` fixture, not the shipped model."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from mmdiff.cli import main

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from test_hostile_inputs import png_header  # noqa: E402

from mmdiff.serve import app, handlers  # noqa: E402


@pytest.fixture
def served(pipe):
    return handlers.ServeModel(pipe, folder="tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(call, message: str) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    text = str(info.value)
    assert message in text and "\n" not in text and len(text) < 300, text
    return text


# ------------------------------------------------------------------ text fields


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("\x07\x07\x07", "the prompt holds the control character U+0007 at character 0: type plain text"),
        ("a red\x00circle", "the prompt holds the control character U+0000 at character 5"),
        ("a \ud800 circle", "the prompt holds a lone surrogate U+D800 at character 2"),  # not the tokenizer's TypeError
        ("x" * 2_000_000, "the prompt is 2,000,000 characters long; at most 2,000 are taken"),
        ("\u200b\u200b  ", "the prompt is empty"),  # nothing visible
        (None, "the prompt is empty"),
    ],
    ids=["bell", "nul", "surrogate", "two-million", "zero-width", "none"],
)
def test_generate_refuses_prompts_that_are_not_text(served, prompt, message):
    _refused(lambda: handlers.generate(served, prompt, steps=1, num_images=1), message)


def test_the_other_text_fields_are_checked_too(served):
    _refused(lambda: handlers.generate(served, "a red circle", "\x1b[31m", steps=1, num_images=1), "negative prompt")
    _refused(lambda: handlers.sweep(served, "a red circle", "1 " * 600, steps=1), "at most 1,000 characters")
    _refused(lambda: handlers.sweep(served, "\x08", "1", steps=1), "control character U+0008")
    unconditional = {"unconditional": True, "num_unconditional": 1, "steps": 1}
    _refused(lambda: handlers.caption(served, fixed_words="a\ud800", **unconditional), "the prefix or template holds")
    # tabs and line breaks are text: a prompt pasted over two lines still samples
    assert handlers.generate(served, "a red circle\n\tabove a blue square", steps=1, num_images=1)[0]


def test_a_prompt_longer_than_the_model_reads_is_cut_and_says_so(served):
    limit = served.caption_length
    words = "a small red circle above a large blue square".split()
    prompt = " ".join(words * 3)  # 27 words, each one token of the tiny tokenizer
    _, settings = handlers.generate(served, prompt, steps=1, num_images=1)
    read = " ".join((words * 3)[:limit])
    assert settings["prompt_cut"] == f"the prompt was cut: the model reads its first {limit} of 27 tokens, {read!r}"
    assert settings["prompt"] == prompt  # echoed whole: at most MAX_PROMPT_CHARS characters
    _, settings = handlers.generate(served, "a red circle", prompt, steps=1, num_images=1)
    assert "prompt_cut" not in settings and settings["negative_prompt_cut"].startswith("the negative was cut")
    note = handlers.sweep(served, prompt, "1", steps=1)[3]
    assert note.endswith(f"; the prompt was cut: the model reads its first {limit} of 27 tokens, {read!r}")


# ------------------------------------------------------------------ numbers and uploads


def test_a_seed_of_400_digits_is_a_message(served):
    for seed in (10**400, float("inf"), -(10**400)):
        text = _refused(lambda s=seed: handlers.generate(served, "a red circle", seed=s, steps=1), "seed must lie in")
        assert text.startswith(f"seed must lie in [0, {handlers.MAX_SEED}], got")
    _refused(lambda: handlers.sweep(served, "a red circle", "1", seed=10**400, steps=1), "(401 digits)")
    _refused(lambda: handlers.caption(served, unconditional=True, seed=10**400, steps=1), "(401 digits)")
    big = 2**62 + 1  # a float would have rounded it to 2**62
    assert handlers.generate(served, "a red circle", seed=big, steps=1, num_images=1)[1]["seed"] == big


def test_an_upload_that_is_a_decompression_bomb_is_a_message(served, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 20_000))  # 400 M pixels: PIL raises DecompressionBombError, an Exception
    _refused(lambda: handlers.read_image_file(str(bomb)), "bomb.png is too large (Image size (400000000 pixels)")
    _refused(lambda: handlers.caption(served, image_file=str(bomb), steps=1), "the limit is 16,777,216 pixels")
    gone = tmp_path / "gone.png"  # an upload that Gradio's cache cleaning deleted before the request came
    _refused(lambda: handlers.caption(served, image_file=str(gone), steps=1), "gone.png is no longer on the server")


# ------------------------------------------------------------------ the page's configuration


def test_the_blocks_clean_their_cache_and_share_one_concurrency_limit(served):
    demo = app.build_app(served)
    assert demo.delete_cache == app.DELETE_CACHE == (600, 3600)
    assert demo._queue.default_concurrency_limit == app.CONCURRENCY and demo._queue.max_size == app.QUEUE_SIZE
    queued = [fn for fn in demo.fns.values() if fn.queue]
    named = {fn.api_name for fn in queued}
    assert {"generate", "sweep", "caption"} <= named
    assert all(fn.concurrency_id == app.EVENTS and fn.concurrency_limit == app.CONCURRENCY for fn in queued)
    boxes = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.interactive is not False]
    assert all(b.max_length for b in boxes if b.elem_id != "i2t-captions"), [b.label for b in boxes]


def test_the_concurrency_limit_holds_for_the_whole_server(served, monkeypatch):
    """Nine requests to three handlers at once: CONCURRENCY run, the rest wait in the one queue (Gradio's own per
    listener limit ran all nine). The handlers are replaced by ones that block until released, so the count of those
    running cannot change while it is read."""
    gradio_client = pytest.importorskip("gradio_client")
    state = {"running": 0, "peak": 0}
    changed, release = threading.Condition(), threading.Event()

    def blocking(result):
        def handler(*args, **kwargs):
            with changed:
                state["running"] += 1
                state["peak"] = max(state["peak"], state["running"])
                changed.notify_all()
            release.wait(60)
            with changed:
                state["running"] -= 1
            return result

        return handler

    monkeypatch.setattr(handlers, "generate", blocking(([], {"ok": True})))
    monkeypatch.setattr(handlers, "sweep", blocking(([], [[1.0]], ["guidance scale"], "note")))
    monkeypatch.setattr(handlers, "caption", blocking((["a caption"], "where")))
    demo = app.build_app(served)
    address = app.launch(demo, "127.0.0.1", free_port())
    try:
        client = gradio_client.Client(address, verbose=False)
        jobs = []
        for _ in range(3):
            jobs.append(
                client.submit("p", "", False, 3.0, 1, handlers.SAVED, 0, 1, False, 0.0, 1.0, api_name="/generate")
            )
            jobs.append(client.submit("p", "1", next(iter(handlers.GUIDANCE_METHODS)), 0, 1, 1, api_name="/sweep"))
            jobs.append(
                client.submit(None, None, True, 2, 2.0, 4, "low_confidence", 0.0, "", 0, "entropy", api_name="/caption")
            )
        queues = demo._queue.event_queue_per_concurrency_id  # Gradio's queues, by concurrency id

        def waiting() -> int:
            return len(queues[app.EVENTS].queue) if app.EVENTS in queues else 0

        def settled() -> bool:  # CONCURRENCY started and all the others wait in the queue, or one too many started
            return state["running"] > app.CONCURRENCY or (
                state["running"] == app.CONCURRENCY and waiting() == len(jobs) - app.CONCURRENCY
            )

        deadline = time.monotonic() + 60
        with changed:
            while not settled() and time.monotonic() < deadline:
                changed.wait(0.05)  # woken when a handler starts; the queue's length is read again each time
            assert state["peak"] == app.CONCURRENCY and waiting() == len(jobs) - app.CONCURRENCY, (state, waiting())
        release.set()
        assert [len(job.result(timeout=60)) for job in jobs] == [2, 3, 2] * 3
        assert state["peak"] == app.CONCURRENCY
    finally:
        release.set()
        demo.close()


# ------------------------------------------------------------------ a login


def test_launch_with_auth_puts_a_login_in_front_of_the_page(served):
    demo = app.build_app(served)
    address = app.launch(demo, "127.0.0.1", free_port(), auth=("visitor", "s3cret:with:colons"))
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(address + "config", timeout=30)
        assert info.value.code == 401

        def login(password):
            form = urllib.parse.urlencode({"username": "visitor", "password": password}).encode()
            return urllib.request.urlopen(urllib.request.Request(address + "login", data=form), timeout=30)

        with pytest.raises(urllib.error.HTTPError):
            login("wrong")
        assert login("s3cret:with:colons").status == 200
    finally:
        demo.close()


def test_serve_auth_option_and_environment_variable(capsys, monkeypatch):
    from mmdiff.commands.serve import AUTH_ENV, is_loopback, parse_auth

    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert parse_auth(None) is None and parse_auth("me:a:b") == ("me", "a:b")
    monkeypatch.setenv(AUTH_ENV, "env-user:pw")
    assert parse_auth(None) == ("env-user", "pw") and parse_auth("cli:pw") == ("cli", "pw")  # --auth wins
    for value in ("nocolon", ":pw", "user:"):
        assert main(["serve", "--auth", value, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "mmdiff serve: error: --auth must be USER:PASSWORD, both non-empty (the password may hold ':')"
    monkeypatch.setenv(AUTH_ENV, "nocolon")
    assert main(["serve", "--port", str(free_port())]) == 2
    assert f"${AUTH_ENV} must be USER:PASSWORD" in capsys.readouterr().err
    assert "--auth USER:PASSWORD" in (main(["serve", "--help"]) == 0 and capsys.readouterr().out)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_the_serve_command_reports_a_bad_folder_in_one_line(saved_pipe, capsys):
    import json

    path = saved_pipe / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": 10**9}))
    started = time.monotonic()
    assert main(["serve", "--model", str(saved_pipe), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdiff serve: error: component 'scheduler': num_train_timesteps=1000000000 is above")
    assert "\n" not in err and time.monotonic() - started < 60
