"""The worker machinery: storages, locks, liveness, heartbeats and recovery from dead workers.

Crash safety, using Optuna's own machinery:

* every running trial records a heartbeat (``RDBStorage(heartbeat_interval=...)``); a trial
  whose heartbeat went stale is failed by :func:`optuna.storages.fail_stale_trials` and its
  parameters are queued again by :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`;
* a trial whose worker ran on this host and is gone (``kill -9``) is failed and retried at once,
  without waiting for the grace period;
* Ctrl-C and SIGTERM fail the running trial and queue its parameters again.

Workers decide whether to start a trial under a lock held in the storage itself (a file lock
next to a SQLite/journal file, ``pg_advisory_lock`` on PostgreSQL, ``GET_LOCK`` on MySQL), so N
workers end with exactly ``n_trials`` finished trials.

What a trial *is* (its space, objective and reports) lives in :mod:`tlsweep.search`; this
module only decides who runs which trial, and keeps them alive.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tlsweep.config import DEFAULT_CONNECT_TIMEOUT, SweepConfig
from tlsweep.errors import ConfigError, ServiceError, StudyError, StudyFailing
from tlsweep.interrupts import deferred
from tlsweep.interrupts import requested as stop_requested
from tlsweep.search import (
    FINISHED,
    FeatureData,
    TrialOutcome,
    TrialResult,
    best_of,
    counts,
    open_study,
    run_trial,
    storage_errors,
    study_storage,
    trial_id,
)
from tlsweep.stores import prepare_optuna
from tlsweep.urls import redact_url

log = logging.getLogger(__name__)

WORKER_ATTR = "tlsweep.worker"


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
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
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
            f"({redact_url(str(e).splitlines()[0][:200])}); expected e.g. "
            "postgresql://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    engine = sqlalchemy.create_engine(u, poolclass=NullPool, connect_args=_connect_args(url))
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.DBAPIError as e:
        reason = str(e.orig or e).strip().splitlines()
        why = reason[0][:300] if reason else type(e).__name__
        if u.password:
            why = why.replace(u.password, "***")
        raise ServiceError(
            f"{field_name}: cannot connect to {redact_url(url)} ({redact_url(why)}); check that "
            "the server is running, the database exists and the user and password are right, "
            "then run the command again"
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


# Seconds a worker waits for the storage lock before saying so (MySQL's GET_LOCK timeout), and
# in all before giving up: the lock is held only while a trial is asked for and tagged.
LOCK_WAIT = 60
LOCK_GIVE_UP = 600


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """A mutex shared by every worker of a storage, held in or beside the storage itself.

    SQLite and ``journal:FILE``: ``flock`` on ``FILE.lock`` (released by the OS if its holder
    dies; a SQLite file on a network share is refused). ``journal:FILE`` on a network
    filesystem, where ``flock`` may not hold between machines: Optuna's symlink lock.
    PostgreSQL: ``pg_advisory_lock``. MySQL: ``GET_LOCK``, whose result is checked.
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
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    import sqlalchemy

    key = zlib.crc32(name.encode()) & 0x7FFFFFFF
    engine = _lock_engine(url)
    with engine.connect() as con:
        dialect = engine.dialect.name
        if dialect == "postgresql":
            con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                con.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        elif dialect in ("mysql", "mariadb"):
            _mysql_get_lock(con, f"tlsweep{key}")
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


def _mysql_get_lock(con: Any, key: str) -> None:
    """``GET_LOCK`` until it returns 1: 0 means it timed out (another worker holds it: wait
    again, up to ``LOCK_GIVE_UP`` seconds), NULL means an error."""
    import sqlalchemy

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
            raise StudyFailing(
                f"storage: another worker has held the study's lock ({key}) for over "
                f"{LOCK_GIVE_UP}s; a stopped or hung worker? Stop it and run again"
            )
        log.warning(
            "waiting for the study's lock (%s), held by another worker for %ds", key, waited
        )


_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(
            url, pool_size=1, pool_pre_ping=True, connect_args=_connect_args(url)
        )
    return _ENGINES[url]


# --- liveness ----------------------------------------------------------------------------------
def worker_id() -> str:
    """host:pid:start-time: enough to tell whether a worker on this host is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def worker_is_dead(worker: str) -> bool:
    """True only when ``worker`` ran on this host and that process is gone."""
    try:
        host, pid_s, start = worker.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _start_time(pid) != start


PARENT_PID_ENV = "TLSWEEP_PARENT_PID"  # set by `run --workers N` for its workers
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Make this worker get SIGTERM when the ``run --workers N`` process that started it dies.

    Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) covers every death, ``kill -9``
    included; elsewhere a thread watches the parent pid. If the parent died before the signal
    was armed, this process is re-parented already: it stops at once. The SIGTERM handler of the
    command then closes the running trial and its runs, as for a Ctrl-C.
    """
    import signal

    expected = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    armed = False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: no prctl in the C library
        armed = False
    if os.getppid() != expected:
        log.debug("the parent %d is gone before this worker started: stopping", expected)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not armed:

        def watch() -> None:
            while os.getppid() == expected:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="tlsweep-parent-watch", daemon=True).start()


class HeartbeatLost(Exception):
    """A running trial's heartbeat could not be recorded for longer than the grace period:
    other workers count the trial as dead and retry its parameters, so this run stops."""


class _Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds in a thread.

    A failure to record it (a dropped database connection, a full disk) is logged once and
    retried every interval; if no heartbeat was recorded for longer than ``grace_period``
    seconds, other workers take the trial as dead and run its parameters again, so
    :meth:`check` (called by the trial after every epoch) raises :class:`HeartbeatLost` and the
    trial fails here instead of running twice.
    """

    def __init__(self, storage: Any, trial_id: int, interval: float, grace_period: float):
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._grace = grace_period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tlsweep-heartbeat")
        self._last_ok = time.monotonic()  # the worker recorded one when it asked for the trial
        self._first_error: str | None = None
        self.lost: str | None = None  # why the trial must stop, once it must

    def _beat(self) -> None:
        try:
            self._storage.record_heartbeat(self._trial_id)
        except storage_errors() as e:
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
            silent = time.monotonic() - self._last_ok
            if self._first_error is None:
                self._first_error = error
                log.warning(
                    "trial heartbeat (storage id %d) could not be recorded (%s); retrying every "
                    "%gs for up to %gs",
                    self._trial_id,
                    error,
                    self._interval,
                    self._grace,
                )
            if silent > self._grace and self.lost is None:
                self.lost = (
                    f"no heartbeat recorded for {silent:.0f}s (search.grace_period: "
                    f"{self._grace:g}), so other workers take this trial as dead; first error: "
                    f"{self._first_error}"
                )
                log.error("stopping the trial: %s", self.lost)
            return
        except BaseException as e:  # not a storage error: a bug; stop the trial and show it
            self.lost = f"the heartbeat thread failed: {type(e).__name__}: {e}"
            raise
        if self._first_error is not None and self.lost is None:
            log.info("trial heartbeat recorded again after %s", self._first_error)
            self._first_error = None
        self._last_ok = time.monotonic()

    def _run(self) -> None:
        while True:
            self._beat()
            if self._stop.wait(self._interval):
                return

    def check(self) -> None:
        """Raise :class:`HeartbeatLost` if the trial must stop (called between epochs)."""
        if self.lost is not None:
            raise HeartbeatLost(self.lost)

    def __enter__(self) -> _Heartbeat:
        if hasattr(self._storage, "record_heartbeat"):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _age_seconds(start: datetime.datetime) -> float:
    """Seconds since ``start``: aware (JournalStorage) or naive local time (RDBStorage's
    getter turns the stored naive UTC into this machine's local time), compared in UTC."""
    if start.tzinfo is None:
        start = start.astimezone()  # naive means this machine's local time
    return (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds()


def run_may_still_be_closed(trial: Any, grace_period: float) -> bool:
    """Whether the worker of a finished trial may still be closing its MLflow run (it tells
    the study first): yes while that worker lives on this host; for a worker on another host,
    for ``grace_period`` seconds after the trial ended. Such a run is not stale."""
    w = trial.user_attrs.get(WORKER_ATTR) or trial.system_attrs.get(WORKER_ATTR)
    if not w or worker_is_dead(w):
        return False
    if w.rsplit(":", 2)[0] == socket.gethostname():
        return True
    done = trial.datetime_complete
    return done is not None and _age_seconds(done) < grace_period


def recover(
    study: Any,
    retry: Callable[[Any, Any], None] | None,
    grace_period: float = 30.0,
    lock: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> list[int]:
    """Fail the trials of dead workers and queue their parameters again; returns their numbers.

    A worker asks for a trial and tags it with its id under the storage lock, so a RUNNING
    trial without a tag seen while holding that ``lock`` belongs to a process killed in
    between (it has no heartbeat either, so Optuna's stale-trial check would never see it):
    no clock is compared, so clock skew between machines cannot fail a live trial. Without
    ``lock``, an untagged trial counts as orphaned once older than ``grace_period`` (in UTC).
    """
    import optuna
    from optuna.trial import TrialState

    failed = []
    with lock() if lock is not None else contextlib.nullcontext():
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        w = t.user_attrs.get(WORKER_ATTR) or t.system_attrs.get(WORKER_ATTR)
        orphan = not w and (
            lock is not None
            or (t.datetime_start is not None and _age_seconds(t.datetime_start) > grace_period)
        )
        if orphan or (w and worker_is_dead(w)):
            try:
                ok = study_storage(study).set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                ok = False
            if ok:
                failed.append(t.number)
                if retry is not None:
                    retry(study, study_storage(study).get_trial(t._trial_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    failed += sorted(after - before - set(failed))
    if failed:
        log.info("trial(s) %s were left running by a dead worker: failed and queued again", failed)
    return failed


class StudyRunner:
    """One worker on one study: starts trials until ``n_trials`` have finished."""

    def __init__(
        self,
        cfg: SweepConfig,
        features: dict[str, FeatureData],
        tracker: Any,
        on_trial: Callable[[TrialOutcome], None] | None = None,
        worker_index: int = 0,
    ):
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.cfg = cfg
        self.features = features
        self.tracker = tracker
        self.on_trial = on_trial
        self.storage = open_storage(cfg)
        data = {
            label: {"key": f.entry.key, "parts": f.entry.manifest["key_parts"]}
            for label, f in features.items()
        }
        self.study = open_study(cfg, self.storage, seed_offset=worker_index, data=data)
        self.worker = worker_id()
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.search.max_retry)

    def finished(self) -> int:
        c = counts(self.study)
        return sum(c[s] for s in FINISHED)

    def recover(self) -> None:
        recover(
            self.study,
            self.retry,
            self.cfg.search.grace_period,
            lock=lambda: storage_lock(self.cfg.storage, self.cfg.study),
        )
        if self.tracker is not None:
            trials = self.study.get_trials(deepcopy=False)
            states = {t.number: t.state.name for t in trials}
            grace = self.cfg.search.grace_period
            alive = {
                t.number
                for t in trials
                if t.state.name == "RUNNING" or run_may_still_be_closed(t, grace)
            }
            self.tracker.close_stale_runs(states, alive)

    def _next_trial(self) -> tuple[Any | None, bool]:
        """(trial to run or None, study done?) decided under the storage lock."""
        with storage_lock(self.cfg.storage, self.cfg.study):
            c = counts(self.study)
            done = sum(c[s] for s in FINISHED)
            if done >= self.cfg.search.n_trials:
                return None, True
            if c["WAITING"] == 0 and done + c["RUNNING"] >= self.cfg.search.n_trials:
                return None, False
            trial = self.study.ask()
            trial.set_user_attr(WORKER_ATTR, self.worker)
            if hasattr(self.storage, "record_heartbeat"):
                self.storage.record_heartbeat(trial_id(trial))
            return trial, False

    def run(self, stop: threading.Event | None = None) -> int:
        """Run trials until the study is done, the timeout passes or ``stop`` is set."""
        self.recover()
        deadline = (
            time.monotonic() + self.cfg.search.timeout if self.cfg.search.timeout else math.inf
        )
        ran = 0
        failing: list[tuple[int, str]] = []  # the trials failed in a row: (number, error)
        last_recover = time.monotonic()
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if stop_requested():  # an interrupt that a library turned into an error of its own
                raise KeyboardInterrupt
            # An interrupt between asking for a trial and the objective's handler that fails
            # it would leave it RUNNING: held until the objective releases it (``started``).
            with deferred() as started:
                trial, done = self._next_trial()
                if done:
                    break
                if trial is None:  # others run the last trials: wait, and watch for deaths
                    started()
                    if time.monotonic() - last_recover > 1.0:
                        self.recover()
                        last_recover = time.monotonic()
                    time.sleep(0.5)
                    continue
                result = self._run_trial(trial, started)
            ran += 1
            if result.state != "FAIL":
                failing.clear()
                continue
            failing.append((trial.number, result.error or "no error message"))
            self._stop_if_failing(failing)
        self.recover()
        return ran

    def _stop_if_failing(self, failing: list[tuple[int, str]]) -> None:
        """Log a failed trial (a repeated error once), and stop the study when
        ``search.max_failures`` trials failed in a row: it cannot succeed as it is."""
        number, error = failing[-1]
        first_number, first = failing[0]
        if len(failing) == 1 or error != first:
            log.warning("trial %d failed: %s", number, error)
        else:
            log.debug("trial %d failed the same way", number)
        limit = self.cfg.search.max_failures
        if len(failing) >= limit:
            raise StudyFailing(
                f"study '{self.cfg.study}': {len(failing)} trials in a row failed "
                f"(search.max_failures: {limit}), so the run stops; the first, trial "
                f"{first_number}: {first}; fix the cause and run again (finished trials are kept)"
            )

    def _run_trial(self, trial: Any, started: Callable[[], None]) -> TrialResult:
        study, tid = self.study, trial_id(trial)
        s = self.cfg.search
        heartbeat = _Heartbeat(self.storage, tid, s.heartbeat_interval, s.grace_period)
        result = run_trial(
            study,
            trial,
            self.cfg,
            self.features,
            self.tracker,
            self.worker,
            keep_alive=heartbeat,
            alive=heartbeat.check,
            requeue=lambda: self.retry(study, study_storage(study).get_trial(tid)),
            started=started,
        )
        if self.on_trial:
            best_value, best_number = best_of(study)
            self.on_trial(
                TrialOutcome(
                    trial.number,
                    result.state,
                    result.value,
                    result.params,
                    result.seconds,
                    self.finished(),
                    self.cfg.search.n_trials,
                    best_value,
                    best_number,
                    result.error,
                )
            )
        return result
