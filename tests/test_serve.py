"""`mmdiff serve`: the handler functions on the shipped model, the command's errors, and the page in a real
headless Chromium (Selenium + Debian's chromium-driver; skipped with the reason when they are not installed).

MMDIFF_SERVE_SCREENSHOT=assets/serve_screenshot.png pytest tests/test_serve.py -k generates also writes the
screenshot that docs/usage/serve.md shows.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
from PIL import Image

from mmdiff.cli import main
from mmdiff.paths import SHIPPED_MODEL, VAL_SAMPLE, find_repo_file

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

from mmdiff.serve import handlers  # noqa: E402
from mmdiff.serve.app import build_app, launch  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
PROMPT = "a small red circle above a large blue square"


@pytest.fixture(scope="module")
def model():
    return handlers.load_model(find_repo_file(SHIPPED_MODEL), "cpu", find_repo_file(VAL_SAMPLE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ handlers, called directly


def test_generate_returns_the_images_and_the_settings(model):
    steps_seen = []
    gallery, settings = handlers.generate(
        model, PROMPT, guidance_scale=3.0, steps=2, scheduler="dpm++", seed=1, num_images=3, progress=steps_seen.append
    )
    assert len(gallery) == 3 and all(image.size == (32, 32) for image, _ in gallery)
    assert settings["scheduler"] == "dpm++" and settings["steps"] == 2 and settings["num_images"] == 3
    assert steps_seen == [(1, 2), (2, 2)]  # progress once per denoising step
    again, _ = handlers.generate(model, PROMPT, guidance_scale=3.0, steps=2, scheduler="dpm++", seed=1, num_images=3)
    assert list(again[0][0].getdata()) == list(gallery[0][0].getdata())  # the seed reproduces
    assert type(model.t2i.scheduler).__name__ == "DPMSolverMultistepScheduler"
    handlers.generate(model, "", steps=1, num_images=1, unconditional=True, interval_low=0.2, interval_high=0.8)
    assert type(model.t2i.scheduler) is type(model.saved_scheduler)  # "as saved" restores the folder's sampler


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"guidance_scale": -1}, "guidance scale must lie in [0, 100]"),
        ({"steps": 0}, "steps must lie in [1, 200]"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"num_images": 1000}, "number of images must lie in [1, 16]"),
        ({"seed": -3}, "seed must lie in"),
        ({"interval_low": 0.2}, "give both t_low and t_high"),
        ({"interval_low": 0.8, "interval_high": 0.2}, "guidance_interval"),  # the pipeline's own message
        ({"scheduler": "nope"}, "unknown scheduler 'nope'"),
        ({"guidance_scale": "3"}, "guidance scale must be a number"),
    ],
)
def test_generate_refuses_bad_input_in_one_line(model, kwargs, message):
    args = {"prompt": PROMPT, "steps": 1, "num_images": 1, **kwargs}
    with pytest.raises((ValueError, TypeError)) as err:
        handlers.generate(model, **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sweep_gives_one_image_per_scale_and_the_shapes_scores(model):
    gallery, rows, header, note = handlers.sweep(model, PROMPT, "1, 3", seed=0, steps=3)
    assert [label for _, label in gallery] == ["w = 1", "w = 3"]
    assert header == ["guidance scale", "prompt_accuracy", "count", "colors", "shapes", "sizes", "relation"]
    assert [row[0] for row in rows] == [1.0, 3.0] and all(0 <= v <= 1 for row in rows for v in row[1:])
    assert "shapes benchmark" in note
    _, rows, header, note = handlers.sweep(model, "a photo of a dog", "2", steps=1)
    assert header == ["guidance scale"] and rows == [[2.0]] and "no benchmark reads this prompt" in note
    for scales, message in [("1, x", "'x' is not a number"), ("", "give a list of numbers"), ("-1", "must lie in")]:
        with pytest.raises(ValueError, match="guidance scales|guidance scale"):
            handlers.sweep(model, PROMPT, scales, steps=1)
        try:
            handlers.sweep(model, PROMPT, scales, steps=1)
        except ValueError as err:
            assert message in str(err)
    with pytest.raises(ValueError, match="unknown guidance method"):
        handlers.sweep(model, PROMPT, "2", steps=1, method="made-up")


def test_caption_of_a_sample_an_upload_a_template_and_unconditional(model, tmp_path):
    labels = handlers.sample_labels(model)
    assert len(labels) == 16
    text, where = handlers.caption(model, sample=labels[0], steps=16)
    assert len(text) == 1 and text[0] and "held-out sample" in where
    path = tmp_path / "scene.png"
    model.samples[0][1].save(path)
    assert handlers.caption(model, image_file=str(path), steps=16)[0] == text  # the same image, the same caption
    template = f"a {model.mask_token} {model.mask_token} circle"
    filled = handlers.caption(model, sample=labels[0], steps=4, fixed_words=template, remasking="random")[0][0]
    assert filled.startswith("a ") and filled.endswith(" circle") and model.mask_token not in filled
    texts, where = handlers.caption(model, unconditional=True, num_unconditional=3, steps=4, temperature=1.0)
    assert len(texts) == 3 and "p(text)" in where


def test_caption_refuses_bad_input_in_one_line(model, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 4000)).save(huge)  # 20 M pixels, a small file
    sample = handlers.sample_labels(model)[0]
    cases = [
        ({"image_file": str(not_image)}, "notes.txt is not an image"),
        ({"image_file": str(huge)}, "huge.png is too large (5000 x 4000 pixels)"),
        ({}, "no image: upload one"),
        ({"sample": sample, "remasking": "sideways"}, "remasking must be one of"),
        ({"sample": sample, "temperature": -1}, "temperature must lie in"),
        ({"sample": sample, "steps": 10_000}, "steps must lie in"),
        ({"sample": "99: nothing"}, "no held-out sample"),
        ({"unconditional": True, "num_unconditional": 0}, "unconditional captions must lie in"),
        ({"sample": sample, "fixed_words": "a " * 40}, "max_length"),  # the pipeline's own message
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError)) as err:
            handlers.caption(model, **{"steps": 2, **kwargs})
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


# ------------------------------------------------------------------ the command


def test_serve_help_and_one_line_errors(capsys, tmp_path):
    assert main(["serve", "--help"]) == 0
    assert "--model" in capsys.readouterr().out
    assert main(["serve", "--model", "/nonexistent", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmdiff serve: error: no pipeline folder at /nonexistent"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmdiff serve: error: port {port} on 127.0.0.1 is already in use; choose another with --port"
    assert main(["serve", "--port", "70000"]) == 2
    assert "out of range" in capsys.readouterr().err
    (tmp_path / "model_index.json").write_text("{not json")
    assert main(["serve", "--model", str(tmp_path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdiff serve: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_launch_on_a_busy_port_is_an_oserror(model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        demo = build_app(model)
        try:
            with pytest.raises(OSError):
                launch(demo, "127.0.0.1", busy.getsockname()[1])
        finally:
            demo.close()


# ------------------------------------------------------------------ the page, in a browser


@pytest.fixture
def server(model):
    demo = build_app(model)
    address = launch(demo, "127.0.0.1", free_port())
    yield address
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 30.0, what: str = ""):
    """Selenium's own explicit wait on any condition; an element not there yet, or gone stale while the page
    re-rendered, counts as not yet."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.wait import WebDriverWait

    try:
        return WebDriverWait(None, timeout, poll_frequency=0.2, ignored_exceptions=(Exception,)).until(
            lambda _: predicate()
        )
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def _open(driver, address):
    from selenium.webdriver.common.by import By

    driver.get(address)
    _wait(lambda: driver.find_element(By.ID, "t2i-run"), what="the page")


def _set(driver, css: str, value) -> None:
    """Type into a text or number field the way a person does (select all, type, leave the field)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)


def _tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    button = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if name in b.text)
    button.click()


def _page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def test_page_generates_images(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    _set(browser, "#t2i-prompt textarea", PROMPT)
    _set(browser, "#t2i-scale input[type=number]", 4)  # the slider's number field
    _set(browser, "#t2i-steps input", 3)
    _set(browser, "#t2i-count input", 3)
    browser.find_element(By.ID, "t2i-run").click()
    _wait(lambda: "seed 0 · #2 · w = 4" in _page_text(browser), what="3 images made at w = 4")
    assert "#3 ·" not in _page_text(browser)  # 3 images, not the default 4
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#t2i-gallery img')].map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes and all(size == [32, 32] for size in sizes)  # the model's resolution, as PNG
    settings = "".join(browser.find_element(By.ID, "t2i-settings").text.split())
    assert '"steps":3,' in settings and '"guidance_scale":4' in settings and '"num_images":3,' in settings
    screenshot = os.environ.get("MMDIFF_SERVE_SCREENSHOT")
    if screenshot:  # the picture on docs/usage/serve.md: the default 4 images at the model's 25 steps
        _set(browser, "#t2i-steps input", 25)
        _set(browser, "#t2i-count input", 4)
        browser.find_element(By.ID, "t2i-run").click()
        _wait(lambda: "seed 0 · #3 · w = 4" in _page_text(browser), what="4 images")
        loaded = "return [...document.images].every(image => image.complete && image.naturalWidth > 0)"
        _wait(lambda: browser.execute_script(loaded), what="the images drawn")
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(screenshot)
        Image.open(screenshot).convert("RGB").quantize(96).save(screenshot, optimize=True)  # a small file


def test_page_sweeps_the_guidance_scale(server, browser):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    _tab(browser, "Guidance sweep")
    _set(browser, "#sweep-prompt textarea", PROMPT)
    _set(browser, "#sweep-scales textarea", "1, 3")
    _set(browser, "#sweep-steps input", 3)
    browser.find_element(By.ID, "sweep-run").click()
    _wait(lambda: "scores from the shapes benchmark" in _page_text(browser), what="the sweep's scores")
    text = _page_text(browser)
    assert "w = 1" in text and "w = 3" in text and "prompt_accuracy" in text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sweep-gallery img")) == 2


def test_page_captions_an_upload_and_shows_errors(server, browser, model, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    _tab(browser, "Image → text")
    scene = tmp_path / "scene.png"
    model.samples[0][1].save(scene)
    expected = handlers.caption(model, image_file=str(scene), steps=16)[0][0]
    browser.find_element(By.CSS_SELECTOR, "#i2t-upload input[type=file]").send_keys(str(scene))
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#i2t-preview img"), what="the preview")
    browser.find_element(By.ID, "i2t-run").click()
    _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#i2t-captions textarea").get_attribute("value") == expected,
        what=f"the caption {expected!r}",
    )
    assert "caption(s) of the uploaded scene.png" in _page_text(browser)

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    browser.find_element(By.CSS_SELECTOR, "#i2t-upload button[aria-label=Clear]").click()
    upload = _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#i2t-upload input[type=file]"), what="upload")
    upload.send_keys(str(notes))
    _wait(lambda: "notes.txt is not an image" in _page_text(browser), what="the error message")
    browser.find_element(By.ID, "i2t-run").click()  # the server is still up and refuses the request the same way
    _wait(lambda: _page_text(browser).count("notes.txt is not an image") >= 2, what="the error again")
    _tab(browser, "Text → image")
    browser.find_element(By.ID, "t2i-run").click()  # an empty prompt
    _wait(lambda: "the prompt is empty" in _page_text(browser), what="the empty-prompt message")
