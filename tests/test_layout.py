"""The package's import graph: no new import cycle (function-level imports count too).

Subpackages count module by module (``finetuning._loop``). Two cycles are left from version
0.1 (issue 16): weights and the backbone registry import each other, and extraction and its
Ray engine, most of it through imports inside functions. They may only shrink: a module that
leaves them is removed from KNOWN_TANGLE here, and a new cycle anywhere fails.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cnncodes"
KNOWN_TANGLE = {"_backbones", "_custom"}


def _module_name(path: Path) -> str:
    """``_model`` for cnncodes/_model.py, ``finetuning._loop`` in a subpackage, ``finetuning`` for its __init__."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(name: str, is_package: bool, node: ast.ImportFrom) -> set[str]:
    """The package modules a relative ``from ... import`` names (a module's parent packages count too)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    if node.module:
        target = base + node.module.split(".")
        found = {".".join(target[:k]) for k in range(1, len(target) + 1)}
        return found | {".".join(target + [a.name]) for a in node.names}  # `from .pkg import module`
    return {".".join(base + [a.name]) for a in node.names}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions (subpackages too)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_data" not in p.relative_to(PACKAGE).parts[:-1]}
    paths.pop("", None)  # the package's own __init__: re-exports only, imported lazily
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                deps |= _imported(name, path.name == "__init__.py", node)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def test_import_graph_sees_subpackages():
    """Check that modules of a subpackage and their relative imports, both ways, are in the graph."""
    graph = import_graph()
    assert "finetuning._checkpoint" in graph["_weights"] and "finetuning" in graph["_weights"]
    assert {"_io", "_errors"} <= graph["finetuning._checkpoint"]
    assert "finetuning._network" in graph["finetuning._loop"]


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """Check the finder on a small graph: a -> b -> c -> a is one cycle, d alone is none."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [{"a", "b", "c"}]


def test_no_new_import_cycle():
    """Check that the only import cycle is the known tangle, and that it has not grown."""
    found = cycles(import_graph())
    new = [sorted(c) for c in found if not c <= KNOWN_TANGLE]
    assert new == [], f"new import cycle(s): {new}: make the lower module not import the higher one"
    left = set().union(*found) if found else set()
    assert left == KNOWN_TANGLE, (f"the tangle shrank to {sorted(left)}: remove "
                                  f"{sorted(KNOWN_TANGLE - left)} from KNOWN_TANGLE")


def test_reading_the_checkpoint_format_loads_no_training_code():
    """Check that weight loading's one import from fine-tuning, the checkpoint format, brings in
    neither the training loop, the network surgery nor the model files (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, cnncodes._weights, cnncodes.finetuning._checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('cnncodes.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "cnncodes.finetuning._checkpoint" in loaded
    for module in ("cnncodes.finetuning._api", "cnncodes.finetuning._loop", "cnncodes.finetuning._network",
                   "cnncodes.finetuning._predict", "cnncodes._model"):
        assert f"'{module}'" not in loaded, f"{module} is imported with the checkpoint format"
