"""The layout follows the data: checked by reading the package's own source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"

#: The modules that own a database's tables and so may execute SQL (db.py runs the pragmas).
SQL_OWNERS = {
    "db.py",
    "outbox.py",
    "storage/index.py",
    "worklist/store.py",
    "worklist/mpps.py",
    "uploads.py",
}

STATE_NAMES = [
    "pacs.db",
    "worklist.db",
    "spool",
    "storage",
    "conflicts",
    "derived",
    "status.json",
    "metrics.prom",
    "appliance.lock",
    "control.sock",
]


def modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(PACKAGE)), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def production() -> list[tuple[str, ast.Module]]:
    return [(name, tree) for name, tree in modules() if not name.startswith("testing/")]


def imported(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes (they may name files; code may not repeat them)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def test_production_code_never_imports_the_testing_package():
    offenders = {
        name: sorted(i for i in imported(tree) if i.startswith("appliance.testing"))
        for name, tree in production()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_walk_sees_an_import_of_the_testing_package():
    # The check above must be able to fail: the demo does import the simulator.
    demo = dict(modules())["testing/demo.py"]
    assert "appliance.testing.modality" in imported(demo)


def spellings(name: str, tree: ast.Module) -> list[int]:
    """Lines where `name` is written as a path: any string for a file name, the right of a `/`
    for a directory name (which is also a word: "storage" names a logger and a port)."""
    skip = docstrings(tree)
    if "." in name:
        return [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value == name and id(node) not in skip
        ]
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Div)
        and isinstance(node.right, ast.Constant)
        and node.right.value == name
    ]


@pytest.mark.parametrize("name", STATE_NAMES)
def test_each_state_path_is_spelled_once(name):
    places = [f"{module}:{line}" for module, tree in modules() for line in spellings(name, tree)]
    assert len(places) == 1, places
    assert places[0].startswith("state.py:")


def test_only_a_tables_owner_executes_sql():
    executing = set()
    for module, tree in production():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript")
            ):
                executing.add(module)
    assert executing <= SQL_OWNERS, executing - SQL_OWNERS


def test_one_transaction_helper():
    begins = [
        f"{module}:{node.lineno}"
        for module, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and "BEGIN IMMEDIATE" in node.value
        and id(node) not in docstrings(tree)
    ]
    assert len(begins) == 1, begins
    assert begins[0].startswith("db.py:")


def test_every_subpackage_has_an_init():
    missing = [
        str(directory.relative_to(PACKAGE))
        for directory in PACKAGE.rglob("*")
        if directory.is_dir()
        and directory.name != "__pycache__"
        and not (directory / "__init__.py").exists()
    ]
    assert missing == []
