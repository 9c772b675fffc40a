"""The import graph of mmdiff/ (read with `ast`, lazy imports inside functions included): no circle, and no import
from a lower layer up into a higher one. The layers are the README's "Architecture" section."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmdiff"

# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ["mmdiff.paths", "mmdiff.hub", "mmdiff.checks"],
    ["mmdiff.models", "mmdiff.diffusion"],
    ["mmdiff.data"],
    ["mmdiff.config"],
    ["mmdiff.conditioning"],
    ["mmdiff.pipelines"],
    ["mmdiff.training", "mmdiff.eval", "mmdiff.bench", "mmdiff.demo", "mmdiff.sampling"],
    ["mmdiff.serve", "mmdiff.commands", "mmdiff.cli"],
]
# the package's front door re-exports the pipeline classes that saved folders name: it sits above everything
FACADE = "mmdiff"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every mmdiff module `path` imports, at any depth of the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name == "mmdiff" or name.startswith("mmdiff.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in _imports(path, module):
            while name not in files and "." in name:  # `from pkg import function` -> pkg
                name = name.rsplit(".", 1)[0]
            if name in files and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to the README's Architecture section")


def _subpackage_init(module: str, target: str) -> bool:
    """A package's __init__ re-exporting its own modules, or a module importing its own package's __init__."""
    return target.startswith(module + ".") or module.startswith(target + ".")


def test_no_import_goes_up_a_layer():
    graph = _graph()
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in sorted(graph.items())
        if module != FACADE
        for target in sorted(targets)
        if target != FACADE and _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)
    assert not any(FACADE in targets for module, targets in graph.items() if module != FACADE)


def test_no_import_circle():
    graph = {m: {t for t in ts if t != FACADE and not _subpackage_init(m, t)} for m, ts in _graph().items()}
    done, path, circles = set(), [], []

    def visit(module: str) -> None:
        if module in path:
            circles.append(" -> ".join(path[path.index(module) :] + [module]))
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not circles, "\n".join(circles)


def test_the_graph_reader_sees_imports():
    # the reader itself: a known edge of each kind (module level, relative, lazy inside a function) is found
    graph = _graph()
    assert "mmdiff.models.transformer" in graph["mmdiff.conditioning.guided"]  # relative, module level
    assert "mmdiff.pipelines.text_to_image" in graph["mmdiff.pipelines.factory"]
    assert any(t.startswith("mmdiff.training") for t in graph["mmdiff.commands.train"])  # lazy, in a function


def test_files_stay_short():
    long = [
        f"{p.relative_to(PACKAGE.parent)}: {n}"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"files over {MAX_LINES} lines: {long}"
