"""Issue 12: the shape of the code, checked so it cannot quietly regress.

Checked on every module of the package: no function
over 50 lines, every command of ``cli.py`` at most 15 lines of body, no hand-written ``to_dict`` (JSON comes from
``checks.as_dict``), rows of a query read by name (never ``row[0]``), and no import cycle in the package.

A command's body is measured from its first statement after the docstring to its last line: the signature is
typer's declaration of the options (parsing), not logic, and is not counted.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "unified_memory"
OWNED = tuple(sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"))
MAX_FUNCTION_LINES = 50
MAX_COMMAND_BODY_LINES = 15
_ROW_SOURCES = frozenset({"fetchone", "fetchall", "fetchmany", "execute"})


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"), filename=f"{module}.py")


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1 if body else 0


def _is_command(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
               for d in function.decorator_list)


@pytest.mark.parametrize("module", OWNED)
def test_no_function_is_longer_than_50_lines(module: str) -> None:
    long = {f.name: (f.end_lineno or f.lineno) - f.lineno + 1 for f in _functions(_tree(module))}
    assert {name: n for name, n in long.items() if n > MAX_FUNCTION_LINES} == {}


def test_every_command_only_parses_and_renders() -> None:
    commands = [f for f in _functions(_tree("cli")) if _is_command(f)]
    assert len(commands) >= 15  # the decorators were recognised
    assert {f.name: _body_lines(f) for f in commands if _body_lines(f) > MAX_COMMAND_BODY_LINES} == {}


@pytest.mark.parametrize("module", OWNED)
def test_no_hand_written_to_dict(module: str) -> None:
    """JSON is generated from the fields (checks.as_dict); the one ``to_dict`` is ``Serialised``'s, which calls it."""
    found = [f"{cls.name}.to_dict" for cls in ast.walk(_tree(module)) if isinstance(cls, ast.ClassDef)
             for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "to_dict"]
    assert found == (["Serialised.to_dict"] if module == "checks" else [])


def _row_names(function: ast.AST) -> set[str]:
    """Names bound from a query's rows: ``row = cur.execute(...).fetchone()``, ``for r in conn.execute(...)``."""
    def from_rows(expr: ast.AST, names: set[str]) -> bool:
        return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _ROW_SOURCES
                   or isinstance(n, ast.Name) and n.id in names for n in ast.walk(expr))

    names: set[str] = set()
    for _ in range(2):  # a name bound from another row name (rows = ...fetchall(); for r in rows)
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and from_rows(node.value, names):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.For | ast.comprehension) and from_rows(node.iter, names):
                names |= {t.id for t in ast.walk(node.target) if isinstance(t, ast.Name)}
    return names


def _numbered(node: ast.Subscript, names: set[str]) -> bool:
    if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int)):
        return False
    value = node.value
    return (isinstance(value, ast.Name) and value.id in names
            or isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "fetchone")


@pytest.mark.parametrize("module", OWNED)
def test_rows_are_read_by_name(module: str) -> None:
    found = []
    for function in _functions(_tree(module)):
        names = _row_names(function)
        found += [f"{function.name}:{n.lineno} {ast.unparse(n)}" for n in ast.walk(function)
                  if isinstance(n, ast.Subscript) and _numbered(n, names)]
    assert found == []


def _imports(module: str) -> set[str]:
    """The package's modules ``module`` imports when it is imported (not inside functions, not for typing)."""
    found: set[str] = set()
    for node in _tree(module).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return {m.split(".")[0] for m in found if (PACKAGE / f"{m.split('.')[0]}.py").exists()}


def test_no_import_cycles() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    graph = {m: _imports(m) for m in modules}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    done: set[str] = set()
    for module in modules:
        if module not in done:
            visit(module, [module])
    assert cycles == []
