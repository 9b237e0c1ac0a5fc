"""The layers, as the import graph shows them: model -> inference -> ros -> (launch); tools on top.

Each layer is usable without the ones above it, so a layer may import only
from itself and the layers below; ROS appears only in ros/ and tools/; and no
module imports itself back through others (type-only imports count too).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clustvit_ros"
LAYERS = ["model", "inference", "ros", "tools"]  # each may use those before it
# (ament_index_python is not among them: inference/packaged.py asks it, when present, where the
# package's share folder is, and does without it.)
ROS_MODULES = ("rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "rcl_interfaces", "lifecycle_msgs",
               "launch", "launch_ros")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(our modules, third-party top-level packages) that ``path`` imports anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name in known else theirs).add(alias.name if alias.name in known
                                                               else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "clustvit_ros":
                theirs.add(target.split(".")[0])
                continue
            for alias in node.names:  # "from .reduction import tome" imports the module reduction.tome
                candidate = f"{target}.{alias.name}"
                ours.add(candidate if candidate in known else target)
    return ours, theirs


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = _imports(name, path, known)
        edges[name].discard(name)
    return edges, external


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_every_module_lives_in_a_layer():
    stray = [name for name in _modules() if name != "clustvit_ros" and _layer(name) < 0]
    assert stray == [], stray


def test_layers_import_only_downwards():
    edges, _ = _graph()
    upward = [(a, b) for a, targets in edges.items() for b in targets if _layer(b) > _layer(a) >= 0]
    assert upward == [], upward


def test_ros_only_in_the_ros_and_tools_layers():
    _, external = _graph()
    leaks = [(name, sorted(set(ext) & set(ROS_MODULES))) for name, ext in external.items()
             if _layer(name) < LAYERS.index("ros") and set(ext) & set(ROS_MODULES)]
    assert leaks == [], leaks


def test_no_import_cycles():
    edges, _ = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], cycles


def _sizes(kind) -> list[tuple[int, str]]:
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                found.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(found, reverse=True)


def test_classes_and_functions_stay_small():
    """Sizes a reader can hold in mind: classes up to ~200 lines, functions up to ~60 (docstrings included)."""
    classes = [entry for entry in _sizes(ast.ClassDef) if entry[0] > 200]
    functions = [entry for entry in _sizes((ast.FunctionDef, ast.AsyncFunctionDef)) if entry[0] > 60]
    assert classes == [] and functions == [], (classes, functions)
