"""The data formats people have: imagefolder, CSV/TSV/JSONL tables, COCO captions, img2dataset shards, Hugging Face
datasets, and `pipe:` shard urls. Each converts (or reads) with bad rows counted, and a malformed file is one line.

Every test writes its own tiny data: 8x8 images, a handful of rows.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmdiff.cli import main
from mmdiff.data.dataset import make_dataloader
from mmdiff.data.formats import convert_coco, convert_imagefolder, convert_table
from mmdiff.data.shards import SkipStats, expand_urls, iterate_records, read_captions
from mmdiff.data.tokenizer import train_word_level_tokenizer
from mmdiff.eval.records import load_eval_records

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="the optional `datasets` package is not installed")


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image_bytes((40 * i, 200, 30)))


def records(out: Path) -> dict[str, tuple[str, dict | None, tuple[int, int]]]:
    stats = SkipStats()
    found = {key: (caption, attrs, image.size) for key, image, caption, attrs in iterate_records(str(out), stats)}
    assert stats.total == 0, stats.summary()  # what was packed reads back without a single skip
    return found


def run_cli(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_jsonl_converts_with_every_kind_of_skip_counted(tmp_path):
    src = tmp_path / "imagefolder"
    write_images(src, ["a.png", "sub/b.png", "c.png"])
    (src / "broken.png").write_bytes(b"not an image at all")
    rows = [
        {"file_name": "a.png", "text": "a red square", "source": "camera"},
        {"file_name": "sub/b.png", "text": "  a green square  "},
        {"file_name": "c.png", "text": ""},  # empty caption
        {"file_name": "gone.png", "text": "a missing file"},
        {"file_name": "broken.png", "text": "an unreadable image"},
        {"file_name": "../escape.png", "text": "outside the folder"},
        {"text": "no file_name"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    write_images(tmp_path, ["escape.png"])

    stats = convert_imagefolder(src, tmp_path / "out", shard_size=1)
    assert {k: v for k, v in stats.items() if v and k != "shards"} == {
        "written": 2,
        "skipped_bad_caption": 1,
        "skipped_missing_image": 1,
        "skipped_bad_image": 1,
        "skipped_outside_src": 1,
        "skipped_bad_row": 2,
    }
    assert len(stats["shards"]) == 2
    assert records(tmp_path / "out") == {
        "a": ("a red square", {"source": "camera"}, (8, 8)),
        "sub/b": ("a green square", None, (8, 8)),
    }


def test_imagefolder_csv_with_a_named_caption_column_through_the_cli(tmp_path, capsys):
    src = tmp_path / "imagefolder"
    write_images(src, ["train/x.jpg", "train/y.jpg"])
    (src / "train" / "metadata.csv").write_text("file_name,text,prompt\nx.jpg,ignored,a blue dot\ny.jpg,no,a cat\n")

    code, stats, _ = run_cli(["data", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out"),
                              "--caption-column", "prompt"], capsys)  # fmt: skip
    assert code == 0 and stats["written"] == 2
    assert {k: v[0] for k, v in records(tmp_path / "out").items()} == {"train/x": "a blue dot", "train/y": "a cat"}

    code, _, err = run_cli(["data", "imagefolder", "--src", str(src), "--out", str(tmp_path / "o2"),
                            "--caption-column", "title"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "mmdiff data imagefolder: error:" in err and "no caption column 'title' (columns: file_name, text" in err


def test_imagefolder_without_metadata_is_one_line(tmp_path, capsys):
    write_images(tmp_path / "src", ["a.png"])
    code, _, err = run_cli(
        ["data", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "no metadata.jsonl or metadata.csv under" in err


# ---------------------------------------------------------------- CSV / TSV / JSONL tables


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_tables_convert_relative_and_absolute_paths(tmp_path, kind):
    write_images(tmp_path / "imgs", ["one.png", "two.webp"])
    absolute = tmp_path / "elsewhere" / "three.png"
    write_images(absolute.parent, [absolute.name])
    rows = [("imgs/one.png", "the first image"), ("imgs/two.webp", "the second"), (str(absolute), "the third")]
    rows += [("imgs/missing.png", "gone"), ("imgs/one.png", "")]
    table = tmp_path / "lists" / f"pairs.{kind}"
    table.parent.mkdir()
    if kind == "jsonl":
        table.write_text("".join(json.dumps({"image": f"../{p}" if p.startswith("imgs") else p, "caption": c}) + "\n"
                                 for p, c in rows))  # fmt: skip
    else:
        sep = "\t" if kind == "tsv" else ","
        lines = [f"image{sep}caption"] + [f"{'../' + p if p.startswith('imgs') else p}{sep}{c}" for p, c in rows]
        table.write_text("\n".join(lines) + "\n")

    stats = convert_table(table, tmp_path / "out")
    assert (stats["written"], stats["skipped_missing_image"], stats["skipped_bad_caption"]) == (3, 1, 1)
    captions = sorted(caption for caption, _, _ in records(tmp_path / "out").values())
    assert captions == ["the first image", "the second", "the third"]


def test_a_table_row_with_too_many_fields_is_a_bad_row_not_a_crash(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "t.csv").write_text('path,text\na.png,"a dot"\na.png,a dot,extra\n,no path\n')
    stats = convert_table(tmp_path / "t.csv", tmp_path / "out", shard_size=10)
    assert (stats["written"], stats["skipped_bad_row"]) == (1, 2)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("t.csv", b"", "is empty: a CSV table needs a header line"),
        ("t.csv", b"\xff\xfe\x00bad", "is not UTF-8 text"),
        ("t.csv", b"file,words\na.png,hello\n", "none of the image columns file_name, image, image_path, path"),
        ("t.parquet", b"PAR1", "expected a .csv, .tsv or .jsonl table"),
        ("t.jsonl", b"{broken\n[1, 2]\n", "none of the image columns"),
    ],
)
def test_a_malformed_table_is_one_line_and_exit_2(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-000000.tar").write_bytes(b"an earlier conversion")
    code, _, err = run_cli(["data", "table", "--src", str(tmp_path / name), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("mmdiff data table: error:") and message in err
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == b"an earlier conversion"  # nothing touched


def test_a_table_of_which_nothing_converts_says_why_and_leaves_out_alone(tmp_path):
    (tmp_path / "t.csv").write_text("image,text\nnope.png,a caption\nnope2.png,\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-000000.tar").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"nothing to convert in .*t\.csv: 1 missing_image, 1 bad_caption"):
        convert_table(tmp_path / "t.csv", tmp_path / "out")
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == b"keep"


# ---------------------------------------------------------------- COCO captions


def coco_fixture(tmp_path: Path) -> tuple[Path, Path]:
    write_images(tmp_path / "val2017", ["000001.jpg", "000002.jpg", "000003.jpg"])
    captions = {
        "info": {"description": "tiny"},
        "images": [
            {"id": 1, "file_name": "000001.jpg", "width": 8, "height": 8},
            {"id": 2, "file_name": "000002.jpg"},
            {"id": 3, "file_name": "000003.jpg"},  # no caption
            {"id": 4, "file_name": "000004.jpg"},  # no file
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog on a beach."},
            {"id": 11, "image_id": 2, "caption": "A red bus"},
            {"id": 12, "image_id": 1, "caption": "a  brown dog runs\n"},
            {"id": 13, "image_id": 1, "caption": "Sand and a dog"},
            {"id": 14, "image_id": 4, "caption": "a bus that is not there"},
            {"id": 15, "image_id": 99, "caption": "an annotation of no image"},
        ],
    }
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(captions))
    return path, tmp_path / "val2017"


def test_coco_keeps_one_record_per_image_and_every_caption_as_references(tmp_path, capsys):
    captions, images = coco_fixture(tmp_path)
    out = tmp_path / "out"
    code, stats, _ = run_cli(["data", "coco", "--captions", str(captions), "--images", str(images), "--out", str(out)],
                             capsys)  # fmt: skip
    assert code == 0
    assert {k: v for k, v in stats.items() if v and k != "shards"} == {
        "written": 2,
        "skipped_no_caption": 1,
        "skipped_missing_image": 1,
        "skipped_bad_row": 1,
    }
    dog = ["A dog on a beach.", "a brown dog runs", "Sand and a dog"]
    assert records(out) == {
        "000001": (dog[0], {"image_id": 1, "captions": dog}, (8, 8)),
        "000002": ("A red bus", {"image_id": 2}, (8, 8)),
    }
    # evaluation scores a caption against all of an image's captions; training draws phrasings from them all
    assert load_eval_records(str(out)).references == [dog, ["A red bus"]]
    assert sorted(read_captions(str(out))) == sorted([*dog, dog[0], "A red bus"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"images": []}', "has no 'annotations' list"),
        ("[1, 2]", "needs an 'images' list and an 'annotations' list"),
    ],
)
def test_a_malformed_coco_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    (tmp_path / "captions_x.json").write_text(content)
    (tmp_path / "images").mkdir()
    argv = ["data", "coco", "--captions", str(tmp_path / "captions_x.json"), "--images", str(tmp_path / "images")]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("mmdiff data coco: error:") and message in err


def test_coco_with_a_missing_images_folder_is_refused(tmp_path):
    captions, _ = coco_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="COCO images folder not found"):
        convert_coco(captions, tmp_path / "train2017", tmp_path / "out")


# ---------------------------------------------------------------- img2dataset output, read as it is


def write_img2dataset_folder(folder: Path) -> None:
    """What img2dataset writes with output_format=webdataset: 00000.tar (+ .parquet and _stats.json beside it)."""
    folder.mkdir()
    members = []
    samples = [
        ("000000000", "webp", "a webp photo of a lake", True),
        ("000000001", "jpg", "a jpeg photo of a hill", True),
        ("000000002", "webp", "a caption only in the json", False),  # no .txt: the json's "caption" is used
    ]
    for key, ext, caption, with_txt in samples:
        meta = {"url": f"https://example.com/{key}.{ext}", "key": key, "status": "success", "caption": caption,
                "width": 8, "height": 8, "original_width": 640, "exif": None, "sha256": "0" * 64}  # fmt: skip
        members.append((f"{key}.{ext}", image_bytes((10, 20, 30), "WEBP" if ext == "webp" else "JPEG")))
        if with_txt:
            members.append((f"{key}.txt", caption.encode()))
        members.append((f"{key}.json", json.dumps(meta).encode()))
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    if HAS_PYARROW:  # the reader must ignore it whether or not it is there
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"key": [s[0] for s in samples], "caption": [s[2] for s in samples]})
        pq.write_table(table, folder / "00000.parquet")
    else:
        (folder / "00000.parquet").write_bytes(b"PAR1 not a real parquet file PAR1")


def test_img2dataset_shards_are_read_as_they_are(tmp_path):
    folder = tmp_path / "img2dataset"
    write_img2dataset_folder(folder)
    assert expand_urls(str(folder)) == [str(folder / "00000.tar")]  # the parquet and stats beside it are ignored
    found = records(folder)
    assert {k: v[0] for k, v in found.items()} == {
        "000000000": "a webp photo of a lake",
        "000000001": "a jpeg photo of a hill",
        "000000002": "a caption only in the json",
    }
    assert found["000000000"][1]["url"] == "https://example.com/000000000.webp"  # its own keys ride along

    tokenizer = train_word_level_tokenizer(read_captions(str(folder)))
    loader = make_dataloader(str(folder), tokenizer, 8, 8, 3, repeat=False, shuffle_buffer=0)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["skips"] == {}


# ---------------------------------------------------------------- Hugging Face datasets (optional)


def hf_dataset(tmp_path: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.Value("int64")})  # fmt: skip
    rows = {
        "image": [
            {"bytes": image_bytes((200, 0, 0)), "path": None},
            {"bytes": image_bytes((0, 0, 200)), "path": None},
            {"bytes": b"garbage", "path": None},
        ],  # fmt: skip
        "text": ["a red tile", "a blue tile", "a broken tile"],
        "label": [0, 1, 2],
    }
    return datasets.Dataset.from_dict(rows, features=features)


@needs_datasets
def test_hf_save_to_disk_and_parquet_convert_alike(tmp_path, capsys):
    import datasets

    dataset = hf_dataset(tmp_path)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    results = {}
    for name, src in (("saved", tmp_path / "saved"), ("parquet", tmp_path / "data.parquet")):
        code, stats, _ = run_cli(["data", "hf", "--src", str(src), "--out", str(tmp_path / name)], capsys)
        assert code == 0 and (stats["written"], stats["skipped_bad_image"]) == (2, 1)
        results[name] = records(tmp_path / name)
    assert (
        results["saved"]
        == results["parquet"]
        == {"000000000": ("a red tile", None, (8, 8)), "000000001": ("a blue tile", None, (8, 8))}
    )

    code, stats, _ = run_cli(["data", "hf", "--src", str(tmp_path / "saved"), "--split", "test",
                              "--out", str(tmp_path / "test")], capsys)  # fmt: skip
    assert code == 0 and stats["written"] == 1
    code, _, err = run_cli(["data", "hf", "--src", str(tmp_path / "saved"), "--split", "val",
                            "--out", str(tmp_path / "val")], capsys)  # fmt: skip
    assert code == 2 and "has splits train, test: choose one with --split" in err


@needs_datasets
def test_hf_caption_lists_become_references_and_path_columns_are_read(tmp_path):
    import datasets

    from mmdiff.data.formats import convert_hf_dataset

    write_images(tmp_path / "files", ["p.png", "q.png"])
    dataset = datasets.Dataset.from_dict({"file_name": ["files/p.png", "files/q.png"],
                                          "caption": [["first of p", "second of p"], []]})  # fmt: skip
    dataset.to_parquet(str(tmp_path / "pairs.parquet"))
    stats = convert_hf_dataset(tmp_path / "pairs.parquet", tmp_path / "out")
    assert (stats["written"], stats["skipped_no_caption"]) == (1, 1)
    assert records(tmp_path / "out") == {
        "000000000": ("first of p", {"captions": ["first of p", "second of p"]}, (8, 8))
    }


@needs_datasets
def test_hf_a_file_that_is_no_parquet_is_one_line(tmp_path, capsys):
    (tmp_path / "data.parquet").write_bytes(b"PAR1 this is not parquet")
    code, _, err = run_cli(
        ["data", "hf", "--src", str(tmp_path / "data.parquet"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "not readable as parquet (ArrowInvalid" in err


def test_hf_without_the_datasets_package_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    code, _, err = run_cli(["data", "hf", "--src", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert (
        code == 2
        and err == 'mmdiff data hf: error: install datasets: pip install datasets (or pip install "mmdiff[hf]")\n'
    )


# ---------------------------------------------------------------- pipe: shard urls, in training and in evaluation


def test_pipe_urls_train_and_evaluate_like_the_local_shards(tiny_train_setup, tmp_path):
    from conftest import stage_run_dir, tiny_train_overrides

    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    if shutil.which("cat") is None:
        pytest.skip("no `cat` on this machine for a pipe: url")
    data = tiny_train_setup["data"]
    piped = f"pipe:cat {data}/shard-{{000000..000003}}.tar"
    assert len(expand_urls(piped)) == 4
    tokenizer = train_word_level_tokenizer(read_captions(str(data)))

    def keys(urls):
        loader = make_dataloader(urls, tokenizer, 16, 12, 8, seed=3, shuffle_buffer=8)
        it = iter(loader)
        return [next(it)["keys"] for _ in range(10)]  # past one epoch (64 records): the pipe is opened again

    assert keys(piped) == keys(str(data))
    assert load_eval_records(piped, num=5).keys == load_eval_records(str(data), num=5).keys

    run = tmp_path / "run"
    run.mkdir()
    stage_run_dir(tiny_train_setup, run)
    overrides = tiny_train_overrides(tiny_train_setup, run, max_steps=1, checkpoint_every=100)
    summary = train(load_config(None, [*overrides, f"data.train_shards={piped}"]))
    assert summary["steps"] == 1 and summary["images_seen"] == 4
