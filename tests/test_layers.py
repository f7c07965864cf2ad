"""The layers of fused_optim (docs/design.md, "Layers" and "One declaration"), checked on the source.

Every module is parsed (never imported) and its imports collected: module-level and inside functions,
relative and absolute, and the by-name ones (a ``"fused_optim.<module>"`` or ``"fused_optim.<module>:
<attr>"`` string, which `importlib` or a lazy reference turns into an import no tool sees). Then:

- the kernel layer (`fused_optim/kernels/`, `fused_optim/_native.py`) reaches nothing of the API layer
  (`optimizer.py`, `registry.py`, `ops.py`, the package itself and every module that declares an
  optimizer), directly or through another module;
- no import cycle among fused_optim's modules (the package ``__init__`` aside: importing any submodule
  runs it, which is Python's rule, not an edge of ours).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fused_optim
from fused_optim.declaration import declared

ROOT = Path(fused_optim.__file__).parent
PKG = "fused_optim"

def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The fused_optim module `name` is, or the nearest package/module that holds it (an attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from . import x`: x may be a submodule; `from .m import f`: an attribute of m
            targets = [f"{base}.{a.name}" for a in node.names] or [base]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.partition(":")[0]
            if text.startswith(f"{PKG}.") and text.replace(".", "").replace("_", "").isalnum():
                targets = [text]
        for t in targets:
            if t == PKG or t.startswith(f"{PKG}."):
                resolved = _resolve(t)
                if resolved is not None and resolved != module and resolved != PKG:
                    out.add(resolved)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}

KERNEL_LAYER = {m for m in MODULES if m == f"{PKG}.kernels" or m.startswith(f"{PKG}.kernels.")}
KERNEL_LAYER.add(f"{PKG}._native")
API_LAYER = {PKG, f"{PKG}.optimizer", f"{PKG}.registry", f"{PKG}.ops"} | {
    cls.__module__ for _, cls in declared().values()}


def _reach(start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or not, with one path to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in sorted(GRAPH.get(m, ())):
            if n not in paths:
                paths[n] = paths[m] + [n]
                todo.append(n)
    return paths


def test_the_parser_sees_the_imports_we_know():
    """The graph is not empty by mistake: edges that exist today are found."""
    assert f"{PKG}.optimizer" in GRAPH[f"{PKG}.lion"]
    assert f"{PKG}.declaration" in GRAPH[f"{PKG}.optimizer"]
    assert f"{PKG}.kernels.lion" in GRAPH[f"{PKG}.lion"]  # the lazy, by-name reference
    assert f"{PKG}.kernels.multi_tensor" in GRAPH[f"{PKG}.kernels"]  # a function-level import
    assert f"{PKG}.optimizer" in API_LAYER and f"{PKG}.gravity" in API_LAYER


@pytest.mark.parametrize("module", sorted(KERNEL_LAYER))
def test_kernel_layer_imports_no_api(module):
    bad = {m: path for m, path in _reach(module).items() if m in API_LAYER}
    assert not bad, f"{module} reaches the API layer: " + "; ".join(" -> ".join(p) for p in bad.values())


def _cycles() -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    graph = GRAPH

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return comps


def test_no_import_cycle():
    cycles = _cycles()
    described = []
    for comp in cycles:
        edges = sorted((a, b) for a in comp for b in GRAPH[a] if b in comp)
        described.append(f"{comp} (edges: {edges})")
    assert not cycles, "import cycles among fused_optim modules:\n" + "\n".join(described)

