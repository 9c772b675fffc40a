"""The import graph of mmdiff/ (read with `ast`, lazy imports inside functions included): no circle, no import from a
lower layer up into a higher one, the library core apart from the lab, and inside eval the harness, the feature
spaces and each benchmark apart. The layers are docs/architecture.md's "Layers" section."""

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
    ["mmdiff.training", "mmdiff.eval", "mmdiff.bench", "mmdiff.demo"],
    ["mmdiff.serve", "mmdiff.commands", "mmdiff.cli"],
]
# the package's front door re-exports the pipeline classes that saved folders name: it sits above everything
FACADE = "mmdiff"
MAX_LINES = 500
# the library others build on (models, noise processes, conditioning, pipelines, training, data and the small root
# modules) never imports the lab: evaluation (harness, feature spaces, benchmarks), bench, serving, the demo, the CLI
CORE = [
    "mmdiff.models", "mmdiff.diffusion", "mmdiff.conditioning", "mmdiff.pipelines", "mmdiff.training", "mmdiff.data",
    "mmdiff.config", "mmdiff.checks", "mmdiff.hub", "mmdiff.paths",
]  # fmt: skip
LAB = ["mmdiff.eval", "mmdiff.bench", "mmdiff.serve", "mmdiff.demo", "mmdiff.commands", "mmdiff.cli"]
# inside eval: the feature spaces, the benchmarks' registry and each benchmark's folder; everything else is the harness
FEATURES, BENCHMARKS = "mmdiff.eval.features", "mmdiff.eval.benchmarks"
EVAL_FACADE = "mmdiff.eval"  # the package's front door re-exports the shapes benchmark's scorers


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
    raise AssertionError(
        f"{module} belongs to no layer: add it to LAYERS and to the Layers table of docs/architecture.md"
    )


def _under(module: str, prefixes: list[str] | str) -> bool:
    prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _eval_part(module: str) -> str:
    """ "features", "registry" (mmdiff.eval.benchmarks itself), "benchmark:NAME" or "harness"."""
    if _under(module, FEATURES):
        return "features"
    if module == BENCHMARKS:
        return "registry"
    if _under(module, BENCHMARKS):
        return "benchmark:" + module.split(".")[3]
    return "harness"


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


def test_the_core_does_not_import_the_lab():
    graph = _graph()
    assert all(_under(m, CORE + LAB) for m in graph if m != FACADE), [m for m in graph if not _under(m, CORE + LAB)]
    reaching = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if _under(module, CORE)
        for target in sorted(targets)
        if _under(target, LAB)
    ]
    assert not reaching, "\n".join(reaching)
    assert not any(_under(t, LAB) for t in graph[FACADE])


def test_eval_keeps_harness_feature_spaces_and_benchmarks_apart():
    # features: only each other; the harness: a benchmark only through the registry (`find_benchmark`); a
    # benchmark: the harness, the features, the registry and its own folder, never another benchmark
    allowed = {
        "features": {"features"},
        "registry": {"harness", "features"},  # the Benchmark interface names the harness's EvalRecords
        "harness": {"harness", "features", "registry"},
    }
    crossing = []
    for module, targets in sorted(_graph().items()):
        if not _under(module, EVAL_FACADE) or module == EVAL_FACADE:
            continue
        part = _eval_part(module)
        for target in sorted(t for t in targets if _under(t, EVAL_FACADE)):
            to = _eval_part(target)
            ok = {"harness", "features", "registry", part} if part.startswith("benchmark:") else allowed[part]
            if to not in ok and not (part == "registry" and to.startswith("benchmark:")):  # the registry's list
                crossing.append(f"{module} ({part}) imports {target} ({to})")
    assert not crossing, "\n".join(crossing)


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
    assert _eval_part("mmdiff.eval.benchmarks.shapes.detector") == "benchmark:shapes"
    assert _eval_part("mmdiff.eval.features.spaces") == "features" and _eval_part("mmdiff.eval.run") == "harness"
    assert "mmdiff.eval.benchmarks.shapes" in graph["mmdiff.eval.benchmarks"]  # the registry's lazy import


def test_files_stay_short():
    long = [
        f"{p.relative_to(PACKAGE.parent)}: {n}"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"files over {MAX_LINES} lines: {long}"
