"""The import rules of docs/architecture.md, checked over the source's import graph (no import runs).

Layers, lowest first; a module may import its own layer and the ones below it:
    subjectdiff.catalogs                        the data contract and storage: nothing else of ours
    subjectdiff (the floor: model, weights, ...) catalogs
    subjectdiff.datagen | .train | .infer       catalogs and the floor, never each other
    subjectdiff.cli, subjectdiff.__main__       the front door: the one place that imports the apps

Function-level imports are edges too (they hid three circles once). One of our own modules imported inside a
function is allowed in a `cli.py` (start-up time) or with a comment on that line or the line above saying why.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
APPS = ("subjectdiff.datagen", "subjectdiff.train", "subjectdiff.infer")
FRONT_DOOR = ("subjectdiff.cli", "subjectdiff.__main__")
CATALOGS = "subjectdiff.catalogs"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (the deepest of ours the name resolves to)
    line: int
    in_function: bool
    commented: bool  # a comment on the import's line or the line above


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """{installed package name: source folder} from pyproject's package-dir (a package not mapped sits in the
    folder its name spells), for every package pyproject lists."""
    tool = _pyproject()["tool"]["setuptools"]
    mapped = tool.get("package-dir", {})
    out = {}
    for pkg in tool["packages"]:
        parent = next((p for p in sorted(mapped, key=len, reverse=True) if pkg == p or pkg.startswith(p + ".")), None)
        rel = mapped[parent] + pkg[len(parent) :].replace(".", "/") if parent else pkg.replace(".", "/")
        out[pkg] = ROOT / rel
    return out


def modules() -> dict[str, Path]:
    """{module name: file} for every module of every listed package."""
    out = {}
    for pkg, folder in package_folders().items():
        for f in folder.glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The modules an import statement names. `from pkg import mod` names pkg.mod, not pkg: as in grimp and
    import-linter, a package's own __init__ is not an edge of the modules inside it."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the package of this module, `level - 1` packages up
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def edges(known: dict[str, Path] | None = None) -> list[Edge]:
    """Every import of one of our modules by another, top-level and function-level."""
    known = known or modules()
    out = []
    for module, path in known.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            names = _imported_names(node, module, path.stem == "__init__", known)
            targets = {_resolve(n, known) for n in names}
            for target in sorted(t for t in targets if t and t != module):
                near = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                out.append(Edge(module, target, node.lineno, id(node) in in_function, "#" in near))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    if module == CATALOGS or module.startswith(CATALOGS + "."):
        return "catalogs"
    app = next((a for a in APPS if module == a or module.startswith(a + ".")), None)
    if app:
        return app
    return "front door" if module in FRONT_DOOR else "floor"


ALLOWED = {"catalogs": {"catalogs"}, "floor": {"catalogs", "floor"}, "front door": {"floor", "front door", *APPS}}


def allowed(source: str, target: str) -> bool:
    src, dst = layer(source), layer(target)
    if src in APPS:
        return dst in {"catalogs", "floor", src}
    return dst in ALLOWED[src]


@pytest.fixture(scope="module")
def graph_edges() -> list[Edge]:
    return edges()


def test_every_package_folder_is_installed():
    """A package folder missing from pyproject's list would import from a checkout and be absent from a wheel."""
    listed = {p.resolve() for p in package_folders().values()}
    for name in ("catalogs", "datagen", "train", "infer", "subjectdiff"):
        for init in (ROOT / name).rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent.relative_to(ROOT)} is not in pyproject's packages"
    assert all(f.is_dir() for f in package_folders().values())


def test_no_import_circle(graph_edges):
    graph: dict[str, set[str]] = {}
    for e in graph_edges:
        graph.setdefault(e.source, set()).add(e.target)
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_layers(graph_edges):
    wrong = [f"{e.source}:{e.line} imports {e.target}" for e in graph_edges if not allowed(e.source, e.target)]
    assert not wrong, "imports across layers:\n" + "\n".join(wrong)


def test_function_level_imports_say_why(graph_edges):
    silent = [
        f"{e.source}:{e.line} ({e.target})"
        for e in graph_edges
        if e.in_function and not e.commented and e.source.rpartition(".")[2] not in ("cli", "__main__")
    ]
    assert not silent, "function-level imports without a comment saying why:\n" + "\n".join(silent)


def test_checks_catch_what_they_guard():
    """The rules on a made-up graph: a circle, an app importing an app, the floor importing an app."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert not allowed("subjectdiff.train.data", "subjectdiff.datagen.config")
    assert not allowed("subjectdiff.weights", "subjectdiff.datagen.cli")
    assert not allowed("subjectdiff.catalogs.reader", "subjectdiff.model")
    assert allowed("subjectdiff.cli", "subjectdiff.train.cli")
    assert allowed("subjectdiff.infer.pipeline", "subjectdiff.model.sampling")


def _test_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "tests":  # from tests import test_x
            names |= {f"tests.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_tests_and_benchmarks_keep_to_their_side():
    """Test modules share helpers through helper modules, not through each other; benchmarks import no test."""
    wrong = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        wrong += [f"{f.name} imports {n}" for n in _test_imports(f) if n.startswith(("tests.test_", "tests.conftest"))]
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        wrong += [f"benchmarks/{f.name} imports {n}" for n in _test_imports(f) if n.split(".")[0] == "tests"]
    assert not wrong, "\n".join(wrong)
