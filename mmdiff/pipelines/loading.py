"""Loading a saved pipeline folder safely: safetensors only, and every failure names the component at fault.

diffusers alone loads a transformer whose config has one block more than its weights with a warning and random
weights, reports a truncated file without saying which component it belongs to, and would fall back to pickled
`.bin` weights. `check_pipeline_folder` runs before diffusers and turns each of these into a `PipelineLoadError`.

Nothing a folder claims is allocated before it is checked: every component's config is read as JSON and its sizes
held against `mmdiff.checks.SIZE_CAPS` (a transformer 10**9 wide, a scheduler of 10**9 timesteps) before any class
is built from it, models are built on the meta device, and the weights files together must fit in this machine's
memory (a sparse 16 GB file of holes claims what it cannot hold).

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

from ..checks import over_cap

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# the config files of a component folder whose sizes are checked (a tokenizer's tokenizer_config.json holds no sizes;
# its model_max_length is 10**30 by design)
CONFIG_FILES = ("config.json", "scheduler_config.json")
# A config is a few KB: anything far bigger is not one, and is not read into memory.
MAX_CONFIG_BYTES = 16 * 2**20
# The keys of diffusers, transformers and mmdiff component configs that size what gets built, by the kind of
# `mmdiff.checks.SIZE_CAPS` entry that bounds them; checked at any depth (transformers nests text_config, ...).
FOLDER_CAPPED_KEYS = {
    **dict.fromkeys(("hidden_size", "d_model", "external_text_dim", "projection_dim", "cross_attention_dim"), "width"),
    **dict.fromkeys(("intermediate_size", "d_ff"), "mlp_width"),
    "mlp_ratio": "mlp_ratio",
    **dict.fromkeys(
        ("depth", "text_encoder_depth", "image_encoder_depth", "num_hidden_layers", "num_layers", "layers_per_block"),
        "depth",
    ),
    **dict.fromkeys(("num_heads", "num_attention_heads"), "heads"),
    "vocab_size": "vocabulary",
    **dict.fromkeys(("max_text_length", "null_context_length"), "text_length"),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), "positions"),
    **dict.fromkeys(("block_out_channels", "latent_channels", "in_channels", "out_channels"), "channels"),
    "sample_size": "image_size",
    "patch_size": "patch_size",
    "num_train_timesteps": "timesteps",
}


class PipelineLoadError(ValueError):
    """A pipeline folder that cannot be loaded; the message names the component and the problem."""


# the pipeline classes a saved mmdiff folder names as `_class_name` (mmdiff/pipelines/text_to_image.py and
# image_to_text.py; tests/test_untrusted_folders.py checks that the names match)
PIPELINE_CLASS_NAMES = ("MMDiffTextToImagePipeline", "MMDiffImageToTextPipeline")
# mmdiff's own component classes, by the [library, class_name] that save_pretrained records for them: their module
# path, and the package front door (`mmdiff/__init__.py`) that re-exports some of them; "MMDiTModel" is the
# transformer's name in folders saved before it was renamed (an alias of the same class)
OWN_COMPONENTS = {
    ("mmdiff.models.transformer", "MMDiffTransformer2DModel"),
    ("mmdiff.models.transformer", "MMDiTModel"),
    ("mmdiff.diffusion.masked", "MaskedDiffusionScheduler"),
    ("mmdiff.models.text_encoders", "OpenCLIPTextEncoder"),
    ("mmdiff", "MMDiffTransformer2DModel"),
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


def read_json_file(path: Path, what: str = "") -> dict:
    """A small JSON object file (a config, model_index.json); one that is huge, not JSON or not an object is a
    `PipelineLoadError` naming the file (after `what`, the component, when given), and a huge one is never read."""
    where = f"{what}: {path}" if what else str(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PipelineLoadError(
            f"{where} is {size:,} bytes, not a config (those are a few KB; the limit is {MAX_CONFIG_BYTES:,})"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise PipelineLoadError(f"{where} is not UTF-8 text (byte {err.start})") from None
    except ValueError as err:  # json.JSONDecodeError, and an integer of more than 4300 digits
        raise PipelineLoadError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise PipelineLoadError(f"{where} is not a JSON object")
    return data


def check_config_sizes(what: str, path: Path, config: dict, prefix: str = "") -> None:
    """Refuse a component config whose sizes (`FOLDER_CAPPED_KEYS`, at any depth) are negative or above their
    `SIZE_CAPS` entry, before anything is built from it; the error names the file, the key and the cap."""
    for key, value in config.items():
        path_key = f"{prefix}{key}"
        if isinstance(value, dict):
            check_config_sizes(what, path, value, f"{path_key}.")
            continue
        kind = FOLDER_CAPPED_KEYS.get(key)
        if kind is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, int | float) and not isinstance(v, bool) and v < 0 for v in items):
            raise PipelineLoadError(f"{what}: {path_key}={value} is a size below 0 (in {path})")
        problem = over_cap(path_key, value, kind)
        if problem:
            raise PipelineLoadError(f"{what}: {problem} (in {path})")


def memory_bytes() -> int | None:
    """This machine's memory, RAM and swap together (None when psutil cannot tell): the most a load can hold."""
    try:
        import psutil

        return int(psutil.virtual_memory().total + psutil.swap_memory().total)
    except Exception:  # no psutil, or a platform where it cannot read the figures: no check
        return None


def _check_weights_fit(root: Path, files: list[Path]) -> None:
    """The weights files together must fit in memory: diffusers and transformers read every tensor into RAM, so a
    folder claiming more (a sparse file of holes whose header claims 16 GB) is refused here, not with a
    MemoryError part way through loading."""
    total = sum(path.stat().st_size for path in files)
    available = memory_bytes()
    if available is not None and total > available:
        largest = max(files, key=lambda path: path.stat().st_size)
        raise PipelineLoadError(
            f"pipeline folder {root}: its weights files take {total / 2**30:.1f} GiB ({largest} alone "
            f"{largest.stat().st_size / 2**30:.1f} GiB), more than this machine's {available / 2**30:.1f} GiB of "
            "memory (RAM and swap); a damaged or hostile file, or a model too large for this machine"
        )


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


def _check_model_weights(name: str, folder: Path, model_class, config: dict | None) -> None:
    """Build the component from its config (already read and size-checked) on the meta device, where no tensor is
    allocated (torch's meta device for the tensors an __init__ makes, accelerate's for the parameters it registers),
    and compare every parameter name and shape."""
    import torch
    from accelerate import init_empty_weights

    config_path = folder / "config.json"
    if config is None:
        raise PipelineLoadError(f"component {name!r}: {config_path} is missing")
    try:
        with torch.device("meta"), init_empty_weights():
            model = model_class.from_config(config)
    # RuntimeError: torch's own refusals of the shapes a config asks for (a size of 0 where one is needed, ...)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as err:
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
    index = read_json_file(index_path)
    classes = check_model_index(index)  # before anything else: nothing the folder names is imported unchecked
    checked = {name: model_class for name, model_class in classes.items() if not (components and name in components)}
    configs: dict[str, dict | None] = {}
    for name in checked:
        folder = root / name
        if not folder.is_dir():
            raise PipelineLoadError(
                f"component {name!r} ({index[name][1]}) is listed in model_index.json but {folder} is missing"
            )
        configs[name] = None
        for file_name in CONFIG_FILES:  # every config's sizes, before anything is built or read from the weights
            config_path = folder / file_name
            if config_path.is_file():
                config = read_json_file(config_path, f"component {name!r}")
                check_config_sizes(f"component {name!r}", config_path, config)
                configs[name] = config if file_name == "config.json" else configs[name]
    _check_weights_fit(root, [path for name in checked for path in sorted((root / name).glob("*.safetensors"))])
    for name, model_class in checked.items():
        folder = root / name
        if issubclass(model_class, ModelMixin):
            _check_model_weights(name, folder, model_class, configs[name])
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
