"""The package's layout: subpackages by responsibility, each saying what it holds, and its
import graph: no new import cycle (function-level imports count too).

Subpackages count module by module (``_finetune._loop``), relative and absolute imports alike.
The twelve-module tangle of version 0.1 is gone (issue 16); any cycle now fails.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cnncodes"
KNOWN_TANGLE: set = set()  # none left (issue 16); keep it so
# The top level: what every layer may import, and the names files written before 0.2 record.
FOUNDATION = {"_errors", "_choices", "_spec", "_io", "_optional", "_cache", "_outputs", "_stats"}
SHIMS = {"_knn", "_fit", "_transformer"}


def _module_name(path: Path) -> str:
    """``_io`` for cnncodes/_io.py, ``_store.store`` for cnncodes/_store/store.py, ``_store`` for its __init__."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(name: str, is_package: bool, node: ast.AST) -> set[str]:
    """The package modules an import names: relative (``from ..x import``), absolute
    (``from cnncodes._store.store import``, ``import cnncodes._io``); a module's parent
    packages count too (importing it runs them)."""
    if isinstance(node, ast.Import):
        targets = [a.name.split(".")[1:] for a in node.names if a.name.startswith("cnncodes.")]
        return {".".join(t[:k]) for t in targets for k in range(1, len(t) + 1)}
    if node.level == 0:
        if not (node.module or "").startswith("cnncodes.") and node.module != "cnncodes":
            return set()
        base, module = [], node.module.split(".")[1:]
    else:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base, module = package[: len(package) - node.level + 1], (node.module.split(".") if node.module else [])
    target = base + module
    found = {".".join(target[:k]) for k in range(1, len(target) + 1)}
    return found | {".".join(target + [a.name]) for a in node.names}  # `from .pkg import module`


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions (subpackages too)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_data" not in p.relative_to(PACKAGE).parts[:-1]}
    paths.pop("", None)  # the package's own __init__: re-exports only, imported lazily
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.module != "__future__"):
                deps |= _imported(name, path.name == "__init__.py", node)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def test_import_graph_sees_subpackages():
    """Check that modules of a subpackage and their imports, relative and absolute, both ways,
    are in the graph."""
    graph = import_graph()
    assert "_finetune._checkpoint" in graph["_backbones.weights"] and "_finetune" in graph["_backbones.weights"]
    assert {"_io", "_errors"} <= graph["_finetune._checkpoint"]
    assert "_finetune._network" in graph["_finetune._loop"]
    assert {"_store", "_store.store"} <= graph["_extract.extract"]


def test_every_subpackage_says_what_it_holds():
    """Check that each subpackage's __init__ is one docstring (what it is responsible for) and
    that the top level holds only the shared foundation and the compatibility shims."""
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        if init.parent.name == "_data":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"{init.parent.name}/__init__.py has no docstring saying what it holds"
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == FOUNDATION | SHIMS | {"__init__", "__main__"}, sorted(top - FOUNDATION - SHIMS)


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

    code = ("import sys, cnncodes._backbones.weights, cnncodes._finetune._checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('cnncodes.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "cnncodes._finetune._checkpoint" in loaded
    for module in ("cnncodes._finetune._api", "cnncodes._finetune._loop", "cnncodes._finetune._network",
                   "cnncodes._finetune._predict", "cnncodes._models.model"):
        assert f"'{module}'" not in loaded, f"{module} is imported with the checkpoint format"


def test_every_exception_is_defined_in_errors():
    """Check that no module but _errors defines an exception class (issue 16: one module)."""
    stray = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                stray.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert stray == [], f"exceptions outside cnncodes/_errors.py: {stray}"
