"""The package's layers point one way and its modules import no cycle (function-level imports count).

Allowed direction (a module may import its own layer and the layers listed before it)::

    base  →  io  →  metrics  →  data  →  backbones  →  transfer  →  evaluation  →  run
          →  train | inference  (siblings: neither imports the other)  →  hospital  →  cli

``base`` is what every layer may use: errors, options, utilities, configuration. Segmentation is a
vertical slice: each of its modules sits in the layer of what it does.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"medtransfer": ROOT / "medtransfer", "medtransfer.cli": ROOT / "cli"}

LAYERS = [  # (rank, name, module prefixes); the longest matching prefix decides
    (0, "base", ["medtransfer._version", "medtransfer._suggest", "medtransfer.errors", "medtransfer.options",
                 "medtransfer.utils", "medtransfer.config", "medtransfer.segmentation.config"]),
    (1, "io", ["medtransfer.io", "medtransfer.segmentation.writers"]),
    (2, "metrics", ["medtransfer.metrics"]),
    (3, "data", ["medtransfer.data", "medtransfer.segmentation.data"]),
    (4, "backbones", ["medtransfer.backbones"]),
    (5, "transfer", ["medtransfer.transfer", "medtransfer.segmentation.model"]),
    (6, "evaluation", ["medtransfer.evaluation", "medtransfer.segmentation.sliding"]),
    (7, "run", ["medtransfer.run"]),
    (8, "train", ["medtransfer.train", "medtransfer.segmentation.train"]),
    (8, "inference", ["medtransfer.inference", "medtransfer.segmentation.inference"]),
    (9, "hospital", ["medtransfer.hospital"]),
    (10, "cli", ["medtransfer.cli", "medtransfer.__main__"]),
]
TOP = {"medtransfer", "medtransfer.segmentation"}
"""Package entry points that re-export lazily (``__getattr__``): above every layer, imported by none."""


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every medtransfer module imported anywhere in the file (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] == "medtransfer")
    return out


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def layer_of(module: str) -> tuple[int, str]:
    best = max(((len(p), rank, name) for rank, name, prefixes in LAYERS for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[1], best[2]


def test_every_module_has_a_layer():
    for module in MODULES:
        if module not in TOP:
            layer_of(module)


def test_imports_point_down_the_layers():
    wrong = []
    for module, imported in GRAPH.items():
        if module in TOP:
            continue
        rank, name = layer_of(module)
        for target in imported:
            if target in TOP:
                wrong.append(f"{module} imports the package entry point {target}")
                continue
            t_rank, t_name = layer_of(target)
            if t_rank > rank or (t_rank == rank and t_name != name):
                wrong.append(f"{module} ({name}) imports {target} ({t_name})")
    assert not wrong, "imports against the layer direction:\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checks_themselves_catch_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("medtransfer.io.dicom") < layer_of("medtransfer.data.samples")
    assert layer_of("medtransfer.segmentation.train")[1] == "train"
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("medtransfer_other.module")
