"""Atomic, pickle-free training checkpoints.

A checkpoint folder `step-XXXXXXXX/` holds the diffusers pipeline (EMA weights, ready to sample from), the raw
training state as safetensors + JSON (model, EMA, optimizer tensors, scheduler/RNG/step), and the resolved config.
It is written under a temporary name and renamed into place only when complete, so a crash mid-save never leaves a
half-written checkpoint; older ones beyond `keep` are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[^/]*$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing or truncated file); an older checkpoint may still be usable."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose tensors do not fit the configured model (a different config)."""


def atomic_dir(final: Path):
    """A context manager yielding a temporary sibling folder that is renamed to `final` on success.

    The temporary folder is ``.<name>.tmp-XXXX`` (hidden and never matched by :data:`CHECKPOINT_RE`), so a crash
    at any point leaves either the old `final` or the new one, plus debris that :func:`clean_stale_temp` removes.
    """

    class _Atomic:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            _fsync_tree(self.tmp)
            if final.exists():  # replacing a folder: move the old one aside first, then drop it
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(self.tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, final)
            _fsync_dir(final.parent)  # the rename itself must reach the disk before older checkpoints are pruned
            return False

    return _Atomic()


def clean_stale_temp(folder: Path) -> list[str]:
    """Remove what a crash inside :func:`atomic_dir` left in `folder`; returns the names handled.

    ``.<name>.tmp-*`` folders are half-written and deleted. ``.<name>.old-*`` is a complete previous version moved
    aside just before its replacement was renamed in: it is restored when the crash came between the two renames
    (`<name>` is missing), otherwise deleted. Only call this when no other process is writing into `folder`.
    """
    handled: list[str] = []
    if not folder.is_dir():
        return handled
    for entry in sorted(folder.iterdir()):
        m = TEMP_RE.match(entry.name)
        if m is None or not entry.is_dir():
            continue
        target = folder / m.group("name")
        if m.group("kind") == "old" and not target.exists():
            os.replace(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        handled.append(entry.name)
    return handled


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


# ---------------------------------------------------------------- optimizer and RNG state without pickle


def optimizer_state_to_safetensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into flat tensors and a JSON-friendly remainder."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_from_json(meta["python"]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _to_json(obj):
    return [_to_json(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _from_json(obj):
    return tuple(_from_json(x) for x in obj) if isinstance(obj, list) else obj


def save_training_state(
    folder: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict,
) -> None:
    """Write model/EMA weights, optimizer and RNG state into `folder` (safetensors + JSON only)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, folder / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_state_to_safetensors(optimizer.state_dict())
    save_file(opt_tensors, folder / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, folder / "rng.safetensors")
    (folder / "state.json").write_text(json.dumps({**extra, "optimizer": opt_meta, "rng": rng_meta}, indent=1))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a truncated file, a pickle renamed to .safetensors) is refused."""
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for unreadable files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def _check_fits(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"shape of {wrong[0]!r} is {tuple(tensors[wrong[0]].shape)}, the model wants {tuple(expected[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise CheckpointMismatchError(
            f"{path} does not fit the configured model ({detail}); it was trained with the config.yaml saved beside "
            "it: use that config, or a new train.output_dir"
        )


def load_training_state(
    folder: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore what `save_training_state` wrote; returns the `extra` dict (step, scheduler state, ...).

    Everything is read and checked before anything is modified, so a failed load leaves the modules untouched.
    Raises CheckpointError for missing or unreadable files, CheckpointMismatchError when the tensors do not fit.
    """
    missing = [
        n
        for n in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")
        if not (folder / n).is_file()
    ]
    if missing:
        raise CheckpointError(f"training state in {folder} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / 'state.json'} is not valid JSON ({err})") from None
    weights = _read_safetensors(folder / "model.safetensors")
    ema_weights = _read_safetensors(folder / "ema.safetensors")
    opt_tensors = _read_safetensors(folder / "optimizer.safetensors")
    rng_tensors = _read_safetensors(folder / "rng.safetensors") if (folder / "rng.safetensors").is_file() else None
    _check_fits(model, weights, folder / "model.safetensors")
    _check_fits(ema, ema_weights, folder / "ema.safetensors")
    model.load_state_dict(weights)
    ema.load_state_dict(ema_weights)
    optimizer.load_state_dict(optimizer_state_from_safetensors(opt_tensors, meta.pop("optimizer")))
    rng_meta = meta.pop("rng")
    if rng_tensors is not None:
        set_rng_state(rng_tensors, rng_meta)
    return meta


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
