"""The import graph of a source tree, read from its files (imports inside functions included, relative imports
resolved): what ``tests/test_layering.py`` and the zoo/bench direction tests assert on."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


def module_name(path: Path, root: Path, package: str = "fewstep") -> str:
    """The dotted name of the module at ``path`` in ``package`` (whose folder is ``root``)."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


@dataclass(frozen=True)
class Import:
    """One imported module of a file: ``target`` (``a.b`` for ``from a import b`` where ``b`` is a module, else
    ``a``), the ``names`` taken from it, and the line."""

    target: str
    names: tuple[str, ...]
    line: int


def imports(path: Path, root: Path, package: str = "fewstep") -> list[Import]:
    """Every import statement of the file ``path`` of ``package`` (at ``root``), at any depth."""
    name = module_name(path, root, package)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.append(Import(base, tuple(alias.name for alias in node.names), node.lineno))
    return found


def imported_modules(path: Path, root: Path, package: str = "fewstep") -> set[str]:
    """The modules ``path`` imports; for ``from a import b`` both ``a`` and ``a.b`` (``b`` may be a module)."""
    out = set()
    for imp in imports(path, root, package):
        out.add(imp.target)
        out |= {f"{imp.target}.{n}" for n in imp.names}
    return out


class Graph:
    """The modules of ``package`` at ``root`` and their imports of each other."""

    def __init__(self, root: Path, package: str = "fewstep") -> None:
        self.root, self.package = root, package
        self.files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
        self.imports = {m: imports(p, root, package) for m, p in self.files.items()}

    def resolve(self, imp: Import) -> list[str]:
        """The modules of this package an import reaches: ``a.b`` where ``b`` is a module, else ``a``."""
        out = []
        for name in imp.names or ("",):
            full = f"{imp.target}.{name}" if name else imp.target
            if full in self.files:
                out.append(full)
            elif imp.target in self.files:
                out.append(imp.target)
        return sorted(set(out))

    def edges(self) -> dict[str, set[str]]:
        return {m: {t for imp in imps for t in self.resolve(imp) if t != m} for m, imps in self.imports.items()}

    def room(self, module: str) -> str:
        """The room of a module: the first name below the package (a subpackage or a top-level module)."""
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else ""

    def room_edges(self) -> dict[str, set[str]]:
        """Room -> the rooms it imports (the package's own ``__init__``, which re-exports, left out)."""
        out: dict[str, set[str]] = {}
        for m, targets in self.edges().items():
            a = self.room(m)
            if a:
                out.setdefault(a, set()).update(b for t in targets if (b := self.room(t)) and b != a)
        return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out
