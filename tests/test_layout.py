"""The package's layout, as issues #11 and #21 state it: subpackages by stage, each with a public
face (``__all__`` in its ``__init__.py``) and private modules behind it; at most 8 modules at the
top; imports point down ``ORDER`` and never back up (counting the imports inside functions too),
so there is no cycle between packages nor between modules; no private name or private module is
imported across a package boundary; MLflow is imported only by ``tlsweep.tracking``; Optuna's
private API is reached only through its one adapter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tlsweep"
MAX_TOP = 8
# The stages, lowest first: a unit (a subpackage, or a module at the top) imports only units
# before it. ``backbones`` sits below ``config``: it reads a backbone's settings through a Protocol
# while the config checks names against the backbone registry.
ORDER = [
    "versions",
    "errors",
    "interrupts",
    "backbones",
    "config",
    "files",
    "stores",
    "images",
    "features",
    "head",
    "study",
    "tracking",
    "winner",
    "audit",
    "sweep",
    "cli",
    "__main__",
    "__init__",
]
# What each stage never touches (STYLE.md's table): other stages even below it, and libraries.
NEVER = {
    "config": {"tensorflow", "keras", "optuna", "mlflow"},
    "images": {"backbones", "features", "study", "optuna", "mlflow"},
    "backbones": {"images", "features", "optuna", "mlflow"},
    "features": {"head", "study", "optuna", "mlflow"},
    "head": {"study", "optuna", "mlflow"},
    "study": {"tracking", "mlflow"},
    "tracking": {"study"},
}
# no exception: the one version lookup is public (tlsweep.versions)
SHARED_PRIVATE: set[str] = set()

FILES = sorted(PKG.rglob("*.py"))
PACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())


def module_of(path: Path) -> str:
    """``tlsweep.features._cache`` for tlsweep/features/_cache.py, ``tlsweep.features`` for its
    ``__init__.py``, ``tlsweep`` for the package's own."""
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in FILES}


def unit_of(module: str) -> str:
    """The stage a module belongs to: its subpackage, or itself at the top."""
    if module == "tlsweep":
        return "__init__"
    return module.split(".")[1]


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every tlsweep import of the file,
    relative imports made absolute; a name that is a module is reported as that module."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("tlsweep")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if not src.startswith("tlsweep"):
                continue
            for a in node.names:
                full = f"{src}.{a.name}"
                if full in MODULES:
                    out.append((full, None, node.lineno))
                else:
                    out.append((src, a.name, node.lineno))
    return out


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {unit_of(m): set() for m in MODULES}
    for m, path in MODULES.items():
        for src, _, _ in imports(path):
            if src in MODULES and unit_of(src) != unit_of(m):
                graph[unit_of(m)].add(unit_of(src))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = "open"
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_at_most_eight_modules_at_the_top() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP, f"{len(top)} modules at the top of tlsweep/: {top}"


def test_the_stages_are_subpackages_with_a_public_face() -> None:
    assert len(PACKAGES) >= 5, PACKAGES
    for name in PACKAGES:
        tree = ast.parse((PKG / name / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"tlsweep/{name}/__init__.py: say what it owns"
        declared = [
            n
            for n in tree.body
            if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in n.targets)
        ]
        assert declared, f"tlsweep/{name}/__init__.py has no __all__"
        names = ast.literal_eval(declared[0].value)
        assert names == sorted(names), f"tlsweep/{name}: keep __all__ sorted"
        bound = {
            a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names
        }
        assert set(names) <= bound, f"tlsweep/{name}: __all__ names {set(names) - bound}"


def test_every_unit_is_in_the_order() -> None:
    assert {unit_of(m) for m in MODULES} <= set(ORDER), set(map(unit_of, MODULES)) - set(ORDER)


def test_no_private_name_or_module_crosses_a_package_boundary() -> None:
    bad = []
    for m, path in MODULES.items():
        for src, name, line in imports(path):
            if unit_of(src) == unit_of(m) or src in SHARED_PRIVATE:
                continue
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if any(is_private(part) for part in src.split(".")):
                bad.append(f"{where}: private module {src}")
            if name and is_private(name):
                bad.append(f"{where}: private name {name} of {src}")
            if src in MODULES and unit_of(src) in PACKAGES and src != f"tlsweep.{unit_of(src)}":
                bad.append(f"{where}: {src} is not the face of tlsweep.{unit_of(src)}")
    assert not bad, "\n".join(bad)


def test_imports_point_down_the_order() -> None:
    rank = {u: i for i, u in enumerate(ORDER)}
    up = [
        f"{a} imports {b}"
        for a, targets in unit_graph().items()
        for b in targets
        if rank.get(b, -1) >= rank.get(a, -1)
    ]
    assert not up, "imports that climb up ORDER: " + "; ".join(sorted(up))


def test_no_cycle_between_packages() -> None:
    cycle = find_cycle(unit_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_imports_between_modules_have_no_cycle() -> None:
    graph = {
        m: {src for src, _, _ in imports(p) if src in MODULES and src != m} - {"tlsweep"}
        for m, p in MODULES.items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_mlflow_is_imported_only_by_the_tracking_package() -> None:
    users = set()
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n.split(".")[0] == "mlflow" for n in names):
                users.add(unit_of(m))
    assert users == {"tracking"}, sorted(users)


def test_optunas_private_api_is_reached_through_one_adapter() -> None:
    """``study._storage`` / ``trial._trial_id`` (no public equivalent in Optuna 5) are read in
    one module, whose comment says why."""
    where = {
        m
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr in ("_storage", "_trial_id")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }
    assert len(where) == 1, sorted(where)


def test_the_cli_does_not_import_tensorflow_mlflow_or_optuna_to_start() -> None:
    """``tlsweep --help`` stays fast: heavy imports happen where they are needed."""
    code = (
        "import sys, tlsweep.cli; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_console_script_entry_point_is_exported() -> None:
    import tlsweep.cli

    assert "main" in tlsweep.cli.__all__ and callable(tlsweep.cli.main)


@pytest.mark.parametrize("name", PACKAGES)
def test_a_face_imports_cleanly_on_its_own(name: str) -> None:
    """Each face imports in a fresh interpreter (no import-order luck)."""
    subprocess.run([sys.executable, "-c", f"import tlsweep.{name}"], check=True)


@pytest.mark.parametrize("stage", sorted(NEVER))
def test_a_stage_never_touches_what_its_docstring_rules_out(stage: str) -> None:
    touched = set()
    for m, path in MODULES.items():
        if unit_of(m) != stage:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                touched |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                touched.add(node.module.split(".")[0])
        touched |= {unit_of(src) for src, _, _ in imports(path) if src != "tlsweep"}
    assert not touched & NEVER[stage], f"tlsweep/{stage}/ touches {sorted(touched & NEVER[stage])}"
