"""A pipeline folder never chooses the code that loads it: every model_index.json entry is resolved by name against
diffusers, transformers and mmdiff's own classes before anything is imported, and anything else is refused."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline, PipelineLoadError
from mmdiff.pipelines.loading import OWN_COMPONENTS, PIPELINE_CLASS_NAMES, check_model_index, check_pipeline_folder

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "shapes_small"
REFUSED = "a folder cannot choose the code that loads it"


def _name(folder: Path, component: str, entry) -> None:
    """Make `folder`'s model_index.json name `entry` for `component` (`_class_name` included)."""
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index[component] = entry
    path.write_text(json.dumps(index))


def _write_payload(package: Path, marker: Path) -> None:
    """A module that leaves `marker` behind when it is imported (what a downloaded folder's code could do)."""
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "payload.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nclass DDIMScheduler: pass\n"
    )


def test_a_module_the_folder_ships_is_never_imported(saved_pipe, tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"
    _write_payload(saved_pipe / "downloaded_model", marker)
    monkeypatch.syspath_prepend(str(saved_pipe))  # the folder's module is importable: the attack is real
    _name(saved_pipe, "scheduler", ["downloaded_model.payload", "DDIMScheduler"])
    for cls in (MMDiffTextToImagePipeline, MMDiffImageToTextPipeline):
        with pytest.raises(PipelineLoadError, match=rf"component 'scheduler'.*downloaded_model\.payload.*{REFUSED}"):
            cls.from_pretrained(saved_pipe)
    assert not marker.exists() and "downloaded_model.payload" not in sys.modules
    monkeypatch.delitem(sys.modules, "downloaded_model", raising=False)
    importlib.import_module("downloaded_model.payload")  # the set-up was live: importing it does run it
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "downloaded_model.payload")
    monkeypatch.delitem(sys.modules, "downloaded_model")


def test_diffusers_own_loader_with_the_entry_points_refuses_it_too(saved_pipe, tmp_path, monkeypatch):
    # DiffusionPipeline.from_pretrained(..., custom_pipeline=...) does not go through mmdiff's from_pretrained; the
    # pipeline class's extract_init_dict, which diffusers calls with the whole index first, resolves it by name
    from diffusers import DiffusionPipeline

    marker = tmp_path / "payload_ran"
    _write_payload(saved_pipe / "downloaded_model", marker)
    monkeypatch.syspath_prepend(str(saved_pipe))
    for name in ("downloaded_model.payload", "downloaded_model"):  # another test may have imported it on purpose
        monkeypatch.delitem(sys.modules, name, raising=False)
    _name(saved_pipe, "scheduler", ["downloaded_model.payload", "DDIMScheduler"])
    entry_point = Path(__file__).resolve().parents[1] / "pipelines" / "mmdiff_text_to_image"
    with pytest.raises(PipelineLoadError, match=REFUSED):
        DiffusionPipeline.from_pretrained(saved_pipe, custom_pipeline=str(entry_point), trust_remote_code=True)
    assert not marker.exists() and "downloaded_model.payload" not in sys.modules


def test_a_standard_library_module_is_not_imported_either(saved_pipe, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "this", raising=False)
    _name(saved_pipe, "text_scheduler", ["this", "x"])
    with pytest.raises(PipelineLoadError, match=rf"component 'text_scheduler'.*'this'.*{REFUSED}"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe)
    assert "this" not in sys.modules and "Beautiful is better" not in capsys.readouterr().out
    _name(saved_pipe, "text_scheduler", ["os", "system"])
    with pytest.raises(PipelineLoadError, match=REFUSED):
        check_pipeline_folder(saved_pipe)


@pytest.mark.parametrize(
    "entry",
    [
        ["diffusers", "NoSuchScheduler"],
        ["transformers", "NoSuchTokenizer"],
        ["diffusers", "DiffusionPipeline"],  # a class of diffusers, but no component
        ["diffusers", "__class__"],
        ["transformers", "pipeline"],  # a function, not a class
        ["mmdiff.models.transformer", "torch"],  # a name inside one of mmdiff's modules that is not in the table
        ["mmdiff", "MMDiffTextToImagePipeline"],
    ],
)
def test_a_known_library_with_a_class_that_is_no_component_is_refused(saved_pipe, entry):
    _name(saved_pipe, "scheduler", entry)
    with pytest.raises(PipelineLoadError, match=REFUSED):
        check_pipeline_folder(saved_pipe)


def test_entries_that_are_no_library_class_pair_are_refused():
    with pytest.raises(PipelineLoadError, match=r"is not \[library, class_name\]"):
        check_model_index({"scheduler": ["diffusers", "DDIMScheduler", "extra"]})
    with pytest.raises(PipelineLoadError, match=REFUSED):
        check_model_index({"scheduler": ["diffusers", 3]})


def test_the_pipeline_class_is_one_of_mmdiffs(saved_pipe, tmp_path):
    marker = tmp_path / "pipeline_ran"
    _write_payload(saved_pipe, marker)  # payload.py at the folder's top, where diffusers looks for a custom pipeline
    _name(saved_pipe, "_class_name", ["payload", "DDIMScheduler"])
    with pytest.raises(PipelineLoadError, match=rf"pipeline class.*{REFUSED}"):
        MMDiffTextToImagePipeline.from_pretrained(saved_pipe)
    assert not marker.exists()
    _name(saved_pipe, "_class_name", "StableDiffusionPipeline")
    with pytest.raises(PipelineLoadError, match=r"'StableDiffusionPipeline', which is not mmdiff's"):
        check_pipeline_folder(saved_pipe)


def test_the_tables_name_what_mmdiff_saves(saved_pipe):
    from mmdiff.models.text_encoders import OpenCLIPTextEncoder

    assert set(PIPELINE_CLASS_NAMES) == {MMDiffTextToImagePipeline.__name__, MMDiffImageToTextPipeline.__name__}
    assert (OpenCLIPTextEncoder.__module__, OpenCLIPTextEncoder.__name__) in OWN_COMPONENTS
    index = json.loads((saved_pipe / "model_index.json").read_text())
    saved = {tuple(v) for k, v in index.items() if isinstance(v, list) and v[0] and not k.startswith("_")}
    own = {entry for entry in saved if entry[0].startswith("mmdiff")}
    assert own and own <= OWN_COMPONENTS
    assert set(check_model_index(index)) == {k for k, v in index.items() if isinstance(v, list) and v[0]}


def test_the_shipped_folder_still_loads():
    check_pipeline_folder(SHIPPED)
    classes = check_model_index(json.loads((SHIPPED / "model_index.json").read_text()))
    assert (
        classes["transformer"].__name__ == "MMDiffTransformer2DModel"
        and classes["scheduler"].__name__ == "DDIMScheduler"
    )
    pipe = MMDiffImageToTextPipeline.from_pretrained(SHIPPED)
    assert type(pipe.text_scheduler).__name__ == "MaskedDiffusionScheduler"


def test_the_transformers_old_name_and_its_new_one_both_load(tmp_path):
    # the shipped folder records the name the class had when it was saved; a fresh save records the new one
    from mmdiff.models.transformer import MMDiffTransformer2DModel, MMDiTModel

    assert MMDiTModel is MMDiffTransformer2DModel
    old = json.loads((SHIPPED / "model_index.json").read_text())["transformer"]
    assert old == ["mmdiff.models.transformer", "MMDiTModel"]
    shipped = MMDiffTextToImagePipeline.from_pretrained(SHIPPED)
    assert isinstance(shipped.transformer, MMDiffTransformer2DModel)
    shipped.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert index["transformer"] == ["mmdiff.models.transformer", "MMDiffTransformer2DModel"]
    config = json.loads((tmp_path / "resaved" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "MMDiffTransformer2DModel"
    check_pipeline_folder(tmp_path / "resaved")
    again = MMDiffTextToImagePipeline.from_pretrained(tmp_path / "resaved")
    for (name, a), b in zip(shipped.transformer.state_dict().items(), again.transformer.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_command_line_refuses_such_a_folder_in_one_line(saved_pipe, tmp_path):
    _name(saved_pipe, "text_scheduler", ["this", "x"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "captions.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mmdiff.cli", "caption", "--model", str(saved_pipe), "--unconditional", "1"]
        + ["--out", str(out), "--quiet", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("mmdiff caption: error: component 'text_scheduler'") and "\n" not in err, err
    assert REFUSED in err and "Traceback" not in proc.stderr
    assert "Beautiful is better" not in proc.stdout and not out.exists()
