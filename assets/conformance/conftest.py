"""Collected without the harness (e.g. `pytest assets/`), the conformance file is left out rather than failing to
import diffusers' `tests` package; run it with `assets/conformance/run.sh DIFFUSERS_GIT_DIR`. With the harness, any
import error of that package is reported as usual."""

import importlib.util


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # no `tests` package at all
        return False


collect_ignore = [] if _found("tests.pipelines.test_pipelines_common") else ["test_diffusers_mixin.py"]
