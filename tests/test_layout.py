"""The package's layout: data flows one way through its modules (docs/DESIGN.md "Modules").

Parses every module's imports (top level and inside functions) and fails on an import cycle and on
any import against the flow; also that method names are compared nowhere but in `methods.py` (and
config validation), and that imports inside functions are only of heavy optional dependencies.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "colearn_dist"

# Rank in the flow: a module imports only modules of a lower rank (or the same rank, without cycles).
# Rank 0 holds the utilities every stage may use; they import nothing of the flow.
LAYERS: list[tuple[str, ...]] = [
    ("config", "metrics", "distributed", "launch", "logs", "checkpoint", "runlock", "report", "averaging", "signals"),
    ("archive",),
    ("synthetic", "importers"),
    ("manifest",),
    ("batch", "context"),
    ("shards", "loader"),
    ("presto",),
    ("norm", "encoders", "tempcnn_bank", "model", "objective"),
    ("methods",),
    ("runs",),
    ("scoring", "stac"),
    ("engine", "evaluate", "export"),
    ("sweep",),
    ("crossval",),
    ("slurm",),
    ("cli",),
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}
# Inside a function only these may be imported (heavy or optional; importers pull h5py/tifffile).
LAZY_OK = (
    "deepspeed", "submitit", "matplotlib", "h5py", "tifffile", "pyarrow",
    "google.protobuf", "tensorboard", "torch.utils.tensorboard", "torch._inductor",
    "onnx", "onnxscript", "onnxruntime", "xarray",  # optional extras [onnx], [xarray]
)  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]  # importers/* count as one module, `importers`


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported package module, inside a function?, line) for each import of colearn_dist itself;
    other imports are returned with their full dotted name prefixed by '!'."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool, int]] = []
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if sub is not node:
                    in_function.add(id(sub))
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - (node.level - 1)])
                target = ".".join(base + ([node.module] if node.module else []))
                if target:
                    found.append((target.split(".")[0], lazy, node.lineno))
                else:  # `from . import x`
                    found += [(alias.name, lazy, node.lineno) for alias in node.names]
            elif node.module and node.module.startswith("colearn_dist"):
                parts = node.module.split(".")
                found.append((parts[1] if len(parts) > 1 else node.names[0].name, lazy, node.lineno))
            elif node.module:
                found.append(("!" + node.module, lazy, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("colearn_dist."):
                    found.append((alias.name.split(".")[1], lazy, node.lineno))
                else:
                    found.append(("!" + alias.name, lazy, node.lineno))
    return found


def _graph() -> dict[str, dict[str, str]]:
    """module -> imported module -> where ("file:line")."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        module = _module_name(path)
        edges = graph.setdefault(module, {})
        for target, _, line in _imports(path):
            if not target.startswith("!") and target != module:
                edges.setdefault(target, f"{path.relative_to(PACKAGE.parent)}:{line}")
    return graph


def test_every_module_has_a_place_in_the_flow():
    assert sorted(set(_graph()) - set(RANK)) == []


def test_imports_follow_the_flow():
    bad = [
        f"{where}: {module} (rank {RANK[module]}) imports {target} (rank {RANK[target]})"
        for module, edges in _graph().items()
        for target, where in edges.items()
        if RANK[target] > RANK[module]
    ]
    assert bad == []


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checks_catch_a_backward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a fake package where the engine imports the CLI and back."""
    fake = tmp_path / "colearn_dist"
    fake.mkdir()
    (fake / "engine.py").write_text("from .cli import main\n")
    (fake / "cli.py").write_text("from . import engine\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = _graph()
    assert graph == {"cli": {"engine": "colearn_dist/cli.py:1"}, "engine": {"cli": "colearn_dist/engine.py:1"}}
    with pytest.raises(AssertionError):
        test_imports_follow_the_flow()
    with pytest.raises(AssertionError):
        test_no_import_cycles()


def test_imports_inside_functions_are_only_heavy_optional_dependencies():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for target, lazy, line in _imports(path):
            if not lazy:
                continue
            name = target.removeprefix("!")
            if target.startswith("!") and name.startswith(LAZY_OK):
                continue
            if not target.startswith("!") and name == "importers":
                continue
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    assert bad == []


def test_method_names_are_compared_only_in_the_registry():
    pattern = re.compile(r"method\s*(==|!=|in \(|not in \()")
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{k}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("methods.py", "config.py")
        for k, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert bad == []
