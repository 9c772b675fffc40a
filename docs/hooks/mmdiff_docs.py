"""The mkdocs hook of the documentation site (mkdocs.yml `hooks:`): generated pages, copied files and checks.

Generated at build time, so they cannot drift from the code:

- `reference/cli.md`: every `mmdiff` command's `--help` (`docgen.cli_markdown`);
- `reference/config.md`: every config key (`docgen.config_markdown`);
- `reference/api/*.md`: the API reference (`docgen.api_markdown`, rendered by mkdocstrings);
- `changelog.md`: the repository's CHANGELOG.md.

Copied: every repository file a page links to by a repository-relative path (`../assets/bench_cpu.json` from
`docs/results/`, `../scripts/make_stripes.py`), so the pages link the record files where they lie and strict mode
still finds every target. Checked (each problem is a warning, so `mkdocs build --strict` fails on it): a public class
or function of the API reference without a docstring, and an `mmdiff CMD --option` in a page or in README.md whose
command or option `mmdiff CMD --help` does not have.
"""

from __future__ import annotations

import logging
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docgen  # noqa: E402

log = logging.getLogger("mkdocs.hooks.mmdiff_docs")
ROOT = docgen.ROOT
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
_parsers = None


def _parsers_once():
    global _parsers
    if _parsers is None:
        _parsers = docgen.subcommand_parsers()
    return _parsers


def _repository_links(files: Files, docs_dir: Path) -> set[str]:
    """The docs-relative paths of link targets that are not documentation files but exist in the repository."""
    wanted = set()
    for page in files.documentation_pages():
        text = page.content_string
        folder = posixpath.dirname(page.src_uri)
        for target in _LINK.findall(text):
            if "://" in target or target.startswith(("mailto:", "/")) or target.endswith(".md"):
                continue
            path = posixpath.normpath(posixpath.join(folder, target))
            if path.startswith("..") or files.get_file_from_path(path) is not None:
                continue
            if (ROOT / path).is_file() and not (docs_dir / path).exists():
                wanted.add(path)
    return wanted


def on_files(files: Files, config) -> Files:
    generated = {
        "reference/cli.md": docgen.cli_markdown(),
        "reference/config.md": docgen.config_markdown(),
        "changelog.md": (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"),
    }
    generated.update({f"reference/api/{page}.md": docgen.api_markdown(page) for page in docgen.API_PAGES})
    for src_uri, content in generated.items():
        files.append(File.generated(config, src_uri, content=content))
    for path in sorted(_repository_links(files, Path(config["docs_dir"]))):
        files.append(File.generated(config, path, abs_src_path=str(ROOT / path)))

    for problem in docgen.undocumented():
        log.warning("undocumented public symbol: %s", problem)
    for problem in docgen.option_problems((ROOT / "README.md").read_text(encoding="utf-8"), _parsers_once()):
        log.warning("README.md: %s", problem)
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if not page.file.src_uri.startswith("reference/"):
        for problem in docgen.option_problems(markdown, _parsers_once()):
            log.warning("%s: %s", page.file.src_uri, problem)
    return markdown
