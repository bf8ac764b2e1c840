"""The checks every part of the sweep file uses: one-line errors that name the field, the value
and what is allowed (:class:`~tlsweep.errors.ConfigError`), the checks of plain values (keys,
integers, fractions, choices), and whether a path can be written.

This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from tlsweep.errors import ConfigError, ServiceError


def fail(where: str, field_name: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error: ``WHERE: FIELD: got VALUE; ALLOWED`` (the value cut to 80 characters)."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{where + ': ' if where else ''}{field_name}: got {shown}; {allowed}")


def check_keys(where: str, section: str, mapping: Any, allowed: tuple[str, ...]) -> None:
    """Refuse a ``section`` that is not a mapping, or has a key not in ``allowed`` (with a hint)."""
    if not isinstance(mapping, dict):
        what = section or "the sweep file"
        raise fail(where, what, mapping, "expected a mapping of keys to values")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            prefix = f"{section}." if section else ""
            raise ConfigError(
                f"{where}: {prefix}{key}: unknown key; {hint}allowed: {', '.join(allowed)}"
            )


def field_value(raw: Mapping[str, Any], schema: type, key: str) -> Any:
    """``raw[key]``, or the default of the dataclass field ``schema.key``: defaults live there."""
    if key in raw:
        return raw[key]
    f = schema.__dataclass_fields__[key]
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def is_int(v: Any) -> bool:
    """An integer, and not a bool (YAML's ``true`` is no number here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float, and not a bool."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(where: str, name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """``v`` if it is an integer from ``lo`` (to ``hi``), else the error naming ``name``."""
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise fail(where, name, v, f"expected {rng}")
    return int(v)


def fraction(where: str, name: str, v: Any) -> float:
    """``v`` if it is a number in [0, 1), as a float."""
    if not is_num(v) or not 0.0 <= v < 1.0:
        raise fail(where, name, v, "expected a number from 0 (inclusive) to 1 (exclusive)")
    return float(v)


def choice(where: str, name: str, v: Any, allowed: tuple[str, ...]) -> str:
    """``v`` lower-cased if it is one of ``allowed`` (case-insensitive)."""
    if not isinstance(v, str) or v.lower() not in allowed:
        raise fail(where, name, v, f"allowed: {' | '.join(allowed)}")
    return v.lower()


def resolve_path(base: Path, p: str) -> Path:
    """``p`` with ``~`` expanded, relative to ``base`` unless absolute."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def check_can_write(path: str | Path, field_name: str, kind: str = "file") -> Path:
    """Check, creating nothing, that ``path`` (a ``kind`` of "file" or "dir") can be written.

    Missing folders on the way are fine (the writer makes them) if the nearest existing one is
    a writable folder. A path through a file is a usage error (:class:`ConfigError`); no
    permission or a read-only filesystem is a runtime failure (:class:`ServiceError`).
    Returns the absolute path.
    """
    p = Path(path).expanduser().absolute()
    shown = str(path)
    if p.exists():
        if kind == "file" and p.is_dir():
            raise fail("", field_name, shown, "it is a folder; expected a file path")
        if kind == "dir" and not p.is_dir():
            raise fail("", field_name, shown, "it is a file; expected a folder")
        if not os.access(p, os.W_OK | (os.X_OK if kind == "dir" else 0)):
            raise ServiceError(f"{field_name}: {shown}: permission denied (cannot write it)")
        if kind == "dir":
            return p
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise fail("", field_name, shown, f"{parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ServiceError(
            f"{field_name}: {shown}: permission denied (cannot create files in {parent})"
        )
    return p
