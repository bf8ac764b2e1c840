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
