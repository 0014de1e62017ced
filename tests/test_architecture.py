"""The package's import arrows: no cycles, no private names across modules, methods apart, parts layered.

`violations(root)` parses every module of the package at `root` with `ast` and collects what each one
imports: top-level and function-level imports, `importlib.import_module("...")` string literals and
`"module:attr"` registry strings. Imports under `if TYPE_CHECKING:` never run and are not counted.
A package's `__init__` is a module of its own: importing `pkg.a.b` counts as an import of `pkg.a.b`,
not of `pkg.a`'s `__init__` (whose names are reached only by importing `pkg.a` itself).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "vlm_jax"

# (importing part, imported part): arrows that point up, against DESIGN.md's layering.
FORBIDDEN_ARROWS = {
    ("models", "train"), ("models", "methods"), ("train", "methods"), ("data", "models"),
    ("memory", "methods"), ("evaluate", "methods"), ("weights", "train"),
}
# Modules of methods/ that are not methods: the registry and the shared runner.
NOT_METHODS = ("__init__", "runner")
# The plain CLIP method, which every method may build on.
SHARED_METHOD = "clip"


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (the longest known module prefix)
    name: str | None  # the attribute taken from it, if any
    line: int
    path: str  # the importing file, relative to the package's parent


def _module_names(root: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _known_prefix(dotted: str, modules: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    relative_path = str(path.relative_to(modules[package].parent.parent))
    registry = re.compile(rf"^{re.escape(package)}(\.\w+)*:\w+$")
    found = []

    def add(dotted: str, name: str | None, line: int) -> None:
        target = _known_prefix(dotted, modules)
        if target is not None:
            found.append(Import(module, target, name, line, relative_path))

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    add(submodule, None, node.lineno)
                else:
                    add(base, alias.name, node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (called == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                add(node.args[0].value, None, node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and registry.match(node.value):
            target, attr = node.value.split(":")
            add(target, attr, node.lineno)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _method(module: str) -> str | None:
    """The method a module belongs to (`pkg.methods.<name>`), None outside the methods."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "methods" or parts[2] in NOT_METHODS:
        return None
    return ".".join(parts[:3])


def _cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """(one cycle, the component's modules) per strongly connected component of size > 1; a cycle is
    the shortest path from the component's first module back to itself."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        start = min(component)
        # Shortest path from start back to itself inside the component (breadth first).
        previous, frontier, closing = {start: None}, [start], None
        while frontier and closing is None:
            next_frontier = []
            for node in frontier:
                for successor in sorted(edges.get(node, ())):
                    if successor == start:
                        closing = node
                        break
                    if successor in component and successor not in previous:
                        previous[successor] = node
                        next_frontier.append(successor)
                if closing is not None:
                    break
            frontier = next_frontier
        path, node = [], closing
        while node is not None:
            path.append(node)
            node = previous[node]
        cycles.append(([*reversed(path), start], component))
    return cycles


def violations(root: Path) -> list[str]:
    """Every broken rule of the package whose directory is `root`, one line each (empty: none)."""
    root = Path(root)
    package = root.name
    modules = _module_names(root)
    imports = [found for module, path in modules.items() for found in _imports(module, path, modules, package)]
    problems = []
    edges: dict[str, set[str]] = {}
    for found in imports:
        where = f"{found.path}:{found.line}"
        if found.target != found.source:
            edges.setdefault(found.source, set()).add(found.target)
        if (found.name and found.name.startswith("_") and not found.name.startswith("__")
                and found.target != found.source):
            problems.append(f"{where}: private name {found.name} imported across modules "
                            f"({found.target}:{found.name})")
        arrow = (_part(found.source), _part(found.target))
        if arrow in FORBIDDEN_ARROWS:
            problems.append(f"{where}: forbidden arrow {arrow[0]} -> {arrow[1]} "
                            f"({found.source} imports {found.target})")
        source_method, target_method = _method(found.source), _method(found.target)
        if (source_method and target_method and source_method != target_method
                and target_method != f"{package}.methods.{SHARED_METHOD}"):
            problems.append(f"{where}: method {source_method} imports another method ({found.target}); "
                            f"share code through {package}.methods.{SHARED_METHOD} or a lower part")
    cycles = [f"import cycle: {' -> '.join(cycle)} (strongly connected: {', '.join(sorted(set(members)))})"
              for cycle, members in _cycles(edges)]

    def position(problem: str) -> tuple[str, int, str]:
        path, line, rest = problem.split(":", 2)
        return path, int(line), rest

    return sorted(set(problems), key=position) + cycles


def test_the_package_breaks_no_architecture_rule():
    assert violations(PACKAGE_ROOT) == []


def _write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for relative, text in {"__init__.py": "", **files}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(package).parents:
            if not (package / parent / "__init__.py").exists():
                (package / parent / "__init__.py").write_text("")
        path.write_text(text)
    return package


CLEAN = {
    "models/layers.py": "import jax\n",
    "models/clip.py": "from pkg.models.layers import Dense\nfrom pkg.models import layers\n",
    "train/trainer.py": "from pkg.models.clip import CLIP\n",
    "methods/__init__.py": 'METHODS = {"reco": "pkg.methods.reco:RecoMethod"}\n',
    "methods/clip.py": "from pkg.train import trainer\n",
    "methods/reco.py": "from pkg.methods.clip import loss\n",
    "methods/runner.py": "from pkg.methods import reco, clip\n",
    "main.py": 'TASKS = {"train": "pkg.methods:train_task"}\n',
    "weights/heads.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                         "    from pkg.train.trainer import Method\n"),
}


def test_a_clean_package_has_no_violations(tmp_path):
    assert violations(_write_package(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("files, expected", [
    pytest.param({"models/a.py": "import pkg.models.b\n",
                  "models/b.py": "def f():\n    from pkg.models import a\n"},
                 "import cycle: pkg.models.a -> pkg.models.b -> pkg.models.a", id="lazy_import_cycle"),
    pytest.param({"models/a.py": "import importlib\nimportlib.import_module('pkg.data.c')\n",
                  "data/c.py": "from ..models import a\n"},
                 "import cycle: pkg.data.c -> pkg.models.a -> pkg.data.c", id="import_module_cycle"),
    pytest.param({"evaluate/a.py": "from pkg.models.layers import _helper\n"},
                 "private name _helper imported across modules", id="private_name"),
    pytest.param({"methods/rar.py": "from pkg.methods import reco\n"},
                 "method pkg.methods.rar imports another method (pkg.methods.reco)", id="method_imports_method"),
    pytest.param({"methods/clip.py": "def f():\n    import pkg.methods.reco\n"},
                 "method pkg.methods.clip imports another method", id="shared_method_imports_method"),
    pytest.param({"models/x.py": "from pkg.train import trainer\n"}, "forbidden arrow models -> train",
                 id="models_to_train"),
    pytest.param({"models/x.py": "import importlib\nimportlib.import_module('pkg.methods.reco')\n"},
                 "forbidden arrow models -> methods", id="models_to_methods"),
    pytest.param({"train/x.py": 'METHODS = {"reco": "pkg.methods.reco:RecoMethod"}\n'},
                 "forbidden arrow train -> methods", id="train_to_methods_by_registry_string"),
    pytest.param({"data/x.py": "def f():\n    from pkg.models.clip import CLIP\n"},
                 "forbidden arrow data -> models", id="data_to_models"),
    pytest.param({"memory/x.py": "import pkg.methods.clip\n"}, "forbidden arrow memory -> methods",
                 id="memory_to_methods"),
    pytest.param({"evaluate/x.py": "from pkg.methods import get_method\n"},
                 "forbidden arrow evaluate -> methods", id="evaluate_to_methods"),
    pytest.param({"weights/x.py": "from pkg.train.sharding import path_to_name\n"},
                 "forbidden arrow weights -> train", id="weights_to_train"),
])
def test_each_kind_of_violation_is_reported(tmp_path, files, expected):
    found = violations(_write_package(tmp_path, {**CLEAN, **files}))
    assert len(found) >= 1 and any(expected in problem for problem in found), found
    assert all(problem.startswith(("pkg/", "import cycle")) for problem in found), found
