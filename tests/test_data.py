"""Shapes generation, folder conversion and the webdataset loader (including bad-record accounting)."""

import hashlib
import io
import json
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_tar
from PIL import Image

from mmdiff.data.captions import CaptionPolicy
from mmdiff.data.dataset import make_dataloader
from mmdiff.data.folder import convert_folder
from mmdiff.data.images import prepare_image, to_rgb
from mmdiff.data.policies import caption_policy
from mmdiff.data.shapes import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    LeftFirstPolicy,
    left_first_phrasings,
    object_extent,
    parse_caption,
    render_scene,
    scene_from_attributes,
    write_shapes_shards,
)
from mmdiff.data.shards import SkipStats, expand_urls, iterate_records, read_captions
from mmdiff.data.tokenizer import decode_captions, train_word_level_tokenizer


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    stats = write_shapes_shards(out, 300, image_size=32, seed=0, val_fraction=0.1, shard_size=100)
    return out, stats


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(123)
    return [render_scene(rng, 32) for _ in range(400)]


@pytest.fixture(scope="module")
def word_tok(shapes_dir):
    return train_word_level_tokenizer(read_captions(str(shapes_dir[0] / "train")))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_shapes_shards_layout_and_stats(shapes_dir):
    out, stats = shapes_dir
    assert stats["train"]["count"] == 270 and stats["val"]["count"] == 30
    assert [p.rsplit("/", 1)[1] for p in stats["train"]["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert stats["val"]["shards"] == [str(out / "val" / "shard-000000.tar")]
    members = _tar_members(stats["train"]["shards"][0])
    assert len(members) == 300 and {n.rsplit(".", 1)[1] for n in members} == {"png", "txt", "json"}
    name = sorted(members)[0].rsplit(".", 1)[0]
    attrs = json.loads(members[f"{name}.json"])
    assert members[f"{name}.txt"].decode() in attrs["captions"]
    assert Image.open(io.BytesIO(members[f"{name}.png"])).size == (32, 32)


def test_shapes_shards_deterministic_per_seed(tmp_path):
    def shard_bytes(folder, seed):
        stats = write_shapes_shards(folder, 40, image_size=32, seed=seed, shard_size=15)
        return [open(p, "rb").read() for split in ("train", "val") for p in stats[split]["shards"]]

    first = shard_bytes(tmp_path / "a", 0)
    assert first == shard_bytes(tmp_path / "b", 0)
    assert first != shard_bytes(tmp_path / "c", 1)
    # Rewriting a folder with fewer samples leaves no stale shard behind.
    write_shapes_shards(tmp_path / "a", 10, image_size=32, seed=0, shard_size=15)
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == ["shard-000000.tar"]


def test_train_and_val_share_no_image(shapes_dir):
    out, stats = shapes_dir
    hashes = {}
    for split in ("train", "val"):
        for path in stats[split]["shards"]:
            for name, data in _tar_members(path).items():
                if name.endswith(".png"):
                    hashes.setdefault(split, []).append(hashlib.sha1(data).hexdigest())
    assert len(hashes["train"]) == 270 and len(hashes["val"]) == 30
    assert len(set(hashes["train"]) | set(hashes["val"])) == 300


def test_scene_attribute_coverage(scenes):
    objects = [o for _, a in scenes for o in a["objects"]]
    assert {o["color"] for o in objects} == set(COLORS) and len(COLORS) >= 6
    assert {o["shape"] for o in objects} == set(SHAPES) == {"circle", "square", "triangle"}
    assert {o["size"] for o in objects} == set(SIZES) == {"small", "large"}
    assert {a["relation"] for _, a in scenes if a["relation"]} == set(RELATIONS)
    assert {len(a["objects"]) for _, a in scenes} == {1, 2}
    rgb = list(COLORS.values())
    gaps = [np.abs(np.subtract(a, b)).sum() for i, a in enumerate(rgb) for b in rgb[i + 1 :]]
    assert min(gaps) >= 100
    assert object_extent("large", 32) > object_extent("small", 32) + 3


def test_objects_inside_canvas_apart_and_relation_unambiguous(scenes):
    for image, attrs in scenes:
        assert image.size == (32, 32) and image.mode == "RGB"
        arr = np.asarray(image).astype(int)
        boxes = []
        for obj in attrs["objects"]:
            (cx, cy), ext = obj["center"], obj["extent"]
            assert ext == object_extent(obj["size"], 32)
            x0, y0 = cx - ext / 2, cy - ext / 2
            assert x0 >= 1 and y0 >= 1 and x0 + ext <= 31 and y0 + ext <= 31
            boxes.append((x0, y0, ext))
            # The pixel at the box centre lies inside every shape and carries the object's exact colour.
            assert np.abs(arr[int(cy), int(cx)] - np.array(COLORS[obj["color"]])).max() <= 2
        if len(boxes) == 2:
            (ax, ay, ae), (bx, by, be) = boxes
            assert ax + ae + 2 <= bx or bx + be + 2 <= ax or ay + ae + 2 <= by or by + be + 2 <= ay
            dx = attrs["objects"][1]["center"][0] - attrs["objects"][0]["center"][0]
            dy = attrs["objects"][1]["center"][1] - attrs["objects"][0]["center"][1]
            horizontal, vertical = abs(dx) >= 2 * abs(dy), abs(dy) >= 2 * abs(dx)
            expected = {"left of": horizontal and dx > 0, "right of": horizontal and dx < 0}
            expected |= {"above": vertical and dy > 0, "below": vertical and dy < 0}
            assert expected[attrs["relation"]], attrs
        # Corners are background: nothing is drawn outside the objects.
        assert arr[0, 0].tolist() == [255, 255, 255]


def test_parse_caption_round_trips_every_phrasing(scenes):
    for _, attrs in scenes:
        target = scene_from_attributes(attrs)
        assert attrs["canonical"] == attrs["captions"][0]
        assert len(attrs["captions"]) >= 3
        for caption in attrs["captions"]:
            assert parse_caption(caption) == target, caption
            assert parse_caption("  " + caption.upper().replace(" ", "   ") + ". ") == target
        json.dumps(attrs)


def test_parse_caption_normalises_relation_and_rejects_garbage():
    a = parse_caption("a small red circle above a large blue square")
    assert a == parse_caption("A large blue square below a small red circle")
    assert a == parse_caption("there is a large blue square below a small red circle")
    assert a["relation"] == "above" and a["objects"][0] == {"shape": "circle", "color": "red", "size": "small"}
    assert parse_caption("a small red circle right of a large blue square") == parse_caption(
        "a large blue square left of a small red circle"
    )
    assert a != parse_caption("a small red circle below a large blue square")
    assert parse_caption("a small red circle") == {
        "objects": [{"shape": "circle", "color": "red", "size": "small"}],
        "relation": None,
    }
    for bad in ("", "a red circle", "a small red", "a huge red circle", "a small red circle above", "cat"):
        assert parse_caption(bad) is None, bad


def test_loader_reads_shapes_shards(shapes_dir, word_tok):
    out, _ = shapes_dir
    loader = make_dataloader(str(out / "train"), word_tok, 32, 24, 16, repeat=False, drop_last=False, seed=0)
    keys, total = [], 0
    for batch in loader:
        b = batch["pixel_values"].shape[0]
        assert batch["pixel_values"].shape == (b, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        assert batch["input_ids"].shape == (b, 24) and batch["input_ids"].dtype == torch.long
        assert batch["skips"] == {}
        assert decode_captions(word_tok, batch["input_ids"]) == batch["captions"]
        assert all(parse_caption(c) is not None for c in batch["captions"])
        keys += batch["keys"]
        total += b
    assert total == 270 and len(set(keys)) == 270
    records = {key: (caption, image) for key, image, caption, _ in iterate_records(str(out / "val"))}
    stored = {key: caption for key, (caption, _) in records.items()}
    val = str(out / "val")
    random_batch = next(iter(make_dataloader(val, word_tok, 32, 24, 30, repeat=False, shuffle_buffer=0)))
    assert random_batch["keys"] == list(stored)
    txt = CaptionPolicy("txt")
    txt_batch = next(iter(make_dataloader(val, word_tok, 32, 24, 30, caption_policy=txt, repeat=False)))
    assert dict(zip(txt_batch["keys"], txt_batch["captions"])) == stored
    # Random phrasings describe the same scene as the stored caption, and do not always repeat it.
    assert [parse_caption(c) for c in random_batch["captions"]] == [parse_caption(c) for c in stored.values()]
    assert random_batch["captions"] != list(stored.values())
    # Pixels are exactly the stored image: no flip, no resampling at the native size.
    for key, pixels in zip(random_batch["keys"], random_batch["pixel_values"]):
        stored_pixels = torch.from_numpy(np.array(records[key][1])).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(pixels, stored_pixels)
        assert torch.equal(prepare_image(records[key][1], 32), stored_pixels)


def test_left_first_text_task_captions_name_the_left_or_upper_object_first(shapes_dir, word_tok, tmp_path):
    # data.text_task_phrasings=left_first: the image -> text task gets a phrasing of the same scene that names the
    # left/upper object first (no "right of"/"below"); text -> image keeps the random phrasing
    val = str(shapes_dir[0] / "val")
    left_first = caption_policy({"text_task_phrasings": "left_first"})
    plain = next(iter(make_dataloader(val, word_tok, 32, 24, 30, repeat=False, shuffle_buffer=0)))
    batch = next(
        iter(make_dataloader(val, word_tok, 32, 24, 30, repeat=False, shuffle_buffer=0, caption_policy=left_first))
    )
    # every batch carries both: under the default policy the image -> text targets are the input captions
    assert (
        torch.equal(plain["target_ids"], plain["input_ids"]) and batch["target_ids"].shape == batch["input_ids"].shape
    )
    text_captions = decode_captions(word_tok, batch["target_ids"])
    assert [parse_caption(c) for c in text_captions] == [parse_caption(c) for c in batch["captions"]]
    assert not any(" right of " in c or " below " in c for c in text_captions)
    assert any(" right of " in c or " below " in c for c in batch["captions"])
    two = [c for c in text_captions if " left of " in c or " above " in c]
    assert two and all(parse_caption(c)["relation"] in ("left of", "above") for c in two)
    assert left_first_phrasings(["a x right of a y", "a y left of a x"]) == ["a y left of a x"]
    assert left_first_phrasings(["a x", "there is a x"]) == ["a x", "there is a x"]
    with pytest.raises(ValueError, match="text_task_phrasings must be one of"):
        caption_policy({"text_task_phrasings": "sorted"})
    # records with only a .txt caption (your own data) keep it for the text task, also in a batch with shapes records
    src = tmp_path / "src"
    src.mkdir()
    for name in ("one", "two"):
        Image.new("RGB", (32, 32), (255, 0, 0)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text("a large red square")
    convert_folder(src, tmp_path / "mine", shard_size=2)
    mixed = [str(tmp_path / "mine" / "shard-000000.tar"), *expand_urls(val)]
    loader = make_dataloader(mixed, word_tok, 32, 24, 8, repeat=False, shuffle_buffer=0, caption_policy=left_first)
    batch = next(iter(loader))
    assert batch["target_ids"].shape == batch["input_ids"].shape
    plain_rows = [i for i, key in enumerate(batch["keys"]) if key in ("one", "two")]
    assert plain_rows and all(torch.equal(batch["target_ids"][i], batch["input_ids"][i]) for i in plain_rows)


def test_default_caption_policy_gives_both_tasks_the_same_ids(shapes_dir, word_tok):
    # the default policy (data.text_task_phrasings=all) for both caption choices: target ids are the input ids
    val = str(shapes_dir[0] / "val")
    for choice in ("random", "txt"):
        policy = caption_policy({"caption_choice": choice})
        assert policy == CaptionPolicy(choice) and type(policy) is CaptionPolicy
        batch = next(iter(make_dataloader(val, word_tok, 32, 24, 30, caption_policy=policy, repeat=False)))
        assert batch["target_ids"].shape == (30, 24) and torch.equal(batch["target_ids"], batch["input_ids"])
        rng = random.Random(0)
        assert all(len(set(policy.choose("a x", ["a y", "a z"], rng))) == 1 for _ in range(20))
    assert caption_policy(None) == CaptionPolicy("random") and CaptionPolicy().reference("a x right of a y") == (
        "a x right of a y"
    )
    assert caption_policy({"text_task_phrasings": "left_first"}, caption_choice="txt") == LeftFirstPolicy("txt")
    with pytest.raises(ValueError, match="caption_choice must be"):
        caption_policy({"caption_choice": "first"})


def test_left_first_policy_never_targets_right_of_or_below(scenes):
    # every scene, both choices, many draws: the image -> text target names the left/upper object first and describes
    # the same scene as the input caption, which keeps every phrasing
    inputs, targets = [], []
    for choice in ("random", "txt"):
        policy, rng = LeftFirstPolicy(choice), random.Random(7)
        for _, attrs in scenes:
            for _ in range(3):
                caption, target = policy.choose(attrs["captions"][1], attrs["captions"], rng)
                assert parse_caption(target) == parse_caption(caption) == scene_from_attributes(attrs)
                inputs.append(caption)
                targets.append(target)
    assert not any(" right of " in t or " below " in t for t in targets)
    assert any(" right of " in c for c in inputs) and any(" below " in c for c in inputs)
    assert any(" left of " in t for t in targets) and any(" above " in t for t in targets)
    # without phrasings (a plain txt caption) both tasks keep the caption, whatever it says
    assert LeftFirstPolicy().choose("a x right of a y", [], random.Random(0)) == ("a x right of a y",) * 2
    assert LeftFirstPolicy().reference("a small red circle below a large blue square") == (
        "a large blue square above a small red circle"
    )


def test_generic_data_layer_knows_no_shapes_words():
    # dataset-specific choices come from the dataset (its caption policy): the generic reader, the stream and the
    # policy base neither name shapes relations nor import the shapes module, and the data layer never imports config
    import ast
    from pathlib import Path

    import mmdiff.data

    folder = Path(mmdiff.data.__file__).parent
    for name in ("shards.py", "images.py", "writer.py", "dataset.py", "captions.py"):
        source = (folder / name).read_text()
        for word in ("right of", "left of", "below", "above", "left_first", "LeftFirst"):
            assert word not in source, (name, word)
        imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
        assert "mmdiff.data.shapes" not in imported, name
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m == "mmdiff.config" or m.startswith("mmdiff.config.") for m in modules), path.name


def test_unknown_caption_policy_is_refused_by_the_config(tmp_path):
    # the allowed values are the data layer's own (its policies and choices), checked when the config loads
    from mmdiff.config import ConfigError, load_config

    for key, value in (("text_task_phrasings", "sorted"), ("caption_choice", "first")):
        with pytest.raises(ConfigError, match=rf"data\.{key}='{value}' is not one of"):
            load_config(None, [f"data.train_shards={tmp_path}", f"data.{key}={value}"])


def test_loader_deterministic_for_seed(shapes_dir, word_tok):
    urls = str(shapes_dir[0] / "train")

    def first_keys(seed, workers=0):
        loader = make_dataloader(urls, word_tok, 32, 24, 8, num_workers=workers, seed=seed, shuffle_buffer=50)
        out, it = [], iter(loader)
        for _ in range(40):
            batch = next(it)
            out += zip(batch["keys"], batch["captions"])
        return out

    run = first_keys(0)
    assert run == first_keys(0)
    assert run != first_keys(1)
    # 320 samples from a 270-sample split: the stream repeats endlessly with a new epoch order.
    assert len(run) == 320 and len({k for k, _ in run}) == 270


def _bad_shards(tmp_path):
    good = _png(Image.new("RGB", (40, 24), (10, 200, 30)))
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    palette = Image.new("P", (32, 32), 3)
    gray16 = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    records = [
        ("good_rgb", {"png": good, "txt": b"a green box"}),
        ("corrupt", {"png": good[:60] + b"\x00" * 40, "txt": b"a broken image"}),
        ("badutf8", {"png": good, "txt": b"\xff\xfe\xfa bad"}),
        ("empty", {"png": good, "txt": b"  \n "}),
        ("noimage", {"txt": b"caption without image"}),
        ("nocaption", {"png": good}),
        ("good_rgba", {"png": _png(rgba), "txt": b"a transparent image"}),
        ("good_p", {"jpg": _png(palette), "txt": b"a palette image"}),
        ("good_i16", {"png": _png(gray16), "txt": b"a sixteen bit image"}),
        ("long", {"png": good, "txt": b"a very long caption with many many words in it"}),
    ]
    write_tar(tmp_path / "bad-000000.tar", [(f"{k}.{e}", d) for k, r in records for e, d in r.items()])
    for prefix in "tu":
        write_tar(
            tmp_path / f"{prefix}.tar",
            [(f"{prefix}{i}.{e}", d) for i in range(3) for e, d in (("png", good), ("txt", b"a box"))],
        )
    # Cut inside the last image: the two complete records survive, the rest of the shard is counted once.
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(data[: data.find(b"t2.png") + 512 + 100])
    # Cut inside a header, where tarfile itself stops silently: the record in progress (u1) may be incomplete.
    data = (tmp_path / "u.tar").read_bytes()
    (tmp_path / "bad-000002.tar").write_bytes(data[: data.find(b"u2.png") + 100])
    return str(tmp_path / "bad-{000000..000002}.tar")


EXPECTED_SKIPS = {
    "corrupt_image": 1,
    "bad_utf8": 1,
    "empty_caption": 1,
    "no_image": 1,
    "no_caption": 1,
    "corrupt_tar": 2,
    "truncated": 1,
}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_records_skipped_and_counted(tmp_path, workers):
    urls = _bad_shards(tmp_path)
    tok = train_word_level_tokenizer(["a green box transparent palette image sixteen bit very long caption"])
    loader = make_dataloader(urls, tok, 16, 6, 3, num_workers=workers, repeat=False, drop_last=False)
    stats, samples = SkipStats(), {}
    for batch in loader:
        stats.accumulate(batch["skips"])
        for key, caption, pixels in zip(batch["keys"], batch["captions"], batch["pixel_values"]):
            samples[key] = (caption, pixels)
    assert stats.as_dict() == EXPECTED_SKIPS
    assert stats.total == 8 and "corrupt_tar=2" in stats.summary()
    assert set(samples) == {"good_rgb", "good_rgba", "good_p", "good_i16", "long", "t0", "t1", "u0"}
    assert samples["long"][0] == "a very long caption with many many words in it"
    assert torch.allclose(samples["good_rgba"][1], torch.ones(3, 16, 16))
    assert torch.allclose(samples["good_i16"][1], torch.ones(3, 16, 16))
    green = torch.tensor([10, 200, 30]) / 127.5 - 1
    assert torch.allclose(samples["good_rgb"][1][:, 8, 8], green, atol=0.02)


def _collect(urls, tok, workers):
    loader = make_dataloader(urls, tok, 16, 6, 2, num_workers=workers, repeat=False, drop_last=False)
    stats, keys = SkipStats(), []
    for batch in loader:
        stats.accumulate(batch["skips"])
        keys += batch["keys"]
    return stats.as_dict(), sorted(keys)


def test_skip_counts_when_workers_share_a_shard(tmp_path):
    # With fewer shards than workers every worker reads the shard and keeps every n-th record.
    _bad_shards(tmp_path)
    tok = train_word_level_tokenizer(["a green box"])
    skips, keys = _collect(str(tmp_path / "bad-000000.tar"), tok, 2)
    assert skips == {k: v for k, v in EXPECTED_SKIPS.items() if k != "corrupt_tar"}
    assert keys == ["good_i16", "good_p", "good_rgb", "good_rgba", "long"]
    assert _collect(str(tmp_path / "bad-000001.tar"), tok, 2) == ({"corrupt_tar": 1}, ["t0", "t1"])


def test_bad_records_in_endless_stream(tmp_path):
    urls = _bad_shards(tmp_path)
    tok = train_word_level_tokenizer(["a green box"])
    loader = make_dataloader(urls, tok, 16, 6, 4, shuffle_buffer=4, seed=3)
    stats, it = SkipStats(), iter(loader)
    for _ in range(8):  # 32 samples = 4 passes over the 8 good records
        batch = next(it)
        assert batch["pixel_values"].shape == (4, 3, 16, 16)
        stats.accumulate(batch["skips"])
    assert stats.counts["corrupt_tar"] >= 3 and stats.counts["corrupt_image"] >= 3
    assert set(stats.counts) == set(EXPECTED_SKIPS)


def test_endless_stream_without_valid_records_fails_clearly(tmp_path):
    write_tar(tmp_path / "bad.tar", [("a.png", b"not a png"), ("a.txt", b"caption"), ("b.txt", b"")])
    loader = make_dataloader(str(tmp_path / "bad.tar"), train_word_level_tokenizer(["caption"]), 16, 4, 2)
    with pytest.raises(RuntimeError, match="no valid sample"):
        next(iter(loader))


def test_to_rgb_modes():
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    half = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128))).getpixel((0, 0))
    assert all(120 <= c <= 130 for c in half)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert to_rgb(p).getpixel((0, 0)) == (0, 255, 0)
    p.info["transparency"] = 1
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    i16 = Image.fromarray(np.full((2, 2), 257 * 100, dtype=np.uint16))
    assert to_rgb(i16).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    wide = prepare_image(Image.new("RGB", (60, 20), (0, 0, 0)), 16)
    assert wide.shape == (3, 16, 16) and torch.allclose(wide, -torch.ones(3, 16, 16))


def test_expand_urls(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"shard-{i:06d}.tar", [(f"k{i}.txt", b"x")])
    names = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "shard-{000000..000002}.tar")) == names
    assert expand_urls(str(tmp_path)) == names
    assert expand_urls(f"{names[2]},{names[0]}") == [names[2], names[0]]
    assert expand_urls(names[1:]) == names[1:]
    assert expand_urls(str(tmp_path / "shard-*.tar")) == names
    missing = str(tmp_path / "shard-{000000..000005}.tar")
    with pytest.raises(FileNotFoundError, match="shard-\\{000000..000005\\}"):
        expand_urls(missing)
    with pytest.raises(FileNotFoundError, match="nothing-\\*"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(ValueError):
        expand_urls([])


def test_convert_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub dir").mkdir(parents=True)
    Image.new("RGB", (20, 30), (255, 0, 0)).save(src / "red.png")
    (src / "red.txt").write_text("a red image\n")
    Image.new("RGBA", (24, 24), (0, 0, 255, 0)).save(src / "sub dir" / "clear.v2.png")
    (src / "sub dir" / "clear.v2.txt").write_text("a clear image")
    (src / "sub dir" / "clear.v2.json").write_text('{"captions": ["a see-through image"]}')
    palette = Image.new("P", (16, 16), 2)
    palette.putpalette([0, 0, 0] * 2 + [0, 255, 0] + [0] * 759)
    palette.save(src / "sub dir" / "pal.jpeg", format="PNG")
    (src / "sub dir" / "pal.txt").write_text("a green palette image")
    Image.new("RGB", (8, 8)).save(src / "orphan.jpg")
    (src / "notes.md").write_text("ignored")

    stats = convert_folder(src, tmp_path / "out", shard_size=2)
    assert {k: stats[k] for k in ("written", "skipped_no_caption")} == {"written": 3, "skipped_no_caption": 1}
    assert [p.rsplit("/", 1)[1] for p in stats["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    members = {}
    for path in stats["shards"]:
        members |= _tar_members(path)
    assert members["sub_dir/clear_v2.png"] == (src / "sub dir" / "clear.v2.png").read_bytes()
    assert members["sub_dir/pal.jpeg"] == (src / "sub dir" / "pal.jpeg").read_bytes()
    assert members["sub_dir/clear_v2.json"] == (src / "sub dir" / "clear.v2.json").read_bytes()
    assert members["red.txt"] == b"a red image\n"

    records = {key: (image, caption, attrs) for key, image, caption, attrs in iterate_records(stats["shards"])}
    assert set(records) == {"red", "sub_dir/clear_v2", "sub_dir/pal"}
    assert records["red"][1] == "a red image" and records["red"][0].size == (20, 30)
    assert records["sub_dir/clear_v2"][0].getpixel((3, 3)) == (255, 255, 255)
    assert records["sub_dir/pal"][0].getpixel((3, 3)) == (0, 255, 0)
    assert records["sub_dir/clear_v2"][2] == {"captions": ["a see-through image"]}
    assert Counter(read_captions(stats["shards"]))["a see-through image"] == 1


def test_tar_member_names_escaping_the_folder_are_refused(tmp_path):
    from mmdiff.data.writer import write_tar_shard

    good = _png(Image.new("RGB", (8, 8)))
    members = [("../up.png", good), ("../up.txt", b"x"), ("/abs/p.png", good), ("/abs/p.txt", b"x")]
    write_tar(tmp_path / "evil.tar", members + [("ok.png", good), ("ok.txt", b"fine")])
    stats = SkipStats()
    assert [key for key, *_ in iterate_records(str(tmp_path / "evil.tar"), stats)] == ["ok"]
    assert stats.as_dict() == {"unsafe_name": 4}
    for key in ("../escape", "/etc/x", "a/../../b"):
        with pytest.raises(ValueError, match="escape"):
            write_tar_shard(tmp_path / "out.tar", [{"__key__": key, "txt": b"x"}])
    assert not (tmp_path / "out.tar").exists()

    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(good)
    (src / "link.png").symlink_to(outside)
    (src / "link.txt").write_text("a caption")
    with pytest.raises(ValueError, match="1 image under .* none could be converted: 1 resolving outside the folder"):
        convert_folder(src, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_damaged_header_counts_the_shard_and_compressed_shards_read_whole(tmp_path):
    import gzip

    good = _png(Image.new("RGB", (8, 8)))
    write_tar(tmp_path / "ok.tar", [(f"k{i}.{e}", d) for i in range(4) for e, d in (("png", good), ("txt", b"a box"))])
    data = bytearray((tmp_path / "ok.tar").read_bytes())
    # a damaged header mid-shard (tarfile stops there without a word): the shard counts as broken once and the
    # record in progress (k2, its image read, its caption lost) is dropped
    at = data.find(b"k2.txt")
    data[at + 148 : at + 156] = b"garbage!"  # the header's checksum field
    (tmp_path / "damaged.tar").write_bytes(bytes(data))
    stats = SkipStats()
    assert [key for key, *_ in iterate_records(str(tmp_path / "damaged.tar"), stats)] == ["k0", "k1"]
    assert stats.as_dict() == {"corrupt_tar": 1}
    # compressed shards have no block boundaries to check: read whole, nothing counted
    (tmp_path / "ok.tgz").write_bytes(gzip.compress((tmp_path / "ok.tar").read_bytes()))
    stats = SkipStats()
    assert [key for key, *_ in iterate_records(str(tmp_path / "ok.tgz"), stats)] == ["k0", "k1", "k2", "k3"]
    assert stats.as_dict() == {}


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_the_stream_exactly(shapes_dir, word_tok, workers):
    def keys(skip, n):
        loader = make_dataloader(
            str(shapes_dir[0] / "train"),
            word_tok,
            16,
            8,
            8,
            num_workers=workers,
            seed=4,
            shuffle_buffer=32,
            skip_batches=skip,
        )
        it = iter(loader)
        return [next(it)["keys"] for _ in range(n)]

    full = keys(0, 12)
    assert keys(5, 7) == full[5:]
