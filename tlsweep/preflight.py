"""Before any work: every store a command writes to can be reached and written.

The study's database server (:func:`tlsweep.storage.check_database`), the MLflow tracking
server or database (:func:`tlsweep.tracking.check_server`), the folders of SQLite files, of
the feature cache and of a file tracking store: one that is down, refuses the login or cannot
be written is one :class:`~tlsweep.errors.TlsweepError` line within seconds, and nothing is
created.
"""

from __future__ import annotations

import os

from tlsweep.config import SweepConfig


def preflight(
    cfg: SweepConfig, *, storage: bool = True, tracking: bool = True, cache: bool = False
) -> None:
    """Before any work: every store the command writes to can be reached and written.

    A database or tracking server that is down or refuses the login, a folder that cannot be
    written: one :class:`~tlsweep.errors.TlsweepError` line within seconds, and nothing created
    (no database file, no MLflow experiment, no cache entry).
    """
    from tlsweep.checks import check_can_write

    if cache:
        check_can_write(cfg.cache_dir, "cache_dir", "dir")
    if storage:
        url = cfg.storage
        if url.startswith("sqlite:///"):
            check_can_write(url[len("sqlite:///") :].partition("?")[0], "storage")
        elif url.startswith("journal:"):
            check_can_write(url[len("journal:") :], "storage")
        else:
            from tlsweep.storage import check_database

            check_database(url, "storage")
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking and uri:
        _check_tracking(uri)


def _check_tracking(uri: str) -> None:
    from urllib.parse import urlsplit

    from tlsweep.checks import check_can_write
    from tlsweep.urls import TRACKING_DATABASES

    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        from tlsweep.tracking import check_server

        check_server(uri)
    elif scheme.startswith("sqlite"):
        check_can_write(uri.partition(":///")[2].partition("?")[0] or uri, "tracking_uri")
    elif scheme.partition("+")[0] in TRACKING_DATABASES:
        from tlsweep.storage import check_database

        check_database(uri, "tracking_uri")
    elif scheme == "file" or (not scheme and not uri.startswith(("file:", "databricks", "uc"))):
        check_can_write(urlsplit(uri).path if scheme else uri, "tracking_uri", "dir")
