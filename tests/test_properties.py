"""Property tests (hypothesis) for bad input: configs, pipeline arguments and command lines.

Each property says that an input either works or is refused by mmdiff itself with a one-line message: a ConfigError
for configs, a ValueError/TypeError raised inside the mmdiff package for pipeline arguments, exit status 2 with one
`mmdiff CMD: error: ...` line for the command line. An exception from deep inside omegaconf, torch, PIL or numpy, or
a traceback, fails them. Plain regression tests for what they found are in test_bad_input.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import math
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import make_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mmdiff
from mmdiff.cli import main
from mmdiff.config import Config, ConfigError, _valid_keys, load_config
from mmdiff.data.shapes import write_shapes_shards

TINY = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.yaml"
PACKAGE = Path(mmdiff.__file__).resolve().parent


def examples(n: int) -> settings:
    """`n` examples without a deadline, the same ones on every run (a suite that fails at random on an unrelated
    change helps nobody; raise `n` and drop `derandomize` locally to explore). Fixtures are shared by the examples
    of a test on purpose: the pipelines are not changed by a call, and every example writes under its own name."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def raise_site(err: BaseException) -> tuple[str, int]:
    """File and line of the innermost frame of the exception's traceback: where it was raised."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("?", 0)


def raised_by_mmdiff(err: BaseException) -> bool:
    """Whether a `raise` statement in the mmdiff package raised it. A builtin or C function (float("a"),
    np.isfinite("a")) has no frame of its own, so the innermost frame alone would blame its mmdiff caller."""
    filename, line = raise_site(err)
    own_file = Path(filename).resolve().is_relative_to(PACKAGE)
    return own_file and linecache.getline(filename, line).strip().startswith("raise ")


def assert_own_error(err: BaseException) -> None:
    filename, line = raise_site(err)
    where = f"{filename}:{line}"
    assert isinstance(err, ValueError | TypeError), f"{type(err).__name__} from {where}: {err}"
    assert raised_by_mmdiff(err), f"{type(err).__name__} not raised by mmdiff but at {where}: {err}"
    assert str(err).strip() and "\n" not in str(err), f"not a one-line message: {err!r}"


# ---------------------------------------------------------------- configs

LEAF_KEYS = sorted(k for k in _valid_keys(Config) if "." in k)
SECTIONS = sorted(k for k in _valid_keys(Config) if "." not in k)
odd_values = st.sampled_from(
    ["", "null", "~", "true", "no", "[]", "[1, 2]", "[0]", "{}", "{a: 1}", "???", "${train.lr}", "${train.nope}", "${",
     "${oc.env:MMDIFF_NOPE}", "[1,", "{a", "'quoted'", '"1"', "1e-3", ".inf", "-.inf", ".nan", "nan", "inf", "-inf",
     "0x10", "1_000", "1e400", "cosine", "bf16", "word", "single", "auto", "a=b", "- 1", ": x", "&a 1", "*b", "!!binary x"]
)  # fmt: skip
numbers_as_text = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-3, max_value=70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-2, max_value=2).map(str),
)
values = st.one_of(odd_values, numbers_as_text, st.text(max_size=12))
keys = st.one_of(
    st.sampled_from(LEAF_KEYS),
    st.sampled_from(LEAF_KEYS),
    st.sampled_from(SECTIONS),
    st.sampled_from(LEAF_KEYS).map(lambda k: k + ".extra"),
    st.sampled_from(LEAF_KEYS).map(lambda k: k[:-1]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._[]0=", max_size=14),
)
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), min_size=1, max_size=3)


def _loads_or_config_error(path, dotlist) -> None:
    try:
        cfg = load_config(path, dotlist)
    except ConfigError as err:
        assert str(err).strip() and "\n" not in str(err), f"not a one-line message: {err!r}"
        return
    assert isinstance(cfg, Config)
    for section, section_values in dataclasses.asdict(cfg).items():
        for key, value in section_values.items():
            assert not (isinstance(value, float) and math.isnan(value)), f"{section}.{key} loaded as NaN"


@examples(60)
@given(dotlist=overrides)
def test_config_overrides_load_or_raise_config_error(dotlist):
    _loads_or_config_error(TINY, dotlist)


yaml_scalars = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=8))
yaml_trees = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=6)),
    st.one_of(
        yaml_scalars,
        st.lists(yaml_scalars, max_size=2),
        st.dictionaries(st.sampled_from([k.split(".")[1] for k in LEAF_KEYS]), yaml_scalars, max_size=3),
    ),
    max_size=3,
)


@examples(60)
@given(text=st.one_of(st.text(max_size=60), yaml_trees.map(yaml.safe_dump)))
def test_config_files_load_or_raise_config_error(tmp_path, text):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_config_error(path, ["data.train_shards=x"])


# ---------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def t2i(tokenizer, vae):
    from mmdiff.diffusion.gaussian import make_noise_scheduler
    from mmdiff.diffusion.process import GaussianProcess
    from mmdiff.training.trainer import build_pipeline

    process = GaussianProcess(make_noise_scheduler({"prediction_type": "v_prediction", "clip_sample": False}))
    pipe = build_pipeline(make_model(tokenizer), vae, process.sampling_scheduler(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2t_pipe(t2i):
    from mmdiff.pipelines import MMDiffImageToTextPipeline

    pipe = MMDiffImageToTextPipeline(**t2i.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` nine times in ten: with a dozen arguments, a call then often gets past the first check it meets."""
    # sampled_from draws uniformly (integers() favours its bounds) and shrinks towards the first entry: valid
    return st.sampled_from(range(10)).flatmap(lambda i: invalid if i == 9 else valid)


def outcome(err: BaseException | None) -> None:
    """Label the example for `--hypothesis-show-statistics`: how many ran through, and which checks refused them."""
    event("ran" if err is None else f"{type(err).__name__}: {str(err).split(',')[0][:40]}")


bad_scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.just([1.0]), st.just((0.1,)), st.just(torch.tensor(1.0))
)
any_float = st.floats(allow_nan=True, allow_infinity=True)
guidance_scales = mostly(
    st.one_of(st.sampled_from([0.0, 1.0, 2.5]), st.floats(0, 10), st.integers(0, 5), st.just(np.float32(2.0))),
    st.one_of(any_float, st.sampled_from([-1, 10**400]), bad_scalars),
)
steps = mostly(st.sampled_from([1, 2, 3, 2.0]), st.one_of(st.sampled_from([0, -1, 2.5, 1001, 10**400]), bad_scalars))
# the text scheduler takes up to 2**24 steps: 1001 would be valid, and slow
text_steps = mostly(st.sampled_from([1, 2, 3, 2.0]), st.one_of(st.sampled_from([0, -1, 2.5, 2**24 + 1]), bad_scalars))
intervals = mostly(
    st.one_of(st.none(), st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted).map(tuple)),
    st.one_of(
        st.tuples(any_float, any_float),
        st.lists(st.floats(0, 1), max_size=3),
        st.sampled_from(["ab", 0.5, ("a", "b"), (None, 1.0), [[0.1], [0.2]]]),
    ),
)
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["a small red circle", "", " ", "[MASK]", "[PAD]", "[UNK] circle", "a [MASK] circle"]),
)
prompts = mostly(
    st.one_of(st.none(), texts, st.lists(texts, min_size=1, max_size=3), st.lists(texts, min_size=2, max_size=2)),
    st.one_of(
        st.lists(st.one_of(texts, st.integers(), st.none()), max_size=3),
        st.sampled_from([3, b"a red circle", {"a": 1}, []]),
    ),
)
generators = mostly(st.sampled_from(["none", "one", "list"]), st.sampled_from(["short-list", "int", "string"]))


def _generator(kind: str, n: int):
    return {
        "none": None,
        "one": torch.Generator().manual_seed(0),
        "list": [torch.Generator().manual_seed(i) for i in range(n)],
        "short-list": [torch.Generator()] * (n + 1),
        "int": 0,
        "string": "seed",
    }[kind]


def _t2i_latents(kind: str, n: int):
    return {
        "none": None,
        "right": torch.randn(n, 4, 8, 8),
        "wrong-shape": torch.randn(n, 4, 4, 4),
        "nan": torch.full((n, 4, 8, 8), float("nan")),
        "int": torch.zeros(n, 4, 8, 8, dtype=torch.long),
        "numpy": np.zeros((n, 4, 8, 8), dtype=np.float32),
        "string": "noise",
    }[kind]


@examples(60)
@given(
    prompt=prompts,
    negative_prompt=mostly(st.one_of(st.none(), texts), prompts),
    guidance_scale=guidance_scales,
    num_inference_steps=steps,
    guidance_interval=intervals,
    guidance_rescale=mostly(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)), st.one_of(any_float, bad_scalars)),
    num_images_per_prompt=mostly(st.sampled_from([1, 2]), st.sampled_from([0, -1, 1.0, "2", True])),
    height=mostly(st.sampled_from([None, 4, 8, 16, 24]), st.one_of(st.integers(-8, 20), st.sampled_from([16.0, "16"]))),
    width=mostly(st.sampled_from([None, 4, 8, 16]), st.integers(-8, 20)),
    output_type=mostly(st.sampled_from(["pil", "np", "pt", "latent"]), st.sampled_from(["jpg", None, 3])),
    generator=generators,
    latents=mostly(
        st.sampled_from(["none", "right"]), st.sampled_from(["wrong-shape", "nan", "int", "numpy", "string"])
    ),
)
def test_text_to_image_arguments_give_images_or_own_errors(
    t2i,
    prompt,
    negative_prompt,
    guidance_scale,
    num_inference_steps,
    guidance_interval,
    guidance_rescale,
    num_images_per_prompt,
    height,
    width,
    output_type,
    generator,
    latents,
):
    per_prompt = num_images_per_prompt if type(num_images_per_prompt) is int and num_images_per_prompt > 0 else 1
    n = (len(prompt) if isinstance(prompt, list) and prompt else 1) * per_prompt
    sizes_ok = all(size is None or type(size) is int and size > 0 for size in (height, width))
    shape = (n, 4, (height or 16) // 2, (width or 16) // 2) if latents == "right" and sizes_ok else None
    kwargs = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        num_images_per_prompt=num_images_per_prompt,
        height=height,
        width=width,
        output_type=output_type,
        generator=_generator(generator, n),
        latents=torch.randn(shape) if shape and all(shape) else _t2i_latents(latents, n),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # NaN cast to pixels
            images = t2i(**kwargs).images
    except Exception as err:  # noqa: BLE001 - the property is about which exceptions come out
        outcome(err)
        assert_own_error(err)
        return
    outcome(None)
    assert len(images) == n
    if output_type in ("np", "pt"):
        assert bool(np.isfinite(np.asarray(images)).all()), "non-finite pixels"


good_images = st.one_of(
    st.builds(PIL.Image.new, st.sampled_from(["RGB", "L", "RGBA"]), st.tuples(st.integers(1, 20), st.integers(1, 20))),
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 4]))),
    hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.floats(0, 1, width=32)),
    hnp.arrays(np.float32, (3, 5, 7), elements=st.floats(-1, 1, width=32)).map(torch.from_numpy),
)
dtypes = st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int16, np.int64, np.bool_, np.complex64])
arrays = dtypes.flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
)
pil_modes = st.sampled_from(["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "LA", "PA"])
pil_images = st.one_of(
    st.builds(lambda mode, w, h: PIL.Image.new(mode, (w, h)), pil_modes, st.integers(0, 6), st.integers(0, 6)),
    st.builds(lambda size, value: PIL.Image.new("F", (size, size), value), st.integers(1, 4), any_float),
    st.builds(
        lambda size, value: PIL.Image.new("I", (size, size), value), st.integers(1, 4), st.integers(-(2**31), 2**31 - 1)
    ),
)
tensors = arrays.filter(lambda a: a.dtype != np.uint16).map(torch.from_numpy)
odd_images = st.one_of(pil_images, arrays, tensors, st.sampled_from(["image.png", 3, None, b"\x89PNG", [[0.5]]]))
images = mostly(
    st.one_of(st.none(), good_images, st.lists(good_images, min_size=1, max_size=3)),
    st.one_of(odd_images, st.lists(odd_images, max_size=2), st.just([])),
)


@examples(60)
@given(image=st.one_of(odd_images, st.lists(odd_images, min_size=1, max_size=3)))
def test_odd_images_are_captioned_or_refused_with_own_errors(i2t_pipe, image):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # NaN cast to pixels
            out = i2t_pipe(image, num_inference_steps=2)
    except Exception as err:  # noqa: BLE001 - the property is about which exceptions come out
        outcome(err)
        assert_own_error(err)
        return
    outcome(None)
    assert len(out.text) == (len(image) if isinstance(image, list) or getattr(image, "ndim", 0) == 4 else 1)


@examples(60)
@given(
    image=images,
    prompt=mostly(st.none(), prompts),
    num_inference_steps=mostly(st.none(), text_steps),
    guidance_scale=guidance_scales,
    max_length=mostly(
        st.sampled_from([None, 1, 4, 12]), st.one_of(st.integers(-1, 0), st.sampled_from([13, 2.0, "4", True]))
    ),
    remasking=mostly(st.sampled_from(["low_confidence", "random"]), st.sampled_from(["LOW", None, 3])),
    temperature=mostly(st.one_of(st.sampled_from([0.0, 0.7]), st.floats(0, 5)), st.one_of(any_float, bad_scalars)),
    guidance_interval=intervals,
    num_captions=mostly(st.sampled_from([None, 1, 2]), st.sampled_from([0, -1, 2.0, "2", True])),
    generator=generators,
)
def test_image_to_text_arguments_give_captions_or_own_errors(
    i2t_pipe,
    image,
    prompt,
    num_inference_steps,
    guidance_scale,
    max_length,
    remasking,
    temperature,
    guidance_interval,
    num_captions,
    generator,
):
    if image is None:
        batch = num_captions if type(num_captions) is int and num_captions > 0 else 1
    else:
        batch = len(image) if isinstance(image, list) else 1
    kwargs = dict(
        prompt=prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        max_length=max_length,
        remasking=remasking,
        temperature=temperature,
        guidance_interval=guidance_interval,
        num_captions=num_captions,
        generator=_generator(generator, batch),
        return_tokens=True,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # NaN cast to pixels
            out = i2t_pipe(image, **kwargs)
    except Exception as err:  # noqa: BLE001 - the property is about which exceptions come out
        outcome(err)
        assert_own_error(err)
        return
    outcome(None)
    assert len(out.text) == batch and all(isinstance(text, str) for text in out.text)
    assert out.token_ids.shape == (batch, max_length or 12)
    tokenizer = i2t_pipe.tokenizer
    assert not any(tokenizer.mask_token in text or tokenizer.pad_token in text for text in out.text)


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def folder(t2i, tmp_path_factory):
    """The module's pipeline saved to disk, and a scratch folder with image files good and bad."""
    root = tmp_path_factory.mktemp("cli")
    t2i.save_pretrained(root / "pipe")
    files = root / "files"
    files.mkdir()
    PIL.Image.new("RGB", (12, 20), "red").save(files / "red.png")
    PIL.Image.new("LA", (9, 9)).save(files / "gray.png")
    (files / "empty.png").write_bytes(b"")
    (files / "text.jpg").write_text("a small red circle")
    (files / "cut.png").write_bytes((files / "red.png").read_bytes()[:60])
    (files / "prompts.txt").write_text("a small red circle\n\nthere is a large blue square\n")
    (files / "binary.txt").write_bytes(b"\xff\xfe\x00")
    (files / "sub").mkdir()
    write_shapes_shards(root / "data", 4, image_size=16, seed=0, val_fraction=0.0, shard_size=4)
    (root / "data" / "train").rename(root / "shards")
    return root


def _path(root: Path, name: str) -> str:
    return str(root / "files" / name) if name != "missing" else str(root / "nowhere" / "x.png")


def _cli_property(argv: list[str], capsys) -> None:
    """Exit 0, or exit 2 with exactly one line on stderr starting `mmdiff CMD: error: `; nothing else."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), f"exit status {code}"
    event(f"exit {code}" + (f": {err.split('error: ', 1)[-1][:40]}" if code else ""))
    if code == 2:
        command = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mmdiff {command}: error: "), err


image_files = mostly(
    st.sampled_from(["red.png", "gray.png"]), st.sampled_from(["empty.png", "text.jpg", "cut.png", "sub", "missing"])
)


def _values(valid: list, invalid: list) -> st.SearchStrategy:
    return mostly(st.sampled_from(valid), st.sampled_from(invalid))


BAD_NUMBERS = ["x", "", "nan", "inf", "-inf", "1e400", "-1", "99999999999999999999"]
STEPS = _values(["1", "2"], ["0", "-1", "x", "1001", "1e3", "", "2.5"])
CAPTION_STEPS = _values(["1", "2"], ["0", "-1", "x", "16777217", "1e3", "", "2.5"])  # 1001 is valid (and slow) here
GUIDANCE = _values(["0", "1", "2.5"], BAD_NUMBERS)
INTERVAL = mostly(
    st.sampled_from([("0.2", "0.8"), ("0", "1")]),
    st.tuples(st.sampled_from(BAD_NUMBERS + ["0.5"]), st.sampled_from(BAD_NUMBERS + ["0.5"])),
)
SEED = _values(["0", "7"], ["-1", "x", "99999999999999999999999"])


def _options(draw, spec: dict) -> list[str]:
    """Each option of `spec` present one time in three, with a drawn value (a tuple: several; None: a bare flag)."""
    argv = []
    for flag, strategy in spec.items():
        if draw(st.sampled_from([True, False, False])):
            value = draw(strategy)
            argv += [flag, *value] if isinstance(value, tuple) else [flag] if value is None else [flag, value]
    return argv


@st.composite
def generate_argv(draw):
    return _options(
        draw,
        {
            "--steps": STEPS,
            "--guidance-scale": GUIDANCE,
            "--guidance-interval": INTERVAL,
            "--guidance-rescale": _values(["0", "0.5", "1"], BAD_NUMBERS + ["2"]),
            "--num-images-per-prompt": _values(["1", "2"], ["0", "-1", "x"]),
            "--height": _values(["16", "8", "4"], ["18", "0", "-16", "x", "7"]),
            "--width": _values(["16", "8", "24"], ["18", "0"]),
            "--scheduler": _values(["ddim", "dpm++", "euler", "euler_a", "unipc", "ddpm"], ["lms", "", "DDIM"]),
            "--negative-prompt": texts,
            "--seed": SEED,
            "--device": _values(["cpu", "cpu:0"], ["x", "", "meta", "tpu"]),
            "--dtype": _values(["float32", "bfloat16"], ["float64"]),
            "--grid": st.none(),
        },
    )


@examples(40)
@given(
    prompts=mostly(st.lists(texts, min_size=1, max_size=2), st.just([])),
    prompts_file=mostly(
        st.sampled_from([None, None, "prompts.txt"]), st.sampled_from(["binary.txt", "sub", "missing", "empty.png"])
    ),
    options=generate_argv(),
)
def test_generate_command_line_exits_0_or_2_with_one_line(folder, tmp_path, capsys, prompts, prompts_file, options):
    argv = ["generate", "--model", str(folder / "pipe"), "--out", str(tmp_path / "gen"), "--quiet", "--steps", "1"]
    argv += [arg for prompt in prompts for arg in ("--prompt", prompt)] + options
    if prompts_file:
        argv += ["--prompts-file", _path(folder, prompts_file)]
    _cli_property(argv, capsys)


@st.composite
def caption_argv(draw):
    return _options(
        draw,
        {
            "--prompt": texts,
            "--steps": CAPTION_STEPS,
            "--guidance-scale": GUIDANCE,
            "--guidance-interval": INTERVAL,
            "--remasking": _values(["low_confidence", "random"], ["LOW"]),
            "--temperature": _values(["0", "0.5", "2"], BAD_NUMBERS),
            "--max-length": _values(["4", "12"], ["1", "13", "0", "-1"]),
            "--tokens": st.none(),
            "--seed": SEED,
        },
    )


@examples(40)
@given(
    source=mostly(
        st.one_of(
            st.lists(image_files, min_size=1, max_size=2),
            st.just(("--shards", "shards")),
            st.sampled_from([1, 2]).map(lambda n: ("--unconditional", str(n))),
        ),
        st.sampled_from(
            [[], ("--shards", "missing"), ("--shards", "red.png"), ("--unconditional", "-1"), ("--num", "0")]
        ),
    ),
    template=mostly(
        st.sampled_from([None, None, "a [MASK] circle"]), st.sampled_from(["a small circle", "", "[MASK] " * 13])
    ),
    out=mostly(st.sampled_from(["caps.json", "caps.txt"]), st.sampled_from(["dir-exists", "a-file/caps.json"])),
    options=caption_argv(),
)
def test_caption_command_line_exits_0_or_2_with_one_line(folder, tmp_path, capsys, source, template, out, options):
    (tmp_path / "dir-exists").mkdir(exist_ok=True)
    (tmp_path / "a-file").write_text("x")
    argv = ["caption", "--model", str(folder / "pipe"), "--out", str(tmp_path / out), "--quiet", *options]
    if isinstance(source, list):
        argv += [_path(folder, name) for name in source]
    elif source[0] == "--shards":
        argv += ["--shards", str(folder / "shards") if source[1] == "shards" else _path(folder, source[1])]
    else:
        argv += list(source)
    if template is not None:
        argv += ["--template", template]
    _cli_property(argv, capsys)


FOLDER_NUMBERS = itertools.count()


@st.composite
def source_folders(draw, root: Path) -> Path:
    """A folder of random files: images, captions (good, empty, not UTF-8), other files, in subfolders."""
    src = root / f"src{next(FOLDER_NUMBERS)}"
    src.mkdir()
    for i, (sub, kind, caption) in enumerate(
        draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["", "sub/", "a b/"]),
                    _values(["png", "jpg", "JPEG", "webp"], ["gif", "txt-only", "bytes.png"]),
                    _values([b"a red square", b"x" * 300], [None, b"", b"  \n", b"\xff\xfe"]),
                ),
                max_size=4,
            )
        )
    ):
        (src / sub).mkdir(exist_ok=True)
        stem = src / sub / f"image {i}"
        if kind == "bytes.png":
            stem.with_suffix(".png").write_bytes(b"\x00\x01 not an image")
        elif kind != "txt-only":
            PIL.Image.new("RGB", (4, 4), "blue").save(stem.with_suffix(f".{kind}"))
        if caption is not None:
            stem.with_suffix(".txt").write_bytes(caption)
    return src


@examples(40)
@given(data=st.data(), shard_size=_values(["1", "2", "1000"], ["0", "-1", "x"]))
def test_data_folder_command_line_exits_0_or_2_with_one_line(tmp_path, capsys, data, shard_size):
    src = data.draw(source_folders(tmp_path))
    out = tmp_path / f"out-{src.name}"
    _cli_property(["data", "folder", "--src", str(src), "--out", str(out), "--shard-size", shard_size], capsys)
    written = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    captioned = [
        p
        for p in src.rglob("*")
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
        and p.with_suffix(".txt").is_file()
        and p.with_suffix(".txt").read_bytes().strip()
        and p.with_suffix(".txt").read_bytes() != b"\xff\xfe"
    ]
    assert bool(written) == (bool(captioned) and shard_size.lstrip("-").isdigit() and int(shard_size) >= 1)
