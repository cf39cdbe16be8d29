"""The package's import graph: no new import cycle (function-level imports count too).

One tangle is left from version 0.1 (issue 16): extraction, fine-tuning, model files, weights
and the backbone registry import each other, most of it through imports inside functions.
It may only shrink: a module that leaves it is removed from KNOWN_TANGLE here, and a new
cycle anywhere fails.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cnncodes"
KNOWN_TANGLE = {"_backbones", "_codesmodel", "_custom", "_extract", "_finetune", "_model", "_ray",
                "_report", "_sweep", "_tvweights", "_weights"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions."""
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


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
