"""Hostile and broken data inputs: streamed (http) shards whose server stalls, closes or is gone; captions and images
far beyond any sane size; empty tars and shards without a single caption. Each is a counted skip or one clear error,
never a hang, a crash or a silent run on nothing.

The http tests serve shards from a ThreadingHTTPServer on 127.0.0.1 in a thread of this process; a stalled handler
waits on a threading.Event that the server's teardown sets, and the reader's timeouts are a fraction of a second.
"""

from __future__ import annotations

import io
import json
import random
import re
import socket
import struct
import tarfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import write_tar
from PIL import Image

from mmdiff.config import load_config
from mmdiff.data import folder as folder_module
from mmdiff.data import images as images_module
from mmdiff.data import shards as shards_module
from mmdiff.data.dataset import make_dataloader
from mmdiff.data.remote import RemoteOptions, RemoteShardError
from mmdiff.data.shapes import write_shapes_shards
from mmdiff.data.shards import MAX_CAPTION_BYTES, SkipStats, cap_caption_bytes, iterate_records, read_captions
from mmdiff.data.tokenizer import encode_captions, train_word_level_tokenizer
from mmdiff.training.stages import prepare_tokenizer

TINY = "configs/shapes_tiny.yaml"
# A reader that gives up fast: 0.2 s per socket read, one reconnection, no wait between tries.
FAST = RemoteOptions(timeout=0.2, retries=1, backoff=0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


GOOD = _png(Image.new("RGB", (16, 16), (10, 200, 30)))


def _records_tar(n: int, prefix: str = "k") -> bytes:
    """A tar of n good records (png + txt) as bytes, keys k0 .. k{n-1}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("png", GOOD), ("txt", f"a green box number {i}".encode())):
                info = tarfile.TarInfo(f"{prefix}{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _one_big_record_tar() -> bytes:
    """A tar of one record whose image (noise, about 12 KB as PNG) spans the tar's middle byte, so that a server
    sending half of it sends no complete record."""
    noise = random.Random(0).randbytes(64 * 64 * 3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        image = _png(Image.frombytes("RGB", (64, 64), noise))
        for ext, data in (("png", image), ("txt", b"a noisy box")):
            info = tarfile.TarInfo(f"big.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    assert len(data) // 2 < 512 + len(image)  # the middle byte lies inside the image
    return data


def _blank_png(width: int, height: int) -> bytes:
    """A valid, decodable bilevel PNG of width x height, all black: its rows of zeros compress to a few KB, so even
    a 20000 x 20000 one costs nothing to write (decoding it as RGB would take 1.2 GB)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # the filter byte, then 8 pixels a byte
    comp = zlib.compressobj(9)
    rows_per_call = max(1, (1 << 20) // len(row))
    parts = [comp.compress(row * min(rows_per_call, height - y)) for y in range(0, height, rows_per_call)]
    idat = b"".join(parts) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class ShardServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 over HTTP/1.0, honouring ``Range: bytes=N-``, unless the path's
    mode says otherwise: "stall" (send half the shard, then wait for the teardown), "close" (send half, then close
    the connection), "close_once" (that once, then serve normally). Range is ignored in "stall" and "close": every
    request gets the whole shard's first half again."""

    def __init__(self, files: dict[str, bytes], modes: dict[str, str] | None = None) -> None:
        self.files, self.modes = files, dict(modes or {})
        self.release = threading.Event()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                mode = server.modes.get(self.path, "ok")
                if mode == "close_once":
                    server.modes[self.path], mode = "ok", "close"
                ranged = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                start = int(ranged.group(1)) if ranged and mode == "ok" else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(data[start:])
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if mode == "stall":
                    server.release.wait(30)  # until the test ends (bounded, should the teardown never come)
                # returning closes the connection (HTTP/1.0)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(out, 48, image_size=16, seed=0, val_fraction=0.0, shard_size=16)
    train = out / "train"
    files = {f"/train/{p.name}": p.read_bytes() for p in sorted(train.glob("*.tar"))}
    assert len(files) == 3
    return train, files, train_word_level_tokenizer(read_captions(str(train)))


def _keys(urls, tok, stats: SkipStats, **kwargs):
    loader = make_dataloader(urls, tok, 16, 8, 4, repeat=False, drop_last=False, shuffle_buffer=0, **kwargs)
    out = []
    for batch in loader:
        stats.accumulate(batch["skips"])
        out += [(k, c, p) for k, c, p in zip(batch["keys"], batch["captions"], batch["pixel_values"])]
    return out


# ---------------------------------------------------------------- streamed shards: good, stalled, cut, gone, resumed


def test_http_shards_stream_exactly_like_local_ones(shapes_train):
    train, files, tok = shapes_train
    with ShardServer(files) as server:
        remote_stats, local_stats = SkipStats(), SkipStats()
        remote = _keys(server.url("/train/shard-{000000..000002}.tar"), tok, remote_stats, remote=FAST)
    local = _keys(str(train), tok, local_stats)
    assert len(remote) == 48 and [(k, c) for k, c, _ in remote] == [(k, c) for k, c, _ in local]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(remote, local))
    assert remote_stats.as_dict() == local_stats.as_dict() == {"truncated": local_stats.counts["truncated"]}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_over_http_is_exact(shapes_train, workers):
    train, files, tok = shapes_train

    def keys(urls, skip, n):
        loader = make_dataloader(
            urls, tok, 16, 8, 8, num_workers=workers, seed=4, shuffle_buffer=16, skip_batches=skip, remote=FAST
        )
        it = iter(loader)
        return [next(it)["keys"] for _ in range(n)]

    with ShardServer(files) as server:
        urls = server.url("/train/shard-{000000..000002}.tar")
        full = keys(urls, 0, 10)
        assert keys(urls, 4, 6) == full[4:]  # batches 4.. of an uninterrupted run, read again from the server
    assert keys(str(train), 0, 10) == full  # and the same stream as the local shards give


def test_a_stalled_server_costs_the_rest_of_its_shard_not_the_run(tmp_path):
    shard = _records_tar(8)
    (tmp_path / "local.tar").write_bytes(_records_tar(2, prefix="local"))
    with ShardServer({"/s.tar": shard}, {"/s.tar": "stall"}) as server:
        url = server.url("/s.tar")
        stats, started = SkipStats(), time.monotonic()
        with pytest.warns(RuntimeWarning) as caught:
            keys = [key for key, *_ in iterate_records(url, stats, remote=FAST)]
        elapsed = time.monotonic() - started
        # in the training stream the other shards go on; the skip is in the batches' counts
        loader_stats = SkipStats()
        with pytest.warns(RuntimeWarning):
            streamed = _keys(
                [str(tmp_path / "local.tar"), url], train_word_level_tokenizer(["a"]), loader_stats, remote=FAST
            )
    assert stats.as_dict() == loader_stats.as_dict() == {"network_error": 1}
    assert 0 < len(keys) < 8 and keys == [f"k{i}" for i in range(len(keys))]  # the records before the stall
    assert [k for k, *_ in streamed] == ["local0", "local1", *keys]
    assert elapsed < 10  # two reads of 0.2 s, not forever
    (message,) = {str(w.message) for w in caught}
    assert message.startswith(f"network error reading shard {url} at byte ")
    assert "no data for 0.2 s (read timeout) (gave up after 2 tries)" in message
    assert message.endswith("the rest of the shard is skipped (counted as network_error)")


def test_a_server_that_closes_mid_shard_is_a_counted_network_error(tmp_path):
    with ShardServer(
        {"/s.tar": _records_tar(8), "/one.tar": _one_big_record_tar()}, {"/s.tar": "close", "/one.tar": "close"}
    ) as server:
        stats = SkipStats()
        with pytest.warns(RuntimeWarning, match="the server closed the connection after .* bytes"):
            keys = [key for key, *_ in iterate_records(server.url("/s.tar"), stats, remote=FAST)]
        assert stats.as_dict() == {"network_error": 1} and 0 < len(keys) < 8
        # a shard that gave nothing before the server died: the endless stream stops, naming the network, not the
        # shards or the workers
        loader = make_dataloader(server.url("/one.tar"), train_word_level_tokenizer(["a"]), 16, 4, 2, remote=FAST)
        with pytest.warns(RuntimeWarning), pytest.raises(RemoteShardError) as info:
            next(iter(loader))
    message = str(info.value)
    assert f"network error reading shard {server.url('/one.tar')}" in message and "check the network" in message
    assert "fewer workers" not in message and "\n" not in message


def test_a_reconnect_resumes_at_the_byte_where_the_connection_broke():
    shard = _records_tar(8)
    with ShardServer({"/s.tar": shard}, {"/s.tar": "close_once"}) as server:
        stats = SkipStats()
        keys = [key for key, *_ in iterate_records(server.url("/s.tar"), stats, remote=FAST)]
    assert keys == [f"k{i}" for i in range(8)] and stats.as_dict() == {}  # nothing lost, nothing counted
    (first, _), (second, ranged) = server.requests
    assert first == second == "/s.tar" and 0 < int(ranged.removeprefix("bytes=").rstrip("-")) <= len(shard) // 2


def test_a_dead_server_is_named_with_its_url_and_error(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/s.tar"
    stats = SkipStats()
    with pytest.warns(RuntimeWarning, match=re.escape(f"network error reading shard {url} at byte 0: ")) as caught:
        assert list(iterate_records(url, stats, remote=FAST)) == []
    assert stats.as_dict() == {"network_error": 1} and "Connection refused" in str(caught[0].message)
    # the tokenizer stage over that server: one line naming the shards and what was skipped
    cfg = load_config(TINY, [f"data.train_shards={url}"])
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError) as info:
        prepare_tokenizer(cfg, tmp_path / "run", _MainProcess())
    assert f"data.train_shards='{url}': no usable caption in 1 shard(s) (skipped: network_error=1)" in str(info.value)


def test_remote_options_are_checked():
    for kwargs, message in (
        ({"timeout": 0}, "timeout must be a finite number of seconds > 0"),
        ({"timeout": float("inf")}, "timeout must be"),
        ({"retries": -1}, "retries must be an integer >= 0"),
        ({"retries": 1.5}, "retries must be an integer"),
        ({"backoff": -1}, "backoff must be"),
    ):
        with pytest.raises(ValueError, match=message):
            RemoteOptions(**kwargs)


# ---------------------------------------------------------------- captions and images far beyond any sane size


def test_an_enormous_caption_is_cut_at_read_time_and_counted_once(tmp_path):
    huge = b"a green box " * ((8 << 20) // 12)  # 8 MB of caption, a real one
    write_tar(tmp_path / "s.tar", [("big.png", GOOD), ("big.txt", huge), ("small.png", GOOD), ("small.txt", b"a box")])
    tok = train_word_level_tokenizer(["a green box"])
    stats = SkipStats()
    samples = {k: c for k, c, _ in _keys(str(tmp_path / "s.tar"), tok, stats)}
    assert stats.as_dict() == {"truncated": 1}  # cut bytes and cut tokens: one record, counted once
    assert samples["small"] == "a box"
    big = samples["big"]
    # cut between words: every word whole
    assert MAX_CAPTION_BYTES - 12 < len(big.encode()) <= MAX_CAPTION_BYTES and set(big.split()) == {"a", "green", "box"}
    # the tokenizer stage trains on the cut caption too
    assert sorted(len(c) for c in read_captions(str(tmp_path / "s.tar"))) == [5, len(big)]


def test_caption_cuts_fall_between_words_and_characters(tmp_path, monkeypatch):
    assert cap_caption_bytes(b"short", 10) == (b"short", False)
    assert cap_caption_bytes(b"one two three", 9) == (b"one two", True)
    assert cap_caption_bytes("ééééé".encode(), 5) == ("éé".encode(), True)  # no half character, so no bad_utf8
    assert cap_caption_bytes(b"      words", 8) == (b"      wo", True)  # not a cut to nothing but spaces
    # phrasings from the json are cut the same way, and a json over its limit is not even parsed
    monkeypatch.setattr(shards_module, "MAX_CAPTION_BYTES", 12)
    attrs = json.dumps({"captions": ["a red circle above a blue square"]}).encode()
    write_tar(tmp_path / "s.tar", [("k.png", GOOD), ("k.txt", b"a red circle"), ("k.json", attrs)])
    stats = SkipStats()
    ((_, _, caption, attrs_read),) = iterate_records(str(tmp_path / "s.tar"), stats)
    assert caption == "a red circle" and stats.as_dict() == {}
    assert shards_module.record_phrasings(attrs_read) == ["a red circle"]
    monkeypatch.setattr(shards_module, "MAX_JSON_BYTES", 10)
    stats = SkipStats()
    ((_, _, _, attrs_read),) = iterate_records(str(tmp_path / "s.tar"), stats)
    assert attrs_read is None and stats.as_dict() == {"bad_json": 1}


def test_encode_captions_flags_truncation_at_the_exact_boundary():
    tok = train_word_level_tokenizer(["a b c d e"])
    ids, truncated = encode_captions(tok, ["a b c d", "a b c d e", "a " * 50_000], 4)
    assert truncated.tolist() == [False, True, True] and ids.shape == (3, 4)
    assert ids[0].tolist() == ids[1].tolist()


def test_oversized_images_are_skipped_from_their_header_not_decoded(tmp_path, monkeypatch):
    small = _blank_png(10, 3)
    assert (
        Image.open(io.BytesIO(small)).size == (10, 3)
        and Image.open(io.BytesIO(small)).convert("L").getpixel((9, 2)) == 0
    )
    big, bomb = _blank_png(12000, 12000), _blank_png(20000, 20000)  # over our limit; over PIL's own bomb limit
    assert len(big) < 100_000 and len(bomb) < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    members = [("big.png", big), ("big.txt", b"a big one"), ("bomb.png", bomb), ("bomb.txt", b"a bomb")]
    write_tar(tmp_path / "s.tar", [*members, ("ok.png", GOOD), ("ok.txt", b"a green box")])
    stats, started = SkipStats(), time.monotonic()
    assert [key for key, *_ in iterate_records(str(tmp_path / "s.tar"), stats)] == ["ok"]
    assert stats.as_dict() == {"oversized_image": 2} and time.monotonic() - started < 5
    loader_stats = SkipStats()  # the training stream skips them the same way
    assert [k for k, *_ in _keys(str(tmp_path / "s.tar"), train_word_level_tokenizer(["a"]), loader_stats)] == ["ok"]
    assert loader_stats.as_dict() == {"oversized_image": 2}
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 16 * 16 - 1)  # one limit, read when an image is read
    stats = SkipStats()
    assert list(iterate_records(str(tmp_path / "s.tar"), stats)) == []
    assert stats.as_dict() == {"oversized_image": 3}


def test_data_folder_skips_and_counts_files_beyond_the_size_limits(tmp_path, monkeypatch, capsys):
    from mmdiff.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name, image in (("good", GOOD), ("big", _blank_png(12000, 12000)), ("bomb", _blank_png(20000, 20000))):
        (src / f"{name}.png").write_bytes(image)
        (src / f"{name}.txt").write_text(f"a {name} picture")
    (src / "long.png").write_bytes(GOOD)
    (src / "long.txt").write_text("word " * 400)  # 2 KB: over the lowered caption-file limit
    monkeypatch.setattr(folder_module, "MAX_CAPTION_FILE_BYTES", 1024)
    assert main(["data", "folder", "--src", str(src), "--out", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["written"] == 1 and stats["skipped_too_large"] == 3
    assert [key for key, *_ in iterate_records(str(out))] == ["good"]
    (src / "good.png").unlink()
    assert main(["data", "folder", "--src", str(src), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmdiff data folder: error: 3 images under {src} but none could be converted: 3 over the size limits"


# ---------------------------------------------------------------- empty tars, and shards without a single caption


class _MainProcess:
    """The part of an Accelerator the tokenizer stage uses, for one process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def _empty_shards(folder):
    folder.mkdir()
    with tarfile.open(folder / "a-empty.tar", "w"):
        pass  # a valid tar of nothing but its end-of-archive blocks
    (folder / "b-zero.tar").write_bytes(b"")


def test_empty_tars_are_counted_once(tmp_path):
    _empty_shards(tmp_path / "d")
    (tmp_path / "d" / "c-good.tar").write_bytes(_records_tar(2))
    write_tar(tmp_path / "d" / "d-unsafe.tar", [("../x.txt", b"a caption")])  # members, all refused: not empty
    (tmp_path / "d" / "e-garbage.tar").write_bytes(b"\x01" * 1024)  # a broken first header: corrupt, not empty
    stats = SkipStats()
    assert [key for key, *_ in iterate_records(str(tmp_path / "d"), stats)] == ["k0", "k1"]
    assert stats.as_dict() == {"empty_shard": 2, "unsafe_name": 1, "corrupt_tar": 1}
    assert "empty_shard=2" in stats.summary()
    # read by two workers (fewer shards than consumers), an empty shard is still counted once
    loader_stats = SkipStats()
    tok = train_word_level_tokenizer(["a"])
    assert _keys(str(tmp_path / "d" / "a-empty.tar"), tok, loader_stats, num_workers=2) == []
    assert loader_stats.as_dict() == {"empty_shard": 1}
    with pytest.raises(RuntimeError, match=r"no valid sample in 1 shard\(s\) \(skipped: \{'empty_shard': 1\}\)"):
        next(iter(make_dataloader(str(tmp_path / "d" / "a-empty.tar"), tok, 16, 4, 2)))


def test_a_word_tokenizer_is_refused_an_empty_vocabulary(tmp_path, capsys):
    from mmdiff.cli import main

    with pytest.raises(ValueError, match="the captions hold no word: a word-level tokenizer needs a vocabulary"):
        train_word_level_tokenizer([])
    with pytest.raises(ValueError, match="hold no word seen at least 2 times"):
        train_word_level_tokenizer(["red circle"], min_frequency=2)
    _empty_shards(tmp_path / "d")
    spec, run = str(tmp_path / "d"), tmp_path / "run"
    with pytest.raises(ValueError) as info:
        prepare_tokenizer(load_config(TINY, [f"data.train_shards={spec}"]), run, _MainProcess())
    assert str(info.value) == (
        f"data.train_shards={spec!r}: no usable caption in 2 shard(s) (skipped: empty_shard=2), so tokenizer.kind=word "
        "has no vocabulary to build"
    )
    assert not (run / "tokenizer").exists()
    # through the command line: one line, exit status 2, before any model is built
    argv = ["train", TINY, f"data.train_shards={spec}", "data.val_shards=null", f"train.output_dir={run}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdiff train: error: data.train_shards=") and "empty_shard=2" in err and "\n" not in err
    assert not (run / "tokenizer").exists()
