"""Loading a saved pipeline folder safely: safetensors only, and every failure names the component at fault.

diffusers alone loads a transformer whose config has one block more than its weights with a warning and random
weights, reports a truncated file without saying which component it belongs to, and would fall back to pickled
`.bin` weights. `check_pipeline_folder` runs before diffusers and turns each of these into a `PipelineLoadError`.
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


def _component_class(library: str, class_name: str):
    """The class recorded in model_index.json, or None when its library cannot be imported here."""
    try:
        return getattr(importlib.import_module(library), class_name, None)
    except ImportError:
        return None


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

    Checks model_index.json, that every listed component has its folder, that weights are safetensors (pickles are
    refused), readable (not truncated), and that each diffusers model's config matches its weights key for key and
    shape for shape. Components passed in `components` (already built by the caller) are skipped.
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
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if components and name in components:
            continue
        folder = root / name
        if not folder.is_dir():
            raise PipelineLoadError(
                f"component {name!r} ({entry[1]}) is listed in model_index.json but {folder} is missing"
            )
        model_class = _component_class(*entry)
        if isinstance(model_class, type) and issubclass(model_class, ModelMixin):
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
