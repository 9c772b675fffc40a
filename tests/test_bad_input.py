"""Bad input through the real command line: one line on stderr naming the problem and exit status 2, never a
traceback, never silently accepted (issue 15). Config errors are also checked where they are raised (ConfigError)."""

from __future__ import annotations

import PIL.Image
import pytest

from mmdiff.cli import main
from mmdiff.config import ConfigError, load_config

TINY = "configs/shapes_tiny.yaml"


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmdiff {command}: error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------- 1. caption (and vary) given files that are no images


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"a small red circle\n", "is not an image PIL can read"),
        # older Pillow (10.0) takes these bytes for some format's header and then fails to decode them
        (bytes(range(256)) * 4, ("is not an image PIL can read", "is damaged")),
        (None, "image file not found"),
    ],
    ids=["empty", "text", "random-bytes", "missing"],
)
@pytest.mark.parametrize("command", ["caption", "vary"])
def test_caption_and_vary_name_a_file_that_is_no_image(saved_pipe, tmp_path, capsys, command, content, message):
    path = tmp_path / "picture.png"
    if content is not None:
        path.write_bytes(content)
    assert main([command, "--model", str(saved_pipe), str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = _one_error_line(capsys, command)
    messages = message if isinstance(message, tuple) else (message,)
    assert any(m in err for m in messages) and str(path) in err


def test_caption_names_a_truncated_image_and_a_folder(saved_pipe, tmp_path, capsys):
    whole = tmp_path / "whole.png"
    PIL.Image.effect_noise((64, 64), 50).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:300])  # the header reads fine; the pixels are missing
    for path, message in ((cut, "is damaged"), (tmp_path, "is not a file")):
        assert main(["caption", "--model", str(saved_pipe), str(path), "--out", str(tmp_path / "o.json")]) == 2
        err = _one_error_line(capsys, "caption")
        assert message in err and str(path) in err
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------- 2. config YAML syntax errors


def test_train_names_the_file_and_line_of_a_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train_shards: x\n  image_size: 32\n train:\n  lr: 1\n")  # line 4 is indented by one
    assert main(["train", str(bad)]) == 2
    err = _one_error_line(capsys, "train")
    assert f"config file {bad}: YAML syntax error at line 4" in err
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: YAML syntax error at line 2, column 1: expected ',' or ']'"):
        load_config(bad)


@pytest.mark.parametrize(
    "text,message",
    [
        ("data:\n\ttrain_shards: x\n", "YAML syntax error at line 2"),
        ("data:\n  train_shards: x\n  train_shards: y\n", "line 3, column 3: found duplicate key train_shards"),
        ("data: *nowhere\n", "line 1, column 7: found undefined alias"),
        ("- 1\n- 2\n", "must hold a mapping of sections (data:, train:, ...), got a list"),
        ("0\n", "got the value '0'"),  # omegaconf itself fails an assertion on a scalar document
        ("a: 1\n---\nb: 2\n", "line 2, column 1: expected a single document in the stream but found another"),
        ("model:\n  hiden_size: 8\n", "unknown config key 'model.hiden_size'"),
        ("data: 5\n", "config key 'data' is a section, not a value (got 5)"),
    ],
)
def test_malformed_config_files_are_config_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.train_shards=x"])
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_config_file_that_is_not_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01 not yaml")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


# ---------------------------------------------------------------- 3. numeric settings out of range


@pytest.mark.parametrize(
    "override,interval",
    [
        ("train.lr=0", "(0, inf)"),
        ("train.lr=-1e-4", "(0, inf)"),
        ("train.lr=nan", "(0, inf)"),
        ("train.lr=inf", "(0, inf)"),
        ("train.batch_size=0", "[1, inf)"),
        ("train.max_steps=-5", "[1, inf)"),
        ("train.grad_accum_steps=0", "[1, inf)"),
        ("train.ema_decay=1.5", "[0, 1]"),
        ("train.warmup_steps=-1", "[0, inf)"),
        ("train.adam_beta2=1", "[0, 1)"),
        ("train.min_lr_ratio=2", "[0, 1]"),
        ("train.grad_clip=0", "(0, inf]"),
        ("train.log_every=0", "[1, inf)"),
        ("train.checkpoint_every=0", "[1, inf)"),
        ("train.keep_checkpoints=0", "[1, inf)"),
        ("train.max_minutes=0", "(0, inf)"),
        ("train.seed=-1", "[0, 4294967295]"),
        ("data.image_size=0", "[1, inf)"),
        ("data.max_length=0", "[1, inf)"),
        ("data.num_workers=-1", "[0, inf)"),
        ("diffusion.image_cond_drop=1.0", "[0, 1)"),
        ("diffusion.text_cond_drop=-0.1", "[0, 1)"),
        ("diffusion.image_loss_weight=-1", "[0, inf)"),
        ("diffusion.mask_eps=0", "(0, 1)"),
        ("diffusion.num_train_timesteps=0", "[1, inf)"),
        ("model.num_heads=0", "[1, inf)"),  # was a ZeroDivisionError in the divisibility check
        ("model.depth=0", "[1, inf)"),
        ("model.mlp_ratio=0", "(0, inf)"),
        ("vae.lr=0", "(0, inf)"),
        ("sample.guidance_scale=-1", "[0, inf)"),
    ],
)
def test_numeric_settings_out_of_range_name_the_key_and_the_range(override, interval):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert str(info.value).startswith(f"{key}=") and f"must lie in {interval}" in str(info.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["vae.block_out_channels=[]"], "vae.block_out_channels=[] must be a non-empty list"),
        (["diffusion.image_loss_weight=0", "diffusion.text_loss_weight=0"], "both 0: nothing to train"),
        (["model.hidden_size=6", "model.num_heads=2"], "model.hidden_size=6 must be a multiple of 4"),
        (["data.image_size=36"], "data.image_size=36 must be a multiple of 8"),  # 3 VAE blocks x patch 2
    ],
)
def test_settings_that_cannot_work_together(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TINY, overrides)


def test_train_refuses_a_bad_lr_before_anything_starts(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", TINY, "train.lr=0", f"train.output_dir={run}"]) == 2
    assert "train.lr=0.0 is out of range: it must lie in (0, inf)" in _one_error_line(capsys, "train")
    assert not run.exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=[1,2", "override 'train.lr=[1,2': YAML syntax error"),  # was a yaml ParserError
        ("train=3", "config key 'train' is a section, not a value"),  # was an AttributeError in the explanation
        ("=3", "override '=3' has no valid key"),
        ("train..lr=3", "has no valid key"),
        ("[=", "has no valid key"),  # was an IndexError inside omegaconf's key parser
        ("vae.block_out_channels[0]=8", "has no valid key"),  # was a dict merged into the list: TypeError
    ],
)
def test_malformed_overrides_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(TINY, [override])


# ---------------------------------------------------------------- 4. data folder with nothing to convert


def test_data_folder_without_images_exits_2_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "notes.txt").write_text("a caption without an image")
    assert main(["data", "folder", "--src", str(src), "--out", str(out)]) == 2
    assert f"no images (.png/.jpg/.jpeg/.webp) under {src}" in _one_error_line(capsys, "data folder")
    assert not out.exists()


def test_data_folder_with_images_but_no_captions_exits_2_and_keeps_old_shards(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "c.webp"):
        PIL.Image.new("RGB", (8, 8)).save(src / name)
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"an earlier conversion")
    assert main(["data", "folder", "--src", str(src), "--out", str(out)]) == 2
    assert f"3 images under {src} but none has a same-named .txt caption" in _one_error_line(capsys, "data folder")
    assert [p.name for p in out.iterdir()] == ["shard-000000.tar"]  # nothing removed, nothing half written

    (src / "a.txt").write_text("   \n")
    assert main(["data", "folder", "--src", str(src), "--out", str(out)]) == 2
    err = _one_error_line(capsys, "data folder")
    assert "none could be converted: 2 without a same-named .txt caption, 1 with an empty or non-UTF-8 caption" in err


def test_data_folder_with_some_captions_still_counts_the_rest_as_skipped(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ("a", "b"):
        PIL.Image.new("RGB", (8, 8)).save(src / f"{name}.png")
    (src / "a.txt").write_text("a black square")
    assert main(["data", "folder", "--src", str(src), "--out", str(out)]) == 0
    assert '"written": 1' in capsys.readouterr().out and (out / "shard-000000.tar").is_file()


def test_data_folder_src_and_out_that_are_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(src / "a.png")
    (src / "a.txt").write_text("a black square")
    for args, message in (
        (["--src", str(src / "a.png"), "--out", str(tmp_path / "o")], "is a file, not a folder"),
        (["--src", str(src), "--out", str(src / "a.txt")], "is a file; give a folder"),
        (["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "image folder not found"),
    ):
        assert main(["data", "folder", *args]) == 2
        assert message in _one_error_line(capsys, "data folder")


# ---------------------------------------------------------------- found by the property tests (test_properties.py)


def test_config_merges_that_omegaconf_fails_inside_are_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("0\n")  # omegaconf.OmegaConf.create("0") fails an internal assertion
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(path)
    # a plain TypeError from omegaconf 2.4's merge (2.3 raises its own merge error): the override is named either way
    with pytest.raises(ConfigError, match=r"override 'train\.trackers\.extra=': "):
        load_config(TINY, ["train.trackers.extra="])


def test_pipeline_arguments_of_the_wrong_type_get_own_messages(pipe, i2t):
    import numpy as np
    import torch

    cases = [
        ({"guidance_interval": "ab"}, ValueError, "guidance_interval must be"),  # was float('a') from a genexpr
        ({"guidance_interval": 0.5}, ValueError, "guidance_interval must be"),  # was "float is not iterable"
        ({"guidance_interval": (None, 1.0)}, ValueError, "guidance_interval must be"),
        ({"guidance_rescale": "0.5"}, TypeError, "guidance_rescale must be a number"),  # was numpy's ufunc error
        ({"generator": 0}, TypeError, "generator must be a torch.Generator"),  # was diffusers' AttributeError
        ({"generator": [0]}, TypeError, "generator must be a list of torch.Generator"),
        ({"num_inference_steps": 1001}, ValueError, "more than the 1000 the scheduler"),  # was diffusers' ValueError
        ({"num_inference_steps": 10**400}, ValueError, "more than the 1000 the scheduler"),
        ({"guidance_scale": 10**400}, ValueError, "guidance_scale must be a finite number"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, TypeError, "latents must be a float tensor"),
        ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, ValueError, "latents must be finite"),  # NaN images
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            pipe("a red circle", num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)
    with pytest.raises(TypeError, match="temperature must be a number"):
        i2t(PIL.Image.new("RGB", (8, 8)), temperature="0.5", num_inference_steps=1)
    with pytest.raises(ValueError, match="more than the 16777216 the scheduler can take"):  # was torch's overflow
        i2t(PIL.Image.new("RGB", (8, 8)), num_inference_steps=10**20)
    nan_image = PIL.Image.new("F", (8, 8), float("nan"))  # was cast to black pixels with a numpy RuntimeWarning
    with pytest.raises(ValueError, match=r"image 0: a float \(mode F\) PIL image must be finite"):
        i2t(nan_image, num_inference_steps=1)
    with pytest.raises(TypeError, match="guidance_scales must be a number, got str"):  # was float('a') in a listcomp
        pipe.guidance_sweep("a red circle", [1.0, "a"], num_inference_steps=1)
    assert pipe("a red circle", num_inference_steps=1, guidance_scale=np.float32(2.0)).images  # numpy numbers work


def test_a_guidance_scale_that_overflows_is_refused_not_returned_as_nan(pipe, i2t):
    # finite scales, so the argument checks pass; the guided numbers overflow float32 (NaN pixels / captions from
    # NaN probabilities were returned before)
    for output_type in ("pil", "latent"):
        with pytest.raises(ValueError, match="sampling produced NaN or inf values"):
            pipe("a red circle", guidance_scale=1e27, num_inference_steps=2, output_type=output_type)
    with pytest.raises(ValueError, match="NaN or inf token probabilities: guidance_scale=1e\\+300"):
        i2t(PIL.Image.new("RGB", (8, 8)), guidance_scale=1e300, num_inference_steps=2)


def test_a_prompt_of_pad_tokens_is_unconditional_not_nan(pipe, tokenizer):
    import numpy as np
    import torch

    def sample(prompt):
        return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    padded = sample([tokenizer.pad_token, "a red circle"])  # its row had no key to attend to: NaN pixels
    assert np.isfinite(padded).all()
    np.testing.assert_array_equal(padded[:1], sample(["", "a red circle"])[:1])


def test_argparse_errors_are_one_line_and_returned(saved_pipe, capsys):
    assert main(["generate", "--model", str(saved_pipe), "--steps", "x"]) == 2  # returned, not raised (SystemExit)
    err = _one_error_line(capsys, "generate")
    assert "argument --steps: invalid int value: 'x' (see mmdiff generate --help)" in err
    assert main(["data", "folder", "--src", "s", "--out", "o", "--shard-size", "1.5"]) == 2
    _one_error_line(capsys, "data folder")
    assert main(["generate", "--help"]) == 0 and "--guidance-scale" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "x"], "--device 'x' is not a device"),  # was torch's RuntimeError
        (["--device", "meta"], "this machine has no meta device"),  # was "META device type not an accelerator"
        (["--seed", str(2**64)], "--seed 18446744073709551616 is out of range"),  # was torch's overflow error
        (["--dtype", "float64"], "argument --dtype: invalid choice"),
    ],
)
def test_generate_device_seed_and_dtype(saved_pipe, tmp_path, capsys, extra, message):
    argv = ["generate", "--model", str(saved_pipe), "--prompt", "x", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, *extra]) == 2
    assert message in _one_error_line(capsys, "generate")


def test_quiet_leaves_stderr_to_the_error_line(saved_pipe, tmp_path, capsys):
    # the error comes after loading: diffusers' "Loading pipeline components" bar used to precede it
    argv = ["generate", "--model", str(saved_pipe), "--prompt", "x", "--height", "18", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "height=18 cannot be produced" in _one_error_line(capsys, "generate")


def test_generate_prompts_file_that_is_no_text(saved_pipe, tmp_path, capsys):
    binary, blank = tmp_path / "prompts.bin", tmp_path / "blank.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    blank.write_text("\n  \n")
    for path, message in (
        (binary, "is not UTF-8 text"),  # was "'utf-8' codec can't decode ..." without the file's name
        (tmp_path, "is not a file"),  # was IsADirectoryError, a traceback
        (blank, "holds no prompts"),
        (tmp_path / "missing.txt", "no such file"),
    ):
        argv = ["generate", "--model", str(saved_pipe), "--prompts-file", str(path), "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        err = _one_error_line(capsys, "generate")
        assert message in err and str(path) in err


def test_caption_sources_that_give_nothing_or_conflict(saved_pipe, tmp_path, capsys):
    from mmdiff.data.shapes import write_shapes_shards

    write_shapes_shards(tmp_path / "data", 4, image_size=16, seed=0, val_fraction=0.0, shard_size=4)
    image = tmp_path / "red.png"
    PIL.Image.new("RGB", (8, 8), "red").save(image)
    base = ["caption", "--model", str(saved_pipe), "--out", str(tmp_path / "c.json"), "--quiet"]
    for extra, message in (
        (["--shards", str(tmp_path / "data" / "train"), "--num", "0"], "--num must be >= 1"),  # captioned 1 anyway
        (["--shards", str(image)], "no readable image-caption records"),  # was "give image files, --shards, ..."
        ([str(image), "--unconditional", "2"], "--unconditional N takes N >= 1 and no image files"),  # was ignored
        (["--unconditional", "-1"], "--unconditional N takes N >= 1"),
    ):
        assert main([*base, *extra]) == 2
        assert message in _one_error_line(capsys, "caption")


def test_an_out_path_that_cannot_be_written_is_refused_before_sampling(saved_pipe, tmp_path, capsys):
    image, a_file = tmp_path / "red.png", tmp_path / "a-file"
    PIL.Image.new("RGB", (8, 8), "red").save(image)
    a_file.write_text("x")
    for command, out, message in (
        (["caption", str(image)], tmp_path, "is a folder; give a .json or .txt file"),  # was IsADirectoryError
        (["caption", str(image)], a_file / "c.json", f"{a_file} is a file, not a folder"),  # was FileExistsError
        (["generate", "--prompt", "x"], a_file, "is a file; give a folder"),
    ):
        assert main([*command, "--model", str(saved_pipe), "--out", str(out), "--quiet"]) == 2
        assert message in _one_error_line(capsys, command[0])
