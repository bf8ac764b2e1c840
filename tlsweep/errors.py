"""The one root exception of tlsweep.

Every error a user can fix (a bad sweep file, a missing folder, an unknown backbone) is a
:class:`TlsweepError` whose message is one line naming the problem and the fix. The CLI prints
that line and exits with its ``exit_code``: 2 for a usage error (a bad flag, file or name), 1
for a runtime failure the input did not cause (:class:`ServiceError`: a server or database that is
down or refuses the login, a disk that is full, a permission denied; :class:`StoreError`: a local
database left half-built). Anything else is a bug and keeps its traceback.

    exit_code = 1


that line and exits with its ``exit_code`` (2 for a usage error, 1 for a runtime failure);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TlsweepError(Exception):
    """Base class of every user-facing tlsweep error."""

    exit_code = 2


class ConfigError(TlsweepError):
    """The sweep file or a command-line override is invalid."""


class DataError(TlsweepError):
    """The image folder cannot be used (missing, empty, single class, ...)."""


class BackboneError(TlsweepError):
    """An unknown backbone, bad weights or an unusable input size."""


class StudyError(TlsweepError):
    """The Optuna study cannot be created, resumed or read."""


class StoreError(TlsweepError):
    """A local MLflow/Optuna database is unusable as it is (e.g. half-migrated, with data in it).

    A runtime failure, not a usage error: exit code 1.
    """

    exit_code = 1


class ServiceError(TlsweepError):
    """A runtime failure: a server or database unreachable or refusing, a disk full, no access."""

    exit_code = 1


class StudyFailing(StudyError):
    """A runtime failure of the study: trials keep failing, the winner cannot be scored."""

    exit_code = 1


def first_line(e: BaseException | str, limit: int | None = 200) -> str:
    """The first non-blank line of an error's message (or of a text), stripped and cut to
    ``limit`` characters; an error without a message gives its type's name, a blank text ""."""
    text = e if isinstance(e, str) else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return "" if isinstance(e, str) else type(e).__name__


def error_gist(e: BaseException) -> str:
    """``Type: first line`` of an error, whatever its message (empty, blank, many lines)."""
    line = first_line(str(e))
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
