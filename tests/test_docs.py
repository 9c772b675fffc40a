"""The README against the repository, without building the site (`mkdocs build --strict` checks the site's pages):
its set-up commands are the ones CI runs, and every relative link of it points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# [text](target) and ![alt](target), without a #fragment
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def _setup_block() -> str:
    section = README.split("## Set up", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def test_readme_test_command_is_what_ci_runs():
    install, test = re.search(r'^(pip install -e "\.\[dev\]") && (.+)$', _setup_block(), re.M).groups()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines, f"README's test command {test!r} is not a line of .ci/run"
    assert any('pip install -q -e ".[dev]"' in line for line in ci_lines), f"CI does not install as {install!r}"


def test_readme_relative_links_exist():
    targets = [t for t in LINK.findall(README) if "://" not in t and not t.startswith("mailto:")]
    assert targets, "no relative links found"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
