"""The package's layout, as issue #11 states it: imports point one way (no cycle, counting the
imports inside functions too), MLflow is imported only by the tracking modules, Optuna's private
API is reached only through its one adapter, and every module stays readable alone (a few
hundred lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tlsweep"
MAX_LINES = 420
MODULES = sorted(p.stem for p in PKG.glob("*.py"))


def _tree(name: str) -> ast.Module:
    return ast.parse((PKG / f"{name}.py").read_text(), filename=f"{name}.py")


def _imports(name: str) -> set[str]:
    """The top-level names of every module ``name`` imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(_tree(name)):
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


def test_mlflow_is_imported_only_by_the_tracking_modules() -> None:
    users = {m for m in MODULES if any(i.split(".")[0] == "mlflow" for i in _imports(m))}
    assert users and all(m.startswith("tracking") for m in users), sorted(users)


def test_optunas_private_api_is_reached_through_one_adapter() -> None:
    """``study._storage`` / ``trial._trial_id`` (no public equivalent in Optuna 5) are read in
    one place, whose comment says why."""
    where = {
        m
        for m in MODULES
        for node in ast.walk(_tree(m))
        if isinstance(node, ast.Attribute)
        and node.attr in ("_storage", "_trial_id")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }
    assert len(where) == 1, sorted(where)


@pytest.mark.parametrize("module", MODULES)
def test_a_module_stays_readable_alone(module: str) -> None:
    n = len((PKG / f"{module}.py").read_text().splitlines())
    assert n <= MAX_LINES, f"{module}.py has {n} lines: split it by job (issue #11)"


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
