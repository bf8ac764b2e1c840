"""The package's layout, as issue #11 states it: imports point one way (no cycle, counting the
imports inside functions too), MLflow is imported only by the ``tlsweep.tracking`` package,
Optuna's private API is reached only through its one adapter, and every module stays readable
alone (a few hundred lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tlsweep"
MAX_LINES = 420
# a step of the flow: a module, or a subpackage (its files count as one step: tracking/)
FILES = {
    p.relative_to(PKG).as_posix(): p.relative_to(PKG).parts[0].removesuffix(".py")
    for p in sorted(PKG.rglob("*.py"))
}
MODULES = sorted(set(FILES.values()))


def _files(name: str) -> list[Path]:
    return [PKG / f for f, m in FILES.items() if m == name]


def _imports(name: str) -> set[str]:
    """The full names of every module ``name`` imports, anywhere in its file(s)."""
    out: set[str] = set()
    nodes = [n for f in _files(name) for n in ast.walk(ast.parse(f.read_text(), filename=str(f)))]
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "tlsweep":
                out |= {f"tlsweep.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    return {
        m: {i.split(".")[1] for i in _imports(m) if i.startswith("tlsweep.")} & set(MODULES) - {m}
        for m in MODULES
    }


def test_imports_between_modules_have_no_cycle() -> None:
    graph, state, path = _graph(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = path[path.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)


def test_mlflow_is_imported_only_by_the_tracking_package() -> None:
    users = {m for m in MODULES if any(i.split(".")[0] == "mlflow" for i in _imports(m))}
    assert users == {"tracking"}, sorted(users)


def test_optunas_private_api_is_reached_through_one_adapter() -> None:
    """``study._storage`` / ``trial._trial_id`` (no public equivalent in Optuna 5) are read in
    one place, whose comment says why."""
    where = {
        m
        for m in MODULES
        for f in _files(m)
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr in ("_storage", "_trial_id")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }
    assert len(where) == 1, sorted(where)


@pytest.mark.parametrize("path", sorted(FILES))
def test_a_module_stays_readable_alone(path: str) -> None:
    n = len((PKG / path).read_text().splitlines())
    assert n <= MAX_LINES, f"tlsweep/{path} has {n} lines: split it by job (issue #11)"


def test_the_cli_does_not_import_tensorflow_mlflow_or_optuna_to_start() -> None:
    """``tlsweep --help`` stays fast: heavy imports happen where they are needed."""
    import subprocess
    import sys

    code = (
        "import sys, tlsweep.cli; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
