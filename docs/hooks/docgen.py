"""The generated pages of the documentation site and the build's checks, as plain functions (the mkdocs hook
`mmdiff_docs.py` calls them at build time; a warning there fails `mkdocs build --strict`).

- `cli_markdown()`: every `mmdiff` subcommand's `--help`, from `mmdiff.cli.build_parser()`;
- `config_markdown()`: every config key with its type, default, allowed values and comment, from the dataclasses,
  `RANGES` and `validate` of `mmdiff/config.py`;
- `api_markdown(page)`: the API reference pages, one `::: target` block per public package or module (`API_PAGES`);
- `undocumented(targets)`: the public classes and functions those pages show that have no docstring;
- `option_problems(text)`: `mmdiff CMD --option` examples in a page whose command or option the parsers do not know.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELP_COLUMNS = "100"  # argparse wraps at $COLUMNS: fixed, so the page does not depend on the terminal


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """`{"generate": parser, "data shapes": parser, ...}`: every leaf command of `mmdiff`, in `--help` order."""
    from mmdiff.cli import build_parser

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    leaves: dict[str, argparse.ArgumentParser] = {}
    for name, parser in children(build_parser()).items():
        nested = children(parser)
        if nested:
            leaves[name] = parser
            leaves.update({f"{name} {sub}": child for sub, child in nested.items()})
        else:
            leaves[name] = parser
    return leaves


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--option` a parser accepts."""
    return {s for action in parser._actions for s in action.option_strings}


def command_summaries() -> dict[str, str]:
    """The one-line help each subcommand shows in `mmdiff --help`."""
    from mmdiff.cli import build_parser

    summaries: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    name = f"{prefix}{choice.dest}"
                    summaries[name] = choice.help or ""
                    walk(action.choices[choice.dest], f"{name} ")

    walk(build_parser(), "")
    return summaries


def _help_text(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def anchor(command: str) -> str:
    """The page anchor of a command's section (`data shapes` -> `mmdiff-data-shapes`)."""
    return "mmdiff-" + command.replace(" ", "-")


def cli_markdown() -> str:
    """The command-line reference page: `mmdiff --help` and each subcommand's `--help`, verbatim."""
    from mmdiff.cli import build_parser

    summaries = command_summaries()
    parsers = subcommand_parsers()
    lines = [
        "# Command-line reference",
        "",
        "Generated when the site is built, from the parsers of `mmdiff.cli` (`docs/hooks/docgen.py`): each",
        "section is exactly what `mmdiff COMMAND --help` prints, so this page cannot disagree with the command line.",
        "How to use the commands, with examples, is on [Command line](../usage/command-line.md).",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    for name in parsers:
        summary = summaries.get(name, "").replace("|", "\\|")
        lines.append(f"| [`mmdiff {name}`](#{anchor(name)}) | {summary} |")
    lines += ["", "## `mmdiff`", "", "```text", _help_text(build_parser()), "```", ""]
    for name, parser in parsers.items():
        lines += [f"## `mmdiff {name}` {{ #{anchor(name)} }}", ""]
        if summaries.get(name):
            lines += [summaries[name][0].upper() + summaries[name][1:] + ".", ""]
        lines += ["```text", _help_text(parser), "```", ""]
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a config dataclass: its trailing comment, after the comment lines above it."""
    source_lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse("".join(source_lines))
    body = tree.body[0].body
    comments: dict[str, str] = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        row = node.lineno - 1
        text_above: list[str] = []
        above = row - 1
        while above >= 0 and source_lines[above].strip().startswith("#"):
            text_above.insert(0, source_lines[above].strip().lstrip("#").strip())
            above -= 1
        line = source_lines[node.end_lineno - 1]
        trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        comments[node.target.id] = " ".join(part for part in (" ".join(text_above), trailing) if part)
    return comments


def _choices(key: str) -> tuple | None:
    """The allowed values of a choice key, read from the error `mmdiff.config.validate` gives for a bad one."""
    from mmdiff import config

    cfg = config.Config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, "\x00not-a-choice")
    try:
        config.validate(cfg)
    except config.ConfigError as err:
        found = re.search(rf"^{re.escape(key)}=.* is not one of (\(.*\))$", str(err))
        if found:
            return ast.literal_eval(found.group(1))
    except Exception:
        return None
    return None


def _shown(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str) and value == "???":
        return "required"
    return f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`'


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "")


def config_markdown() -> str:
    """The config-key page: one table per section of `mmdiff.config.Config`."""
    from mmdiff import config

    lines = [
        "# Config keys",
        "",
        "Generated when the site is built from the dataclasses of `mmdiff/config.py` (`docs/hooks/docgen.py`):",
        "every key `mmdiff train` accepts, with its type, its default, the values or range it must lie in (checked",
        "before anything starts) and the comment beside it in the code. Set them in a YAML file or as `section.key=value`",
        "overrides on the command line; how configs work is on [Configs](../training/configs.md).",
        "",
        "Ranges are intervals: `[` includes the bound, `(` excludes it; `inf` means unbounded.",
        "",
    ]
    for section in dataclasses.fields(config.Config):
        schema = section.default_factory
        comments = _field_comments(schema)
        instance = schema()
        lines += [
            f"## `{section.name}`",
            "",
            f"`{schema.__name__}`"
            + (
                f": {inspect.getdoc(schema)}"
                if schema.__doc__ and not schema.__doc__.startswith(schema.__name__ + "(")
                else ""
            ),
            "",
            "| key | type | default | allowed | what |",
            "| --- | --- | --- | --- | --- |",
        ]
        for item in dataclasses.fields(schema):
            key = f"{section.name}.{item.name}"
            allowed = config.RANGES.get(key)
            if allowed:
                allowed = f"`{allowed}`"
            else:
                choices = _choices(key) if isinstance(getattr(instance, item.name), str) else None
                allowed = " · ".join(f"`{c}`" for c in choices) if choices else ""
            what = comments.get(item.name, "").replace("|", "\\|")
            type_name = _type_name(item.type).replace("|", "\\|")
            default = _shown(getattr(instance, item.name)).replace("|", "\\|")
            lines.append(f"| `{key}` | `{type_name}` | {default} | {allowed} | {what} |")
        lines.append("")
    return "\n".join(lines)


# The API reference: page -> (title, what it holds, the packages or modules it renders). A package with `__all__` is
# rendered by its public names, so a class moved between its modules needs no edit here; packages without `__all__`
# (models, diffusion, training) are rendered by their public modules.
API_PAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mmdiff": (
        "mmdiff",
        "The classes a saved pipeline folder names in its `model_index.json`, exported from the package itself.",
        ("mmdiff",),
    ),
    "pipelines": (
        "mmdiff.pipelines",
        "The diffusers-style pipelines, their outputs, the loader's checks, schedulers by name and the generation modes"
        " built on the pipelines. Usage: [Pipelines and generation modes](../../usage/pipelines.md).",
        ("mmdiff.pipelines",),
    ),
    "conditioning": (
        "mmdiff.conditioning",
        "Captions to context, a call's guidance validated once, and the one guided denoiser every sampler goes through."
        " Design: [Architecture](../../architecture.md#decisions), decisions 6 and 7.",
        ("mmdiff.conditioning",),
    ),
    "diffusion": (
        "mmdiff.diffusion",
        "The noise processes as plain functions on top of diffusers' schedulers, the masked-diffusion scheduler and the"
        " classifier-free guidance rule (decisions 3 to 6 of [Architecture](../../architecture.md#decisions)).",
        (
            "mmdiff.diffusion.process",
            "mmdiff.diffusion.gaussian",
            "mmdiff.diffusion.flow",
            "mmdiff.diffusion.masked",
            "mmdiff.diffusion.guidance",
        ),
    ),
    "models": (
        "mmdiff.models",
        "The shared transformer, the VAE and its latent scaling, and the frozen pretrained text encoders (diffusers"
        " models: decision 2 of [Architecture](../../architecture.md#decisions)).",
        ("mmdiff.models.transformer", "mmdiff.models.vae", "mmdiff.models.text_encoders"),
    ),
    "data": (
        "mmdiff.data",
        "Shards, images, caption policies, tokenizers, the training stream and the shapes dataset. Usage:"
        " [Data, tokenizers, VAE, text encoders](../../training/data.md).",
        ("mmdiff.data",),
    ),
    "training": (
        "mmdiff.training",
        "The training loop: `train(cfg)` and the `Trainer` it builds. Usage: [Training a model](../../training/index.md).",
        ("mmdiff.training.trainer",),
    ),
    "eval": (
        "mmdiff.eval",
        "Evaluation and sweeps on any data, the dataset benchmarks and the eval encoder. Usage:"
        " [Evaluation and sweeps](../../evaluation.md).",
        ("mmdiff.eval", "mmdiff.eval.benchmarks", "mmdiff.eval.features.eval_encoder"),
    ),
    "bench": (
        "mmdiff.bench",
        "`mmdiff bench`: mmdiff against diffusers' PixArt at matched size. Usage: [Performance](../../performance.md).",
        ("mmdiff.bench",),
    ),
}


def api_markdown(page: str) -> str:
    """One API reference page: its title, what it holds and a mkdocstrings block per target."""
    title, intro, targets = API_PAGES[page]
    lines = [f"# `{title}`", "", intro, ""]
    for target in targets:
        lines += (
            [f"::: {target}", ""]
            if len(targets) > 1
            else [f"::: {target}", "    options:", "      show_root_heading: false", ""]
        )
    return "\n".join(lines)


def _load_package():
    import griffe

    return griffe.load("mmdiff", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)


def undocumented(targets: tuple[str, ...] | None = None) -> list[str]:
    """The public classes and functions the API pages render (each target's public members, `__all__` where it has
    one) that have no docstring, and the targets without a module docstring, as `path (where)` strings."""
    package = _load_package()
    if targets is None:
        targets = tuple(t for _, _, page_targets in API_PAGES.values() for t in page_targets)
    problems = []
    for target in targets:
        module = package if target == "mmdiff" else package[target.removeprefix("mmdiff.")]
        if not module.docstring:
            problems.append(f"{target} (its module docstring)")
        for name, member in module.members.items():
            if not member.is_public:
                continue
            try:
                obj = member.final_target if member.is_alias else member
            except Exception:  # an alias to another library: documented there
                continue
            if (obj.is_class or obj.is_function) and not obj.docstring:
                problems.append(f"{target}.{name} (defined in {obj.path})")
    return problems


# `mmdiff CMD ... --option`, also as `-m mmdiff.cli CMD`; continuation lines are joined first
_COMMAND = re.compile(r"(?:(?<![\w.-])mmdiff|-m mmdiff\.cli)\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_CODE = re.compile(r"```([^\n]*)\n(.*?)```|`([^`\n]+)`", re.S)
_NOT_SHELL = ("python", "py", "yaml", "yml", "json", "toml")


def command_lines(text: str) -> list[str]:
    """Every `mmdiff ...` invocation in the shell code blocks and the code spans of a Markdown text, one string each."""
    found = []
    for language, block, span in _CODE.findall(text):
        if block and language.strip().lower() in _NOT_SHELL:
            continue
        code = (block or span).replace("\\\n", " ")
        for line in code.splitlines():
            line = re.sub(r"\s#\s.*$", "", line)  # a shell comment
            for segment in re.split(r"&&|;", line):
                match = _COMMAND.search(segment)
                if match and match.group(1) != "import":
                    found.append(segment[match.start() :])
    return found


def option_problems(text: str, parsers: dict[str, argparse.ArgumentParser] | None = None) -> list[str]:
    """The `mmdiff CMD --option` uses in a Markdown text whose command or option the command's parser lacks."""
    parsers = parsers if parsers is not None else subcommand_parsers()
    problems = []
    for line in command_lines(text):
        match = _COMMAND.match(line)
        first, second = match.group(1), match.group(2)
        command = f"{first} {second}" if f"{first} {second}" in parsers else first
        if command not in parsers:
            problems.append(f"`mmdiff {first}`: no such command (in `{line.strip()}`)")
            continue
        known = option_strings(parsers[command]) | {"--help"}
        for option in _OPTION.findall(line[match.end() :]):
            if option not in known:
                problems.append(f"`mmdiff {command}` has no option {option} (in `{line.strip()}`)")
    return problems
