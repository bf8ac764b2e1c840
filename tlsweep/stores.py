"""Local SQLite stores (MLflow's tracking store, Optuna's storage): created atomically, checked.

MLflow builds a new tracking database with a chain of schema migrations (about 1.5 s) that
SQLite cannot run in one transaction; a process killed in the middle leaves a database every
later open fails on (``table _alembic_tmp_experiments already exists``), and two processes
migrating the same new file at once break each other. So a store that does not exist yet is
never built in place:

* its schema is built by MLflow (or Optuna) itself in a temporary file beside it
  (``<name>.tlsweep-tmp.<pid>.<host>.<random>``, same folder, so the final step is atomic),
  with SQLite's default rollback journal, every connection closed;
* it is then hard-linked to its final name, which fails if the name exists: a concurrent first
  run that finished first wins, and the loser drops its copy and uses the winner's. A kill
  therefore leaves no store or a complete one, plus perhaps a temporary file, which the next
  run removes once its process is gone.

A store that exists is checked before MLflow or Optuna open it (``sqlite3`` only, read through
SQLite, so a hot journal is rolled back first): leftover ``_alembic_tmp_*`` tables, a missing
or empty ``alembic_version``, or a schema revision other than the one the installed library
expects mean it was left half-built or half-upgraded. Without runs or trials it is rebuilt the
same way (one warning line); with data it is never touched: :class:`~tlsweep.errors.StoreError`
names the file, the problem and the command that repairs it.

The commits (link, or replace of a broken empty store) happen under an advisory ``flock`` of
the folder, so no two tlsweep processes commit or clean up beside each other at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tlsweep.errors import StoreError, TlsweepError, first_line

log = logging.getLogger(__name__)

TMP_MARK = ".tlsweep-tmp."
STALE_SECONDS = 600.0  # a temporary store untouched this long is a leftover, whoever made it
_SIDE_FILES = ("-journal", "-wal", "-shm")


# --- what differs between MLflow and Optuna (the tracking package and storage.py give it)
@dataclass(frozen=True)
class StoreKind:
    """One library's store: what this module needs of it, given by the library's owner
    (``tracking.MLFLOW_STORE``, ``storage.OPTUNA_STORE``), so that only they import it."""

    field: str  # the sweep file's key that names it: "tracking_uri"
    what: str  # "MLflow tracking store"
    lib: str  # "MLflow"
    holds: str  # what counts as data, for messages: "runs"
    build: Callable[[str], None]  # builds the schema in a new file at this sqlite:/// URL
    head: Callable[[], str]  # the schema revision the installed library expects
    count_data: Callable[[sqlite3.Connection, set[str]], int]
    repair: Callable[[str], str]  # the command that upgrades the store at this URL


def count_rows(con: sqlite3.Connection, table: str, where: str = "") -> int:
    """Rows of ``table`` (``where``: a SQL clause), for a kind's ``count_data``."""
    return int(con.execute(f'SELECT COUNT(*) FROM "{table}" {where}').fetchone()[0])


# --- entry points ------------------------------------------------------------------------------
def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL as SQLAlchemy reads it; None for anything else."""
    if not url.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - a bad URL is reported by whoever opens it
        return None
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:") or "uri" in u.query:
        return None
    return Path(db)


def prepare(url: str, kind: StoreKind, create: bool = True) -> None:
    """Make the store of ``kind`` at ``url`` safe to open, if it is a local SQLite file.

    A missing store is built atomically (``create``), a half-built empty one rebuilt, a
    half-built one with data refused with :class:`StoreError`.
    """
    path = sqlite_file(url)
    if path is not None:
        _prepare(path, url, kind, create)


def _prepare(path: Path, url: str, kind: StoreKind, create: bool) -> None:
    _remove_stale(path)
    for _ in range(5):  # each turn ends, or sees a store another process put in place
        try:
            st = path.stat()
        except FileNotFoundError:
            if not create:
                return
            tmp = _build(path, kind)
            _commit(tmp, path, None)  # False: another run's complete store went in first
            return
        except OSError:
            return  # unreadable: MLflow/Optuna say so when they open it
        problem = diagnose(path, kind)
        if problem is None:
            return
        _refuse_if_data(path, url, kind, problem)
        tmp = _build(path, kind)
        recheck = lambda: _refuse_if_data(path, url, kind, diagnose(path, kind))  # noqa: E731
        if _commit(tmp, path, st.st_ino, recheck):
            log.warning(
                "%s: a half-built %s without %s (%s): rebuilt it",
                path,
                kind.what,
                kind.holds,
                problem.what,
            )
            return
    raise StoreError(f"{path}: the {kind.what} keeps changing under this process; try again")


# --- checking a store --------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    what: str  # "leftover table _alembic_tmp_experiments"
    data: int  # rows a new store does not have


def diagnose(path: Path, kind: StoreKind) -> Problem | None:
    """What is wrong with the existing store at ``path``, or None when it is complete.

    A file SQLite cannot read at all is left to MLflow/Optuna, which report it.
    """
    try:
        con = sqlite3.connect(f"file:{_quote(path)}?mode=rw", uri=True, timeout=60)
    except sqlite3.Error:
        try:
            con = sqlite3.connect(f"file:{_quote(path)}?mode=ro", uri=True, timeout=60)
        except sqlite3.Error:
            return None
    try:
        with contextlib.closing(con):
            tables = {
                r[0]
                for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if not r[0].startswith("sqlite_")
            }
            leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
            revision = None
            if "alembic_version" in tables:
                rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
                revision = rows[0][0] if len(rows) == 1 else None
            if not tables:
                what = "no tables"
            elif leftovers:
                what = f"leftover table(s) {', '.join(leftovers)} of a cut migration"
            elif revision is None:
                what = "no schema revision in alembic_version"
            elif revision != kind.head():
                what = f"schema revision {revision}, this {kind.lib} expects {kind.head()}"
            else:
                return None
            return Problem(what, kind.count_data(con, tables))
    except sqlite3.DatabaseError:
        return None  # not a database: MLflow/Optuna say so


def _refuse_if_data(path: Path, url: str, kind: StoreKind, problem: Problem | None) -> None:
    if problem is not None and problem.data:
        raise StoreError(
            f"{path}: the {kind.what} is half-built or half-upgraded ({problem.what}) and holds "
            f"{kind.holds}, so tlsweep leaves it alone; back it up, then repair it with "
            f"'{kind.repair(url)}' (drop leftover _alembic_tmp_* tables first if it stops on "
            "them)"
        )


# --- building and committing -------------------------------------------------------------------
def tmp_name(path: Path) -> Path:
    host = zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}.{host:08x}.{secrets.token_hex(4)}")


def _build(path: Path, kind: StoreKind) -> Path:
    """A complete new store in a temporary file beside ``path``, every connection closed."""
    from sqlalchemy.engine import URL

    tmp = tmp_name(path)
    t0 = time.monotonic()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.open("xb").close()  # fails at once where MLflow would retry for 100 s
        kind.build(URL.create("sqlite", database=str(tmp.absolute())).render_as_string())
    except BaseException as e:
        _unlink_all(tmp)
        if not isinstance(e, Exception):
            raise
        first = first_line(e)
        if isinstance(e, OSError) and e.strerror:
            first = f"{e.strerror.lower()} in {path.parent}"
        raise TlsweepError(
            f"{kind.field}: cannot create the {kind.what} {path} ({first}); check the path"
        ) from None
    log.debug("built a new %s for %s in %.1f s", kind.what, path, time.monotonic() - t0)
    return tmp


def _commit(
    tmp: Path, path: Path, replace_ino: int | None, recheck: Callable[[], None] | None = None
) -> bool:
    """Put ``tmp`` in place: as a new store (``replace_ino`` None; never over one that appeared
    meanwhile) or over the broken store with inode ``replace_ino`` (unless it was replaced
    meanwhile). Returns whether ``tmp`` went in; it is gone either way."""
    try:
        with _folder_lock(path.parent):
            try:
                ino: int | None = path.stat().st_ino
            except FileNotFoundError:
                ino = None
            if ino != replace_ino:
                return False
            # A journal or WAL beside a store that is not there any more (or that is replaced)
            # would be replayed into the new file: it belongs to the old one.
            if replace_ino is None:
                for suffix in _SIDE_FILES:
                    _unlink(Path(f"{path}{suffix}"))
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as e:  # a file system without hard links
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    os.rename(tmp, path)  # checked above, under the folder lock
            else:
                if recheck is not None:
                    recheck()
                for suffix in _SIDE_FILES:
                    _unlink(Path(f"{path}{suffix}"))
                os.replace(tmp, path)
            return True
    finally:
        _unlink_all(tmp)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An advisory lock on the folder itself (no lock file left behind); best effort on file
    systems that cannot lock a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        from tlsweep.files import wait_flock

        with contextlib.suppress(OSError):  # bounded, says who waits for what
            wait_flock(fd, folder, f"committing a store in {folder}")
        yield
    finally:
        os.close(fd)  # releases the lock


# --- temporary files ---------------------------------------------------------------------------
def _remove_stale(path: Path) -> None:
    """Remove temporary stores beside ``path`` whose builder died (or idled ``STALE_SECONDS``)."""
    try:
        names = [n for n in os.listdir(path.parent or ".") if n.startswith(path.name + TMP_MARK)]
    except OSError:
        return
    host = f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"
    for name in names:
        f = path.parent / name
        fields = name[len(path.name + TMP_MARK) :].split(".")
        try:
            dead = fields[1] == host and not _alive(int(fields[0]))
            old = time.time() - f.stat().st_mtime > STALE_SECONDS
        except (IndexError, ValueError, OSError):
            continue
        if dead or old:
            _unlink(f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_all(tmp: Path) -> None:
    for suffix in ("", *_SIDE_FILES):
        _unlink(Path(f"{tmp}{suffix}"))


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def _quote(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.absolute()))
