"""Models named by a Hugging Face Hub id ("org/name"), resolved offline from a cache laid out as huggingface_hub lays
it out (`models--ORG--NAME/refs/REF` holding a commit hash, `snapshots/HASH/` the files): the resolver, the config
keys and commands that take ids, the one-line errors, and that pickles are never fetched nor loaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, errors
from huggingface_hub.utils import filter_repo_objects

from mmdiff.cli import main
from mmdiff.config import ConfigError, load_config
from mmdiff.hub import IGNORE_PATTERNS, HubResolveError, is_hub_id, resolve_pretrained
from mmdiff.pipelines import MMDiffTextToImagePipeline, PipelineLoadError, check_pipeline_folder
from mmdiff.training.preflight import check_pretrained

REPO = Path(__file__).resolve().parents[1]


def cache_repo(cache: Path, repo_id: str, source: Path | None = None, ref: str = "main") -> Path:
    """`source`'s files as the snapshot that `ref` of `repo_id` points at in the cache folder `cache`."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()  # 40 hex digits, like a git commit
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    if source is None:
        snapshot.mkdir(parents=True)
    else:
        shutil.copytree(source, snapshot)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, used offline; huggingface_hub reads both settings at import, so its constants
    are set as well as the environment."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _mmdiff(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    """`mmdiff ARGS` in a new process, offline, with `cache` as the Hugging Face cache (what a user runs)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "mmdiff.cli", *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


# ---------------------------------------------------------------- the resolver


def test_a_cached_id_resolves_at_main_at_a_named_revision_and_at_a_commit(hub_cache):
    main_snapshot = cache_repo(hub_cache, "org/name")
    (main_snapshot / "config.json").write_text("{}")
    tagged = cache_repo(hub_cache, "org/name", ref="v1")
    (tagged / "vae").mkdir()
    assert resolve_pretrained("org/name") == main_snapshot
    assert resolve_pretrained("org/name", revision="v1") == tagged
    assert resolve_pretrained("org/name", revision=tagged.name) == tagged  # a commit hash needs no ref
    assert resolve_pretrained("org/name", revision="v1", subfolder="vae") == tagged / "vae"
    assert resolve_pretrained("org/name", cache_dir=hub_cache, local_files_only=True) == main_snapshot
    with pytest.raises(HubResolveError, match=r"'org/name': the hub repo has no text_encoder/ folder"):
        resolve_pretrained("org/name", subfolder="text_encoder")


def test_offline_and_not_cached_is_one_line_naming_the_id(hub_cache):
    for kwargs, flag in (({}, "HF_HUB_OFFLINE=1"), ({"local_files_only": True}, "local_files_only=True")):
        with pytest.raises(HubResolveError) as raised:
            resolve_pretrained("org/missing", what="pipeline folder", **kwargs)
        message = str(raised.value)
        assert (
            message.startswith("pipeline folder 'org/missing': not in the Hugging Face cache") and "\n" not in message
        )
        assert flag in message and "`hf download org/missing` first" in message
    cache_repo(hub_cache, "org/name")
    with pytest.raises(HubResolveError, match=r"'org/name' at revision 'v2'.*hf download org/name --revision v2"):
        resolve_pretrained("org/name", revision="v2")


def test_paths_are_taken_as_they_are_and_only_org_name_is_an_id(tmp_path, hub_cache, monkeypatch):
    folder = tmp_path / "org"
    (folder / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # pytest's tmp_path: "org/name" is now a local folder, which wins over the hub id
    assert resolve_pretrained("org/name") == Path("org/name")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")
    assert resolve_pretrained(weights) == weights  # a file, for the callers that take one
    assert resolve_pretrained("nowhere") == Path("nowhere")  # no id: the caller's own check names it
    assert resolve_pretrained(str(tmp_path / "gone")) == tmp_path / "gone"
    assert [is_hub_id(s) for s in ("org/name", "Org-1/name_2.v3", "name", "a/b/c", "./x", "org--x/y", "org/")] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]
    assert not is_hub_id(Path("org/name"))  # a Path is always a path, as in diffusers


def _http_error(kind, message: str):
    return kind(message, response=SimpleNamespace(headers={}, request=None, status_code=404))


@pytest.mark.parametrize(
    "error,reason",
    [
        (lambda: _http_error(errors.RepositoryNotFoundError, "404"), "no hub repo org/name you can access"),
        (lambda: _http_error(errors.GatedRepoError, "403"), "the hub repo is gated"),
        (lambda: _http_error(errors.RevisionNotFoundError, "404"), "the hub repo has no revision 'nope'"),
        (lambda: errors.LocalEntryNotFoundError("Got: ConnectError\nmore"), "the hub could not be reached"),
    ],
    ids=["missing", "gated", "revision", "network"],
)
def test_every_hub_failure_is_one_line_naming_the_id_and_why(monkeypatch, error, reason):
    def failing(repo_id, **kwargs):
        raise error()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(HubResolveError) as raised:
        resolve_pretrained("org/name", revision="nope")
    message = str(raised.value)
    assert message.startswith("model 'org/name' at revision 'nope': ") and reason in message and "\n" not in message


def test_pickles_and_other_frameworks_weights_are_never_downloaded(monkeypatch, tmp_path):
    calls = []

    def recording(repo_id, **kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    resolve_pretrained("org/name")
    repo_files = [
        "model_index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "text_encoder/model.safetensors",
        "text_encoder/tf_model.h5",
        "text_encoder/flax_model.msgpack",
        "unet/model.onnx",
        "model.ckpt",
        "weights.pth",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer.json",
    ]
    fetched = list(filter_repo_objects(repo_files, ignore_patterns=calls[0]["ignore_patterns"]))
    assert calls[0]["ignore_patterns"] == IGNORE_PATTERNS
    assert fetched == [
        "model_index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer.json",
    ]
    (tmp_path / "vae").mkdir()
    assert resolve_pretrained("org/name", subfolder="vae") == tmp_path / "vae"
    assert calls[1]["allow_patterns"] == ["vae/*"]  # a component of a larger repo: only its folder


def test_a_cached_snapshot_with_only_pickle_weights_is_refused(saved_pipe, hub_cache):
    snapshot = cache_repo(hub_cache, "org/pickled", saved_pipe)
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (snapshot / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(PipelineLoadError, match=r"component 'vae': only pickle weights"):
        check_pipeline_folder(resolve_pretrained("org/pickled"))
    with pytest.raises(PipelineLoadError, match=r"component 'vae': only pickle weights"):
        MMDiffTextToImagePipeline.from_pretrained("org/pickled")


# ---------------------------------------------------------------- config keys and the eval encoder


def test_the_vae_tokenizer_and_text_encoder_keys_take_hub_ids(tmp_path, hub_cache, vae, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmdiff.data.tokenizer import build_tokenizer, load_tokenizer
    from mmdiff.training.stages import load_text_encoder, prepare_vae

    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    cache_repo(hub_cache, "org/vae", tmp_path / "vae")
    tokenizer.save_pretrained(tmp_path / "tok")
    cache_repo(hub_cache, "org/tok", tmp_path / "tok", ref="v1")  # only at v1: main is not cached
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "clip")
    cache_repo(hub_cache, "org/clip", tmp_path / "clip")
    cfg = load_config(
        None,
        ["data.train_shards=x", "vae.pretrained_path=org/vae", "tokenizer.kind=pretrained", "tokenizer.path=org/tok"]
        + ["tokenizer.revision=v1", "text_encoder.kind=clip", "text_encoder.path=org/clip"],
    )
    check_pretrained(cfg)  # what training checks at start: every id resolves
    loaded_vae = prepare_vae(cfg, tmp_path / "run", None, None)
    assert loaded_vae.config.latent_channels == vae.config.latent_channels
    assert torch.equal(loaded_vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    loaded = build_tokenizer("pretrained", path="org/tok", revision="v1")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    encoder, encoder_tokenizer = load_text_encoder(cfg, "cpu")
    assert not any(p.requires_grad for p in encoder.parameters()) and len(encoder_tokenizer) == len(tokenizer)
    with pytest.raises(HubResolveError, match=r"tokenizer 'org/tok': not in the Hugging Face cache"):
        load_tokenizer("org/tok")  # main was never fetched


def test_training_refuses_an_id_it_cannot_resolve_naming_the_key(hub_cache):
    cfg = load_config(None, ["data.train_shards=x", "vae.pretrained_path=org/missing"])
    with pytest.raises(ConfigError) as raised:
        check_pretrained(cfg)
    message = str(raised.value)
    assert (
        message.startswith("vae.pretrained_path 'org/missing': not in the Hugging Face cache") and "\n" not in message
    )
    cfg = load_config(None, ["data.train_shards=x", "text_encoder.kind=t5", "text_encoder.path=runs/nowhere"])
    with pytest.raises(ConfigError, match=r"text_encoder.path 'runs/nowhere': not in the Hugging Face cache"):
        check_pretrained(cfg)  # shaped like an id, and no such folder: the hub is asked, and says no


def test_the_eval_encoder_takes_a_hub_id(hub_cache):
    from mmdiff.data.shards import iterate_records
    from mmdiff.eval.features.spaces import resolve_encoders

    snapshot = cache_repo(hub_cache, "org/shapes-encoder", REPO / "assets" / "eval_encoder_shapes")
    records = [r for _, r in zip(range(4), iterate_records(str(REPO / "assets" / "shapes_val_sample.tar")))]
    images, captions = [r[1] for r in records], [r[2] for r in records]
    spaces, _ = resolve_encoders("org/shapes-encoder", None, None, None, "cpu", images[0].width, images, captions)
    assert str(snapshot) in spaces["eval_encoder"].name


# ---------------------------------------------------------------- the command line


def test_generate_from_a_hub_id_offline(saved_pipe, tmp_path):
    cache = tmp_path / "hf_cache"
    cache_repo(cache, "org/tiny", saved_pipe)
    out = tmp_path / "images"
    args = ["generate", "--model", "org/tiny", "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
    proc = _mmdiff([*args, "--quiet", "--device", "cpu"], cache)
    assert proc.returncode == 0, proc.stderr
    assert (out / "0000.png").is_file()


def test_a_missing_hub_id_exits_2_with_one_line(tmp_path):
    proc = _mmdiff(["generate", "--model", "org/missing", "--prompt", "x", "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("mmdiff generate: error: --model 'org/missing': not in the Hugging Face cache"), err
    assert "HF_HUB_OFFLINE=1" in err and "\n" not in err and "Traceback" not in proc.stderr


def test_revision_selects_the_snapshot_and_needs_a_hub_id(saved_pipe, tmp_path, hub_cache, capsys):
    cache_repo(hub_cache, "org/tiny", saved_pipe, ref="v1")
    common = ["--unconditional", "1", "--steps", "2", "--quiet", "--device", "cpu"]
    out = tmp_path / "captions.json"
    assert main(["caption", "--model", "org/tiny", "--revision", "v1", *common, "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["caption", "--model", "org/tiny", *common, "--out", str(out)]) == 2  # main is not cached
    assert "--model 'org/tiny': not in the Hugging Face cache" in capsys.readouterr().err
    assert main(["caption", "--model", str(saved_pipe), "--revision", "v1", *common, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmdiff caption: error: --revision v1 applies to a hub id; --model {saved_pipe} is a local folder"
