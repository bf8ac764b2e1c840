"""The study's Optuna storage: opening it, checking its server, and the worker lock held in it.

A storage is a SQLite file (WAL, a busy timeout; refused on a network filesystem, where
SQLite's locks do not hold), a ``journal:FILE``, or a database server (PostgreSQL, MySQL),
checked once before any work so that a server that is down or refuses the login is one line
within seconds. Its trials record heartbeats and stale ones are retried
(``search.heartbeat_interval``, ``grace_period``, ``max_retry``; see
:mod:`tlsweep.study._recovery`).

Workers decide whether to start a trial under a lock held in the storage itself (a file lock
next to a SQLite/journal file, ``pg_advisory_lock`` on PostgreSQL, ``GET_LOCK`` on MySQL), so N
workers end with exactly ``n_trials`` finished trials (:mod:`tlsweep.study._runner`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import time
import warnings
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from tlsweep.config import DEFAULT_CONNECT_TIMEOUT, SweepConfig, parse_complaint, redact_url
from tlsweep.errors import ConfigError, ServiceError, StudyError, StudyFailing, first_line
from tlsweep.stores import StoreKind, count_rows, prepare

log = logging.getLogger(__name__)


# --- storage -----------------------------------------------------------------------------------
def _sqlite_path(url: str) -> Path | None:
    return (
        Path(url[len("sqlite:///") :].partition("?")[0]) if url.startswith("sqlite:///") else None
    )


def open_storage(cfg: SweepConfig, must_exist: bool = False) -> Any:
    """The Optuna storage for ``cfg.storage``, with heartbeats and stale-trial retry.

    With ``must_exist`` (the commands that only read a study), a local storage file that does
    not exist is an error instead of a new, empty database left behind.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = cfg.storage
    s = cfg.search
    local = Path(url[len("journal:") :]) if url.startswith("journal:") else _sqlite_path(url)
    if must_exist and local is not None and not local.is_file():
        raise StudyError(
            f"no study '{cfg.study}': the storage {local} does not exist; run 'tlsweep run "
            f"{cfg.path.name}' first, or pass --storage URL where the study is"
        )
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    sqlite = _sqlite_path(url)
    if sqlite is not None:
        check_local_sqlite(sqlite)  # not on a network filesystem
        prepare_optuna(url, create=not must_exist)  # built atomically; a half-built one checked
        try:
            sqlite.parent.mkdir(parents=True, exist_ok=True)
            # WAL lets readers and one writer work at once; the busy timeout makes concurrent
            # writers wait instead of failing with "database is locked". WAL is persistent.
            with contextlib.closing(sqlite3.connect(sqlite, timeout=60)) as con:
                con.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as e:
            raise StudyError(f"storage: cannot open {sqlite} ({e}); check the path") from None
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": _connect_args(url)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=s.heartbeat_interval,
                grace_period=s.grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=s.max_retry
                ),
            )
        except Exception as e:  # SQLAlchemy raises many types for bad URLs and servers
            first = first_line(e)
            raise ServiceError(
                f"storage: cannot open {redact_url(url)} ({redact_url(first)}); check the URL, "
                "the server and its driver (pip install 'tlsweep[postgres]' for PostgreSQL)"
            ) from None


# The driver packages of the extras, by SQLAlchemy dialect (pyproject.toml's extras).
_DRIVER_HINT = {
    "postgresql": "pip install 'tlsweep[postgres]' (psycopg 3)",
    "mysql": "pip install 'tlsweep[mysql]' and write mysql+pymysql://",
    "mariadb": "pip install 'tlsweep[mysql]' and write mariadb+pymysql://",
}


def _connect_args(url: str) -> dict[str, Any]:
    """Driver options bounding how long a connection attempt may take."""
    dialect = url.partition("://")[0].partition("+")[0]
    if dialect in ("postgresql", "mysql", "mariadb", "cockroachdb"):
        return {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}
    return {}


def check_database(url: str, field_name: str) -> None:
    """Connect to a database server once, before any work, and say in one line what is wrong.

    Checks that the SQLAlchemy driver is installed (a usage error: which extra to install), that
    the server answers within ``DEFAULT_CONNECT_TIMEOUT`` seconds and accepts the login (a
    :class:`~tlsweep.errors.ServiceError`, exit 1). The password is never printed. Creates
    nothing: a database that does not exist is reported, not made.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        u = make_url(url)
        u.get_dialect().import_dbapi()
    except ImportError as e:
        dialect = url.partition("://")[0].partition("+")[0]
        hint = _DRIVER_HINT.get(dialect, "install the driver SQLAlchemy names")
        raise ConfigError(
            f"{field_name}: {redact_url(url)}: the database driver is not installed "
            f"({redact_url(str(e))}); {hint}"
        ) from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as e:
        raise ConfigError(
            f"{field_name}: got '{redact_url(url)}'; not a database URL SQLAlchemy knows "
            f"({parse_complaint(url, str(e))}); expected e.g. "
            "postgresql://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    engine = sqlalchemy.create_engine(u, poolclass=NullPool, connect_args=_connect_args(url))
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.DBAPIError as e:
        reason = str(e.orig or e).strip().splitlines()
        why = reason[0][:300] if reason else type(e).__name__
        raise ServiceError(
            f"{field_name}: cannot connect to {redact_url(url)} ({redact_url(why, url)}); "
            "check that the server is running, the database exists and the user and password "
            "are right, then run the command again"
        ) from None
    finally:
        engine.dispose()


# Filesystems where SQLite's WAL (shared memory) and file locks do not work between machines.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p")


def network_filesystem(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the network filesystem ``path`` is on (``nfs4``, ``cifs``...), or None."""
    try:
        with open(mounts) as f:
            rows = [line.split() for line in f]
    except OSError:  # not Linux: cannot tell
        return None
    target = os.path.realpath(path)
    best, fstype = "", None
    for row in rows:
        if len(row) < 3:
            continue
        mount = row[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, row[2]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def check_local_sqlite(path: Path) -> None:
    """Refuse a SQLite storage on a network filesystem: WAL needs shared memory between the
    processes, and its file locks do not hold across machines, so workers would corrupt it."""
    fstype = network_filesystem(path.parent if not path.exists() else path)
    if fstype is not None:
        raise ConfigError(
            f"storage: {path} is on a network filesystem ({fstype}), where SQLite's locks and "
            "WAL do not work; for workers on several machines use a database server "
            "(storage: postgresql://... or mysql://...), or journal:FILE on the share; for one "
            "machine, put the database on a local disk"
        )


# Seconds a worker waits for a server's storage lock before saying so (MySQL's GET_LOCK timeout),
# and in all before giving up: the lock is held only while a trial is asked for and tagged.
LOCK_WAIT = 60
LOCK_GIVE_UP = 600


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """A mutex shared by every worker of a storage, held in or beside the storage itself.

    SQLite and ``journal:FILE``: ``flock`` on ``FILE.lock`` (released by the OS if its holder
    dies; a SQLite file on a network share is refused). ``journal:FILE`` on a network
    filesystem, where ``flock`` may not hold between machines: Optuna's symlink lock.
    PostgreSQL: ``pg_try_advisory_lock``. MySQL: ``GET_LOCK``. A wait on a server is logged
    every ``LOCK_WAIT`` s and fails after ``LOCK_GIVE_UP`` s naming the lock and its holder.
    """
    path = _sqlite_path(url) or (
        Path(url[len("journal:") :]) if url.startswith("journal:") else None
    )
    if path is not None and url.startswith("journal:") and network_filesystem(path.parent):
        from optuna.storages.journal import JournalFileSymlinkLock

        # link(2) is atomic on NFS; a holder that died is overridden after LOCK_WAIT seconds
        target = Path(f"{path}.tlsweep")
        target.touch(exist_ok=True)
        lock = JournalFileSymlinkLock(str(target), grace_period=LOCK_WAIT)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
        return
    if path is not None:
        from tlsweep.files import held_lock

        # a bounded wait, saying who holds it (pid, host, since: written into the file)
        with held_lock(Path(f"{path}.lock"), f"using the storage {path}", LOCK_GIVE_UP):
            yield
        return
    import sqlalchemy

    key = zlib.crc32(name.encode()) & 0x7FFFFFFF
    engine = _lock_engine(url)
    with engine.connect() as con:
        dialect = engine.dialect.name
        if dialect == "postgresql":
            _pg_lock(con, key, name)
            try:
                yield
            finally:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        elif dialect in ("mysql", "mariadb"):
            _mysql_get_lock(con, f"tlsweep{key}", name)
            try:
                yield
            finally:
                released = con.execute(
                    sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"tlsweep{key}"}
                ).scalar()
                if released != 1:
                    log.warning("MySQL RELEASE_LOCK returned %r, not 1 (lock lost?)", released)
        else:
            raise StudyError(
                f"storage: {redact_url(url)}: tlsweep has no worker lock for {dialect}; use "
                "sqlite:///FILE, journal:FILE, postgresql://... or mysql://..."
            )


def _pg_lock(con: Any, key: int, study: str) -> None:
    """``pg_try_advisory_lock`` every 0.5 s for ``LOCK_GIVE_UP`` s (not one endless wait)."""
    import sqlalchemy

    what = f"PostgreSQL advisory lock {key} of study '{study}'"
    start, said = time.monotonic(), 0
    while not con.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
        waited = time.monotonic() - start
        if waited >= LOCK_GIVE_UP:
            raise StudyFailing(_lock_timeout(what, _lock_holder(con, "postgresql", key)))
        if waited >= (said + 1) * LOCK_WAIT:
            said += 1
            log.warning(_WAITING, what, int(waited))
        time.sleep(0.5)


_WAITING = "waiting for the study's lock (%s), held by another worker for %ds"
# Who holds a lock, in one line (NULL if free): PostgreSQL's pg_locks (an advisory lock on a bigint
# key: classid 0, objid the key, objsubid 1) and pg_stat_activity; MySQL's IS_USED_LOCK, processes.
_HOLDER_SQL = {
    "postgresql": "SELECT 'server process ' || l.pid || ' (' || coalesce(a.application_name, '?')"
    " || ', user ' || coalesce(a.usename::text, '?') || coalesce(' from ' || host(a.client_addr),"
    " '') || coalesce(', connected since ' || date_trunc('second', a.backend_start), '') || ')'"
    " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype ="
    " 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = 0 AND"
    " l.objid::bigint = :k AND l.database = (SELECT oid FROM pg_database WHERE datname ="
    " current_database()) LIMIT 1",
    "mysql": "SELECT CONCAT('connection ', ID, ', user ', USER, ' from ', HOST, ', ', TIME,"
    " 's in its current state') FROM information_schema.PROCESSLIST WHERE ID = IS_USED_LOCK(:k)",
}


def _lock_holder(con: Any, dialect: str, key: int | str) -> str | None:
    """Who holds lock ``key``, or None when the server cannot or will not say."""
    import sqlalchemy

    try:
        found = con.execute(sqlalchemy.text(_HOLDER_SQL[dialect]), {"k": key}).scalar()
    except Exception as e:  # no rights on the server's views, a stand-in connection, ...
        log.debug("cannot ask the server who holds the lock: %s", e)
        return None
    return str(found) if found else None


def _lock_timeout(what: str, holder: str | None) -> str:
    """The one error line of a lock not had in ``LOCK_GIVE_UP`` seconds."""
    return (
        f"storage: another worker has held the study's lock, {what}, for over {LOCK_GIVE_UP}s"
        f"{f', by {holder}' if holder else ''}; a stopped or hung worker? Stop it (or end that "
        "connection) and run again"
    )


def _mysql_get_lock(con: Any, key: str, study: str = "?") -> None:
    """``GET_LOCK`` until it returns 1: 0 means it timed out (another worker holds it: wait
    again, up to ``LOCK_GIVE_UP`` seconds), NULL means an error."""
    import sqlalchemy

    what = f"MySQL lock '{key}' of study '{study}'"
    waited = 0
    while True:
        got = con.execute(
            sqlalchemy.text("SELECT GET_LOCK(:k, :t)"), {"k": key, "t": LOCK_WAIT}
        ).scalar()
        if got == 1:
            return
        if got is None:
            raise StudyFailing(
                f"storage: MySQL GET_LOCK('{key}') failed (returned NULL: out of memory or the "
                "thread was killed); run again"
            )
        waited += LOCK_WAIT
        if waited >= LOCK_GIVE_UP:
            raise StudyFailing(_lock_timeout(what, _lock_holder(con, "mysql", key)))
        log.warning(_WAITING, what, waited)


_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _ENGINES:
        args = _connect_args(url)
        if url.startswith("postgresql"):  # how pg_stat_activity names a holder to the others
            args["application_name"] = f"tlsweep pid {os.getpid()} on {socket.gethostname()}"[:63]
        _ENGINES[url] = sqlalchemy.create_engine(
            url, pool_size=1, pool_pre_ping=True, connect_args=args
        )
    return _ENGINES[url]


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a failing Optuna storage raises: Optuna wraps SQLAlchemy's errors in
    StorageInternalError; journal files and SQLite raise OSError and sqlite3.Error."""
    import optuna
    import sqlalchemy.exc

    return (
        optuna.exceptions.StorageInternalError,
        sqlalchemy.exc.SQLAlchemyError,
        sqlite3.Error,
        OSError,
    )


# --- the local SQLite storage, built and checked by tlsweep.stores ---------------------------
def _build_sqlite_storage(url: str) -> None:
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = RDBStorage(url)  # creates the tables, version_info and alembic_version
    storage.remove_session()
    storage.engine.dispose()


@cache
def _schema_head() -> str:
    import optuna.storages._rdb as rdb
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(os.path.join(os.path.dirname(rdb.__file__), "alembic"))
    return str(script.get_current_head())  # what Optuna's check_table_schema_compatibility uses


def _rows_with_data(con: sqlite3.Connection, tables: set[str]) -> int:
    return sum(
        count_rows(con, t)
        for t in sorted(tables)
        if t.removeprefix("_alembic_tmp_") not in ("alembic_version", "version_info")
    )


OPTUNA_STORE = StoreKind(
    field="storage",
    what="Optuna storage",
    lib="Optuna",
    holds="trials",
    build=_build_sqlite_storage,
    head=_schema_head,
    count_data=_rows_with_data,
    repair=lambda url: f"optuna storage upgrade --storage {url}",
)


def prepare_optuna(url: str, create: bool = True) -> None:
    """Make the Optuna storage at ``url`` safe to open, if it is a local SQLite file
    (:func:`tlsweep.stores.prepare`)."""
    prepare(url, OPTUNA_STORE, create)
