"""tlsweep's version, written once in pyproject.toml and read from the installed metadata, and
the one lookup of the versions of the libraries that decide its results."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("tlsweep")
except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

# the libraries whose versions a study records (its resolved record)
LIBRARIES = ("keras", "tensorflow", "optuna", "mlflow", "numpy")


def version(pkg: str) -> str:
    """The installed version of the distribution ``pkg``, or ``"absent"``."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def versions(pkgs: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """tlsweep's version and those of ``pkgs`` (by default the libraries that decide results)."""
    return {"tlsweep": __version__, **{p: version(p) for p in pkgs}}
