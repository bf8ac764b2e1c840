"""tlsweep's version, written once in pyproject.toml and read from the installed metadata."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("tlsweep")
except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
