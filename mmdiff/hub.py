"""A model named by a local path or by a Hugging Face Hub id ("org/name"), resolved to a local folder as diffusers
resolves `from_pretrained` names: an existing path is used as it is, a hub id is fetched with huggingface_hub's
`snapshot_download` into its cache (or found there offline). Nothing is downloaded unless a hub id is given, and
pickled or other-framework weights are never downloaded (`IGNORE_PATTERNS`).

huggingface_hub itself honours HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE and the token (HF_TOKEN, `hf auth login`).
"""

from __future__ import annotations

import os
from pathlib import Path

# files a hub snapshot never fetches: pickles (which run code when loaded) and weights of other frameworks
IGNORE_PATTERNS = [
    *("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.joblib"),
    *("*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.gguf", "*.mlmodel"),
]


class HubResolveError(ValueError):
    """A hub id that could not be resolved to a local folder; the message names the id and why, on one line."""


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` has the shape of a hub repo id, "org/name" (huggingface_hub's `validate_repo_id`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    what: str = "model",
) -> Path:
    """The local folder (or file) of `name_or_path`, with `subfolder` appended when given.

    An existing path is returned as it is (`revision` does not apply to it). A hub id "org/name" that is not a path
    here is fetched at `revision` (a branch, tag or commit hash; default main) into the Hugging Face cache, or found
    there when offline, without pickle weights (`IGNORE_PATTERNS`); with `subfolder` only that folder is fetched.
    `local_files_only=None` leaves the choice to huggingface_hub (HF_HUB_OFFLINE), and `token=None` uses HF_TOKEN or
    the saved login. A failure is one `HubResolveError` naming the id and the reason (`what` says what it is, as
    in "pipeline folder"). Anything else (a path that does not exist and is no hub id) comes back as a Path too,
    so that the caller's own check says what is missing in its terms.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or not is_hub_id(name_or_path):
        return path / subfolder if subfolder else path
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            token=token,
            allow_patterns=[f"{subfolder.strip('/')}/*"] if subfolder else None,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as err:  # huggingface_hub's errors, httpx's, OSError: each one is explained below
        raise _explain(str(name_or_path), revision, what, local_files_only, err) from err
    resolved = Path(folder) / subfolder if subfolder else Path(folder)
    if not resolved.is_dir():
        raise HubResolveError(f"{what} {name_or_path!r}: the hub repo has no {subfolder}/ folder")
    return resolved


def _explain(repo_id: str, revision: str | None, what: str, local_files_only: bool | None, err: Exception):
    """The one-line HubResolveError for a failed `snapshot_download` of `repo_id`."""
    from huggingface_hub import constants, errors

    first = next(iter(str(err).strip().splitlines()), "")
    offline = bool(local_files_only) or bool(getattr(constants, "HF_HUB_OFFLINE", False))
    if isinstance(err, errors.GatedRepoError):
        reason = "the hub repo is gated: accept its terms on its page, then log in (`hf auth login`) or set HF_TOKEN"
    elif isinstance(err, errors.RepositoryNotFoundError):
        reason = (
            f"no folder {repo_id} here, and no hub repo {repo_id} you can access (a private repo needs a token: "
            "`hf auth login` or HF_TOKEN)"
        )
    elif isinstance(err, errors.RevisionNotFoundError):
        reason = f"the hub repo has no revision {revision!r} (give a branch, tag or commit hash)"
    elif isinstance(err, getattr(errors, "IncompleteSnapshotError", ())):
        reason = "its cached snapshot is incomplete (an interrupted download); run once online to complete it"
    elif isinstance(err, errors.LocalEntryNotFoundError) and offline:
        flag = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
        command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        reason = (
            f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {flag} forbids downloading; run once "
            f"online, or `{command}` first"
        )
    elif isinstance(err, errors.LocalEntryNotFoundError):
        cause = err.__cause__ or err
        detail = next(iter(str(cause).strip().splitlines()), "")
        reason = f"the hub could not be reached and it is not cached ({type(cause).__name__}: {detail})"
    elif isinstance(err, errors.HfHubHTTPError):
        reason = f"the hub refused it ({first})"
    else:
        reason = f"{type(err).__name__}: {first}"
    at = f" at revision {revision!r}" if revision else ""
    return HubResolveError(f"{what} {repo_id!r}{at}: {reason}")
