"""The one root exception of tlsweep.

Every error a user can fix (a bad sweep file, a missing folder, an unknown backbone) is a
:class:`TlsweepError` whose message is one line naming the problem and the fix. The CLI prints
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


class StudyFailing(StudyError):
    """A runtime failure of the study: trials keep failing, the winner cannot be scored."""

    exit_code = 1
