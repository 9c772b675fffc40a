"""Hostile and broken input that used to escape as a traceback, or to allocate gigabytes before failing: the CLI's
one-line handler (the project's own error classes, MemoryError, the data loader's RuntimeError, a worker's wrapped
error; a genuine bug keeps its traceback), sanity caps on sizes in training configs and in a saved folder's component
configs (checked before anything is built), a sparse 16 GB weights file, seeds of 400 digits, lone surrogates in
prompts and decompression bombs."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from mmdiff.checks import SIZE_CAPS
from mmdiff.cli import main
from mmdiff.config import ConfigError, load_config
from mmdiff.pipelines import PipelineLoadError, check_pipeline_folder, loading

TINY = "configs/shapes_tiny.yaml"
BIG = 10**400


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmdiff {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def sparse_safetensors(path: Path, key: str, shape: list[int]) -> None:
    """A safetensors file with a tiny real header claiming one float32 tensor of `shape`, made as large as the header
    says with `os.truncate`: a sparse file, all holes, that takes no disk space."""
    size = 4
    for n in shape:
        size *= n
    header = json.dumps({key: {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + size)


def png_header(width: int, height: int) -> bytes:
    """A PNG of a 1-bit grey image of width x height whose pixels are missing: PIL reads the size from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- the CLI's one-line handler


def _failing_train(monkeypatch, error: BaseException) -> None:
    def train(*args, **kwargs):
        raise error

    monkeypatch.setattr("mmdiff.training.trainer.train", train)


ALLOCATOR = "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you tried 17 GB"
WORKER_ERROR = (
    "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    '  File "mmdiff/data/dataset.py", line 281, in __iter__\n    raise RuntimeError(...)\n'
    "RuntimeError: consumer 0/2 found no valid sample in 1 shard(s) (skipped: {'corrupt_image': 4})\n"
)


def _project_errors():
    from mmdiff.training.checkpoint import CheckpointError
    from mmdiff.training.resume import NonFiniteLossError

    return [
        (CheckpointError("checkpoint step-3 is damaged"), "checkpoint step-3 is damaged"),  # a RuntimeError
        (NonFiniteLossError("loss is NaN at step 4"), "loss is NaN at step 4"),
        (MemoryError("Cannot allocate memory (os error 12)"), "out of memory: Cannot allocate memory (os error 12)"),
        (MemoryError(), "out of memory: an allocation failed"),
        (RuntimeError(ALLOCATOR), f"out of memory: {ALLOCATOR}"),  # torch on the CPU: a config too large here
        (
            RuntimeError("consumer 0/1 found no valid sample in 1 shard(s)"),
            "consumer 0/1 found no valid sample in 1 shard(s)",
        ),
        (
            RuntimeError(WORKER_ERROR),
            "consumer 0/2 found no valid sample in 1 shard(s) (skipped: {'corrupt_image': 4})",
        ),
        (ValueError("first line\nsecond line"), "first line"),
    ]


@pytest.mark.parametrize(
    "case",
    range(8),
    ids=["checkpoint", "nonfinite", "memory", "memory-empty", "cpu-allocator", "loader", "loader-worker", "two-lines"],
)
def test_project_failures_are_one_line_and_status_2(monkeypatch, capsys, case):
    error, message = _project_errors()[case]
    _failing_train(monkeypatch, error)
    assert main(["train", TINY]) == 2
    err = _one_error_line(capsys, "train")
    assert err == f"mmdiff train: error: {message}"


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA error: device-side assert triggered"), KeyError("model"), AttributeError("no attribute x")],
    ids=["torch-runtime-error", "key-error", "attribute-error"],
)
def test_programming_errors_keep_their_traceback(monkeypatch, error):
    _failing_train(monkeypatch, error)
    with pytest.raises(type(error)):
        main(["train", TINY])


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_without_a_valid_sample_are_one_line(tmp_path, capsys, workers):
    from conftest import write_tar

    (tmp_path / "bad").mkdir()
    members = [(f"{i:04d}.{ext}", data) for i in range(8) for ext, data in (("png", b"no png"), ("txt", b"a circle"))]
    write_tar(tmp_path / "bad" / "shard-000000.tar", members)
    overrides = [f"data.train_shards={tmp_path / 'bad'}", "data.val_shards=null", f"train.output_dir={tmp_path / 'r'}"]
    overrides += [f"data.num_workers={workers}", "data.image_size=16", "vae.block_out_channels=[8,8]"]
    assert main(["train", TINY, *overrides, "vae.batch_size=4", "data.shuffle_buffer=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the VAE stage's progress bar
    assert err.startswith("mmdiff train: error: ") and "Traceback" not in err, err
    # with workers, torch wrapped it in the worker's whole traceback
    assert f"consumer 0/{max(workers, 1)} found no valid sample in 1 shard(s)" in err and "corrupt_image" in err


# ---------------------------------------------------------------- sanity caps: training configs


@pytest.mark.parametrize(
    "override,kind",
    [
        ("model.hidden_size=1000000000", "width"),
        ("model.depth=1000000", "depth"),
        ("model.num_heads=100000", "heads"),
        ("model.mlp_ratio=1e9", "mlp_ratio"),
        ("data.max_length=1000000000", "text_length"),
        ("vae.latent_channels=1000000", "channels"),
        ("vae.block_out_channels=[16,1000000000,64]", "channels"),
        ("diffusion.num_train_timesteps=1000000000", "timesteps"),
        ("train.batch_size=1000000000", "batch_size"),
        (f"model.hidden_size={BIG}", "width"),
    ],
)
def test_absurd_sizes_in_a_training_config_name_the_key_and_the_cap(override, kind):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    message = str(info.value)
    assert message.startswith(key) and f"is above the sanity cap {SIZE_CAPS[kind][0]}: " in message, message
    assert len(message) < 200  # a 400-digit value is shown by its length


def test_train_refuses_an_absurd_size_in_one_line(tmp_path, capsys):
    assert main(["train", TINY, "diffusion.num_train_timesteps=1000000000", f"train.output_dir={tmp_path / 'r'}"]) == 2
    assert "diffusion.num_train_timesteps=1000000000 is above the sanity cap 100000" in _one_error_line(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_every_shipped_config_is_under_the_caps():
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path, ["data.train_shards=x"])  # raises ConfigError on a cap
    check_pipeline_folder(Path("assets/shapes_small"))


# ---------------------------------------------------------------- sanity caps: a saved folder's component configs


def _edit(folder: Path, component: str, file: str, **values) -> Path:
    path = folder / component / file
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "component,file,values,shown",
    [
        ("transformer", "config.json", {"hidden_size": 10**9}, "hidden_size=1000000000 is above the sanity cap 65536"),
        ("transformer", "config.json", {"depth": 10**6}, "depth=1000000 is above the sanity cap 1024"),
        ("transformer", "config.json", {"vocab_size": 10**9}, "vocab_size=1000000000 is above the sanity cap 1048576"),
        ("transformer", "config.json", {"max_text_length": 10**9}, "max_text_length=1000000000 is above the sanity"),
        ("transformer", "config.json", {"hidden_size": BIG}, "hidden_size=100000000000... (401 digits) is above"),
        ("transformer", "config.json", {"hidden_size": -8}, "hidden_size=-8 is a size below 0"),
        ("vae", "config.json", {"block_out_channels": [8, 10**9]}, "block_out_channels[1]=1000000000 is above"),
        ("vae", "config.json", {"latent_channels": 10**9}, "latent_channels=1000000000 is above the sanity cap 16384"),
        (
            "scheduler",
            "scheduler_config.json",
            {"num_train_timesteps": 10**9},  # diffusers allocated 2.3 GB of schedule for it before failing
            "num_train_timesteps=1000000000 is above the sanity cap 100000",
        ),
    ],
)
def test_absurd_sizes_in_a_folder_are_refused_before_anything_is_built(saved_pipe, component, file, values, shown):
    path = _edit(saved_pipe, component, file, **values)
    before = _peak_rss_bytes()
    with pytest.raises(PipelineLoadError) as info:
        check_pipeline_folder(saved_pipe)
    message = str(info.value)
    assert message.startswith(f"component {component!r}: {shown}") and str(path) in message, message
    assert "\n" not in message and len(message) < 400
    assert _peak_rss_bytes() - before < 500 * 2**20  # nothing of the claimed size was allocated


def test_generate_refuses_a_folder_with_absurd_timesteps_in_one_line(saved_pipe, tmp_path, capsys):
    _edit(saved_pipe, "scheduler", "scheduler_config.json", num_train_timesteps=10**9)
    argv = ["generate", "--model", str(saved_pipe), "--prompt", "x", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = _one_error_line(capsys, "generate")
    assert "component 'scheduler': num_train_timesteps=1000000000 is above the sanity cap 100000" in err


def test_configs_that_are_huge_or_no_object_are_refused_unread(saved_pipe):
    config = saved_pipe / "transformer" / "config.json"
    os.truncate(config, 2**34)  # a 16 GB sparse config.json: refused by its size, never read
    with pytest.raises(PipelineLoadError, match=r"config\.json is 17,179,869,184 bytes, not a config"):
        check_pipeline_folder(saved_pipe)
    config.write_text("[1, 2]")
    with pytest.raises(PipelineLoadError, match=r"component 'transformer': .*config\.json is not a JSON object"):
        check_pipeline_folder(saved_pipe)


def test_a_meta_build_allocates_nothing_even_inside_the_caps(saved_pipe):
    # within every cap, but 4 * 65536 * 65536 floats in one text position table: built on torch's meta device (and
    # refused for not matching the weights), not allocated by the parameter's torch.zeros before it was moved there
    _edit(saved_pipe, "transformer", "config.json", hidden_size=65536, num_heads=8, max_text_length=65536)
    before = _peak_rss_bytes()
    with pytest.raises(PipelineLoadError, match="does not match its weights"):
        check_pipeline_folder(saved_pipe)
    assert _peak_rss_bytes() - before < 500 * 2**20


# ---------------------------------------------------------------- a sparse 16 GB weights file


def test_a_sparse_16_gb_weights_file_is_refused_from_its_header(saved_pipe, monkeypatch):
    monkeypatch.setattr(loading, "memory_bytes", lambda: 2**40)  # as on a machine that could hold it: the header
    weights = saved_pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    sparse_safetensors(weights, "token_embed.weight", [2**32])
    assert weights.stat().st_size > 16 * 10**9
    with pytest.raises(PipelineLoadError, match=r"token_embed\.weight: config \(\d+, \d+\) vs file \(4294967296,\)"):
        check_pipeline_folder(saved_pipe)


def test_weights_larger_than_memory_are_refused_before_loading(saved_pipe, monkeypatch, tmp_path, capsys):
    weights = saved_pipe / "vae" / "diffusion_pytorch_model.safetensors"
    sparse_safetensors(weights, "encoder.conv_in.weight", [2**32])
    monkeypatch.setattr(loading, "memory_bytes", lambda: 8 * 2**30)  # this machine, as one with 8 GiB
    with pytest.raises(PipelineLoadError) as info:
        check_pipeline_folder(saved_pipe)
    assert f"its weights files take 16.0 GiB ({weights} alone 16.0 GiB)" in str(info.value)
    assert "more than this machine's 8.0 GiB of memory (RAM and swap)" in str(info.value)
    argv = ["generate", "--model", str(saved_pipe), "--prompt", "x", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2  # was a MemoryError part way through diffusers' load
    assert "more than this machine's 8.0 GiB of memory" in _one_error_line(capsys, "generate")


# ---------------------------------------------------------------- seeds of 400 digits


def test_a_seed_of_400_digits_is_one_short_line(saved_pipe, tmp_path, capsys):
    base = ["--model", str(saved_pipe), "--out", str(tmp_path / "o")]
    assert main(["generate", *base, "--prompt", "x", "--quiet", "--seed", str(BIG)]) == 2
    err = _one_error_line(capsys, "generate")
    assert "--seed 100000000000... (401 digits) is out of range: it must lie in [0, 2**64 - 1]" in err
    for command in ("eval", "sweep"):  # was "Overflow when unpacking long long" from torch
        assert main([command, *base, "--shards", str(tmp_path), "--seed", str(BIG)]) == 2
        assert "(401 digits) is out of range: it must lie in [0, 2**63 - 1]" in _one_error_line(capsys, command)
    assert main(["generate", *base, "--prompt", "x", "--seed", "1e400"]) == 2
    assert "argument --seed: invalid int value: '1e400'" in _one_error_line(capsys, "generate")


# ---------------------------------------------------------------- prompts that are not text


@pytest.mark.parametrize(
    "argv,option",
    [
        (["generate", "--prompt", "a \udcff red circle"], "--prompt"),  # argv bytes b"\xff", surrogate-escaped
        (["generate", "--prompt", "x", "--negative-prompt", "\ud800"], "--negative-prompt"),
        (["caption", "--unconditional", "1", "--prompt", "a \udcff"], "--prompt"),
        (["caption", "--unconditional", "1", "--template", "a [MASK] \udcff"], "--template"),
    ],
)
def test_a_lone_surrogate_in_a_prompt_is_named(saved_pipe, tmp_path, capsys, argv, option):
    # was the tokenizer's "TextEncodeInput must be Union[TextInputSequence, ...]"
    assert main([*argv, "--model", str(saved_pipe), "--out", str(tmp_path / "o.json"), "--quiet"]) == 2
    err = _one_error_line(capsys, argv[0])
    assert f"{option} holds a lone surrogate U+D" in err and "bytes that are not UTF-8 text" in err


def test_a_prompts_file_with_an_encoded_surrogate_is_not_utf8(saved_pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\na \xed\xa0\x80 square\n")  # "\ud800" written as (CESU-8) bytes
    argv = ["generate", "--model", str(saved_pipe), "--prompts-file", str(prompts), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert f"--prompts-file {prompts} is not UTF-8 text (byte 15)" in _one_error_line(capsys, "generate")


@pytest.mark.skipif(os.name != "posix", reason="argv as raw bytes is POSIX")
def test_non_utf8_argv_bytes_through_a_real_process(saved_pipe, tmp_path):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "mmdiff.cli", "generate", "--model", str(saved_pipe), "--prompt", b"a \xff red"]
    done = subprocess.run([*argv, "--out", str(out), "--quiet"], capture_output=True, timeout=300)
    err = done.stderr.decode("utf-8", "replace").strip()
    assert done.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert (
        "mmdiff generate: error: --prompt holds a lone surrogate U+DCFF at character 2, bytes that are not UTF-8" in err
    )
    assert not out.exists()


# ---------------------------------------------------------------- decompression bombs (the CLI; the page: test_serve_limits)


def test_caption_refuses_a_decompression_bomb_in_one_line(saved_pipe, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 20_000))  # 400 M pixels: PIL's DecompressionBombError, an Exception
    assert main(["caption", "--model", str(saved_pipe), str(bomb), "--out", str(tmp_path / "c.json")]) == 2
    err = _one_error_line(capsys, "caption")
    assert str(bomb) in err and "DecompressionBombError" in err
