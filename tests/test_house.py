"""The house: imports between fastgen's files run one way (no circles), and no source file passes 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name → file, for fastgen/ and kernels/ (fastgen.kernels is a symlink to kernels/)."""
    found = {}
    for root, package in ((REPO / "fastgen", "fastgen"), (REPO / "kernels", "fastgen.kernels")):
        for path in root.rglob("*.py"):
            if "kernels" in path.relative_to(root).parts[:1] and package == "fastgen":
                continue  # the symlink: counted once, as kernels/
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastgen modules a file imports, wherever in the file (a lazy import inside a function still ties the
    two files together), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for top in ast.walk(tree) if isinstance(top, ast.If)
               and getattr(top.test, "id", getattr(top.test, "attr", None)) == "TYPE_CHECKING"
               for node in ast.walk(top)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_source_files_at_most_400_lines():
    files = [*_modules().values(), *(REPO / "kernels").glob("*.cpp")]
    long = {str(path.relative_to(REPO)): lines for path in files
            if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
