"""raysub's layers, enforced from source (issue 24 §1): every import in ``raysub/`` — function-local ones included —
is parsed with `ast` (nothing of raysub is imported), and the test fails on

(a) a module cycle (a strongly connected component of more than one module);
(b) two packages (``raysub.X`` by its first component) importing each other;
(c) an edge that goes up a layer (`LAYERS`), or sideways from one workflow package to another, unless it is in
    `KNOWN_UPWARD` — a ratchet: a NEW upward edge fails, and so does a listed edge that no longer exists, so the
    list only shrinks.

(a) and (b) have no allowlist. Every failure names the offending edges with file:line.

An edge is what the import names, resolved to the nearest module file: ``from raysub.a import b`` gives an edge to
``raysub.a.b`` when that is a module and to ``raysub.a`` always (the package's ``__init__`` runs). Imports under
``if TYPE_CHECKING`` count too: a layer is about what a module knows, not only what it runs.
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict
from typing import Dict, List, Set, Tuple

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "raysub")

# The layers of issue 24 §1, mapped to today's modules (the longest matching prefix wins). A module may import
# its own layer and the ones below; workflows (layer 6) never import another workflow package.
# - `plugins` imports every plug-in so that no plug-in package imports another to register it (``optim`` no longer
#   imports ``l2o``); it is the top of layer 3 (it must sit above what it imports), below everything that looks a
#   name up in a registry (engine, plan, workflows).
# - ``l2o`` holds layer-3 pieces (the learned rule `lstm`, its weights file, its `optimizer` plug-in, the optimizee
#   seeds and the run's state files) beside its workflows (meta-gradient, meta-train, tune, meta-test).
LAYERS: Dict[str, int] = {
    "raysub": 1, "raysub.errors": 1, "raysub.registry": 1, "raysub.credentials": 1, "raysub.checksums": 1,
    "raysub.config": 2, "raysub.storage": 2, "raysub.lock": 2, "raysub.runs": 2,
    "raysub.data": 3, "raysub.models": 3, "raysub.projections": 3, "raysub.optim": 3, "raysub.linalg": 3,
    "raysub.metrics": 3, "raysub.report": 3, "raysub.tracking": 3, "raysub.plugins": 3,
    "raysub.l2o.lstm": 3, "raysub.l2o.weights": 3, "raysub.l2o.optimizer": 3, "raysub.l2o.seeds": 3,
    "raysub.l2o.layout": 3,
    "raysub.engine": 4,
    "raysub.pipeline.plan": 5, "raysub.pipeline.sample_plan": 5,
    "raysub.pipeline": 6, "raysub.l2o": 6,
    "raysub.bench": 7, "raysub.cli": 7, "raysub.launch": 7,
}
WORKFLOW_LAYER = 6

# Upward (or workflow-to-workflow) edges that remain until the section named removes them. The test fails when one
# of these no longer exists: delete its line then.
KNOWN_UPWARD: Dict[Tuple[str, str], str] = {
}


def modules(root: str = ROOT) -> Dict[str, str]:
    """Module name → file, for every ``.py`` under ``root`` (a package by its ``__init__``)."""
    out = {}
    base = os.path.dirname(root)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, mods: Dict[str, str]) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def import_edges(root: str = ROOT) -> Tuple[Dict[Tuple[str, str], List[str]], int]:
    """({(importer, imported): ["file:line", ...]}, the number of function-local raysub imports)."""
    mods = modules(root)
    base = os.path.dirname(root)
    edges: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    local = 0
    for mod, path in sorted(mods.items()):
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        in_function = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([target] if target else []))
                targets = [f"{target}.{a.name}" for a in node.names] + [target]
            else:
                continue
            hits = {r for t in targets if t.split(".")[0] == "raysub" for r in [_resolve(t, mods)] if r and r != mod}
            for r in hits:
                edges[(mod, r)].append(f"{os.path.relpath(path, base)}:{node.lineno}")
            local += bool(hits) and id(node) in in_function
    return dict(edges), local


def cycles(edges) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph: Dict[str, Set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    nodes = sorted(set(graph) | {b for bs in graph.values() for b in bs})
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def package(mod: str) -> str:
    """``raysub.X`` of a module ``raysub.X[.…]``."""
    return ".".join(mod.split(".")[:2])


def layer(mod: str) -> int:
    """The layer of ``mod`` (its longest prefix in `LAYERS`); a module no prefix covers fails the test."""
    name = mod
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    raise AssertionError(f"{mod}: in no layer: add it (or its package) to LAYERS in tests/test_layers.py")


def upward(edges) -> Dict[Tuple[str, str], List[str]]:
    """Edges that go up a layer, or from one workflow package to another."""
    out = {}
    for (a, b), where in edges.items():
        la, lb = layer(a), layer(b)
        sideways = la == lb == WORKFLOW_LAYER and package(a) != package(b)
        if lb > la or sideways:
            out[(a, b)] = where
    return out


def mutual_packages(edges) -> List[Tuple[str, str]]:
    """Package pairs that import each other."""
    pe = {(package(a), package(b)) for a, b in edges if package(a) != package(b)}
    return sorted({tuple(sorted(p)) for p in pe if (p[1], p[0]) in pe})


def _lines(edges, pairs) -> str:
    return "\n".join(f"  {a} -> {b}: {', '.join(edges[(a, b)])}" for a, b in sorted(pairs))


def test_no_module_cycles():
    edges, _ = import_edges()
    comps = cycles(edges)
    report = []
    for comp in comps:
        members = set(comp)
        report.append(" <-> ".join(comp) + "\n" + _lines(edges, [e for e in edges if set(e) <= members]))
    assert not comps, "module cycles (fix them by moving code down a layer):\n" + "\n".join(report)


def test_no_packages_import_each_other():
    edges, _ = import_edges()
    pairs = mutual_packages(edges)
    report = [f"{p} <-> {q}\n" + _lines(edges, [e for e in edges if {package(e[0]), package(e[1])} == {p, q}])
              for p, q in pairs]
    assert not pairs, "packages importing each other:\n" + "\n".join(report)


def test_no_new_upward_edges():
    edges, _ = import_edges()
    up = upward(edges)
    new = sorted(set(up) - set(KNOWN_UPWARD))
    assert not new, ("edges that go up a layer (or from one workflow to another), not in KNOWN_UPWARD: move the "
                     "code down instead\n" + _lines(edges, new))


def test_known_upward_edges_still_exist():
    """The ratchet: an edge of KNOWN_UPWARD that was removed (or no longer goes up) leaves the list."""
    up = upward(import_edges()[0])
    gone = sorted(set(KNOWN_UPWARD) - set(up))
    assert not gone, ("KNOWN_UPWARD lists edges that no longer go up a layer: delete them from "
                      "tests/test_layers.py\n" + "\n".join(f"  {a} -> {b}" for a, b in gone))


def test_every_module_has_a_layer():
    for mod in modules():
        layer(mod)


def test_graph_sees_function_local_imports(tmp_path):
    """The parser itself: a function-local import, a relative one and a package's ``__init__`` all give edges."""
    pkg = tmp_path / "raysub"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from . import mod\n")
    (pkg / "sub" / "mod.py").write_text("def f():\n    from raysub.low import X\n    return X\n")
    edges, local = import_edges(str(pkg))
    assert edges[("raysub.sub.mod", "raysub.low")] == ["raysub/sub/mod.py:2"]
    assert ("raysub.sub", "raysub.sub.mod") in edges and local == 1
    assert cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]
    mutual = {("raysub.a.x", "raysub.b"): [], ("raysub.b", "raysub.a.y"): []}
    assert mutual_packages(mutual) == [("raysub.a", "raysub.b")]


if __name__ == "__main__":  # python tests/test_layers.py: the graph's state, as the issue reports it
    e, n_local = import_edges()
    print(f"modules: {len(modules())}, import edges: {len(e)}, function-local raysub imports: {n_local}")
    print(f"module cycles: {len(cycles(e))}")
    for c in cycles(e):
        print("  ", " <-> ".join(c))
    print(f"package pairs importing each other: {len(mutual_packages(e))}")
    for p in mutual_packages(e):
        print("  ", " <-> ".join(p))
    up = upward(e)
    print(f"upward edges: {len(up)} ({len(set(up) - set(KNOWN_UPWARD))} not in KNOWN_UPWARD)")
    print(_lines(e, up))
