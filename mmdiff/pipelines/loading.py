"""Loading a saved pipeline folder safely: safetensors only, and every failure names the component at fault.

diffusers alone loads a transformer whose config has one block more than its weights with a warning and random
weights, reports a truncated file without saying which component it belongs to, and would fall back to pickled
`.bin` weights. `check_pipeline_folder` runs before diffusers and turns each of these into a `PipelineLoadError`.

A folder never chooses the code that loads it: diffusers imports whatever module a model_index.json entry
[library, class_name] names (a downloaded folder naming its own `payload.py` would run it). Every entry is resolved
here by name first, against diffusers' and transformers' own classes and a fixed table of mmdiff's, and anything else
is refused before anything is imported; community code goes through diffusers' `custom_pipeline` with
`trust_remote_code=True`.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class PipelineLoadError(ValueError):
    """A pipeline folder that cannot be loaded; the message names the component and the problem."""


# the pipeline classes a saved mmdiff folder names as `_class_name` (mmdiff/pipelines/text_to_image.py and
# image_to_text.py; tests/test_untrusted_folders.py checks that the names match)
PIPELINE_CLASS_NAMES = ("MMDiffTextToImagePipeline", "MMDiffImageToTextPipeline")
# mmdiff's own component classes, by the [library, class_name] that save_pretrained records for them: their module
# path, and the package front door (`mmdiff/__init__.py`) that re-exports some of them
OWN_COMPONENTS = {
    ("mmdiff.models.transformer", "MMDiTModel"),
    ("mmdiff.diffusion.masked", "MaskedDiffusionScheduler"),
    ("mmdiff.models.text_encoders", "OpenCLIPTextEncoder"),
    ("mmdiff", "MMDiTModel"),
    ("mmdiff", "MaskedDiffusionScheduler"),
}
REFUSED = (
    "a folder cannot choose the code that loads it: mmdiff loads diffusers' and transformers' model, scheduler and "
    "tokenizer classes and its own {own}; community code goes through diffusers' custom_pipeline with "
    "trust_remote_code=True"
)


def _refuse(what: str) -> PipelineLoadError:
    own = ", ".join(sorted({name for _, name in OWN_COMPONENTS}))
    return PipelineLoadError(f"{what}; {REFUSED.format(own=own)}")


def _library_class(library: str, class_name: str):
    """`class_name` looked up as an attribute of diffusers or transformers (their own lazy imports only), if it is a
    class of a kind a pipeline component may be; None otherwise."""
    if library == "diffusers":
        import diffusers
        from diffusers import ModelMixin, SchedulerMixin

        package, kinds = diffusers, (ModelMixin, SchedulerMixin)
    else:
        import transformers
        from transformers import PreTrainedModel, PreTrainedTokenizerBase

        package, kinds = transformers, (PreTrainedModel, PreTrainedTokenizerBase)
        class_name = _remap_transformers_class(class_name)
    try:
        found = getattr(package, class_name, None)
    except Exception:  # a lazy attribute whose optional backend is missing
        return None
    return found if isinstance(found, type) and issubclass(found, kinds) else None


def _remap_transformers_class(class_name: str) -> str:
    """The name diffusers itself loads for a transformers class renamed in transformers 5 (CLIPTokenizerFast, ...)."""
    try:
        from diffusers.utils import _maybe_remap_transformers_class
    except ImportError:  # a diffusers release without the remapping
        return class_name
    return _maybe_remap_transformers_class(class_name) or class_name


def component_class(name: str, entry) -> type | None:
    """The class a model_index.json entry `[library, class_name]` names, resolved by name, so that a folder never
    makes anything import a module it chose; None for an absent optional component ([null, null]).

    Allowed: a diffusers model or scheduler class and a transformers model or tokenizer class (attributes of the
    top-level package), and mmdiff's own `OWN_COMPONENTS`. Anything else is a `PipelineLoadError` naming the entry.
    """
    if not (isinstance(entry, list | tuple) and len(entry) == 2):
        raise PipelineLoadError(f"component {name!r}: model_index.json entry {entry!r} is not [library, class_name]")
    library, class_name = entry
    if library is None:
        return None
    shown = f"component {name!r}: model_index.json names {[library, class_name]}"
    if not (isinstance(library, str) and isinstance(class_name, str)) or class_name.startswith("_"):
        raise _refuse(shown)
    if (library, class_name) in OWN_COMPONENTS:
        return getattr(importlib.import_module(library), class_name)  # a module of this table, not of the folder
    found = _library_class(library, class_name) if library in ("diffusers", "transformers") else None
    if found is None:
        raise _refuse(shown)
    return found


def check_model_index(index: dict) -> dict[str, type]:
    """Resolve every component entry of a model_index.json (`component_class`) and check that `_class_name`, when
    present, is one of mmdiff's pipeline classes; returns {component: class} of the present components.

    Nothing the index names is imported: run it before handing a folder to diffusers, which imports the library of
    every entry (and, for a `_class_name` list [module, class], runs that module from the folder)."""
    pipeline_class = index.get("_class_name")
    if pipeline_class is not None and pipeline_class not in PIPELINE_CLASS_NAMES:
        raise _refuse(f"model_index.json names the pipeline class {pipeline_class!r}, which is not mmdiff's")
    classes = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list | tuple):
            continue
        found = component_class(name, entry)
        if found is not None:
            classes[name] = found
    return classes


def _safetensors_shapes(name: str, folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every safetensors file of a component; refuses pickles and damaged files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise PipelineLoadError(
                f"component {name!r}: only pickle weights {pickles} in {folder}; mmdiff loads safetensors only "
                "(pickles can run arbitrary code). Convert them with save_pretrained(..., safe_serialization=True)."
            )
        raise PipelineLoadError(f"component {name!r}: no .safetensors weights in {folder}")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise PipelineLoadError(
                f"component {name!r}: weights file {path} is truncated or corrupt ({err}); re-save the pipeline"
            ) from err
    return shapes


def _check_model_weights(name: str, folder: Path, model_class) -> None:
    """Build the component from its config on the meta device and compare every parameter name and shape."""
    from accelerate import init_empty_weights

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PipelineLoadError(f"component {name!r}: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
        with init_empty_weights():
            model = model_class.from_config(config)
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise PipelineLoadError(f"component {name!r}: config {config_path} is invalid: {err}") from err
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    stored = _safetensors_shapes(name, folder)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} weights missing (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})")
        if wrong:
            key = wrong[0]
            details.append(f"{len(wrong)} shape mismatches (e.g. {key}: config {expected[key]} vs file {stored[key]})")
        raise PipelineLoadError(f"component {name!r}: its config.json does not match its weights: {'; '.join(details)}")


def check_pipeline_folder(path: str | os.PathLike, components: dict[str, object] | None = None) -> None:
    """Validate a saved pipeline folder before diffusers loads it.

    Checks model_index.json (every component class resolved by name, `check_model_index`, before anything is
    imported), that every listed component has its folder, that weights are safetensors (pickles are
    refused), readable (not truncated), and that each diffusers model's config matches its weights key for key and
    shape for shape. Components passed in `components` (already built by the caller) skip the file checks; their
    entries are still resolved by name, as diffusers imports their library all the same.
    """
    from diffusers import ModelMixin

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no pipeline folder at {root}")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise PipelineLoadError(f"{root} is not a saved pipeline: model_index.json is missing")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineLoadError(f"{index_path} is not valid JSON: {err}") from err
    if not isinstance(index, dict):
        raise PipelineLoadError(f"{index_path} is not a JSON object of components")
    classes = check_model_index(index)  # before anything else: nothing the folder names is imported unchecked
    for name, model_class in classes.items():
        if components and name in components:
            continue
        folder = root / name
        if not folder.is_dir():
            raise PipelineLoadError(
                f"component {name!r} ({index[name][1]}) is listed in model_index.json but {folder} is missing"
            )
        if issubclass(model_class, ModelMixin):
            _check_model_weights(name, folder, model_class)
        elif any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()) or any(folder.glob("*.safetensors")):
            _safetensors_shapes(name, folder)  # other weighted components (a frozen text encoder): files only


def load_error(path: str | os.PathLike, err: Exception) -> PipelineLoadError:
    """Wrap an error diffusers raised while loading, naming the component when its message names one's folder."""
    root = Path(path)
    message = str(err)
    named = [p.name for p in sorted(root.iterdir()) if p.is_dir() and str(p) in message] if root.is_dir() else []
    where = f"component {named[0]!r}" if named else f"pipeline folder {root}"
    return PipelineLoadError(f"{where} failed to load: {type(err).__name__}: {message}")


def keep_only_pipeline_class(namespace: dict, pipeline_class: type) -> None:
    """Make a community entry point's module hold exactly one pipeline class, `pipeline_class`.

    diffusers executes every local `custom_pipeline` folder's `pipeline.py` into the same cached module
    (`diffusers_modules.local.pipeline`), reusing its namespace. After a second entry point has run there, the module
    still holds the class the first one imported, and diffusers refuses a module with two pipeline classes. Each
    entry point calls this on its own `globals()` so that, whichever was loaded before, only its class is found.
    """
    from diffusers import DiffusionPipeline

    for name, value in list(namespace.items()):
        if isinstance(value, type) and issubclass(value, DiffusionPipeline) and value is not pipeline_class:
            del namespace[name]
