"""The local SQLite stores: built atomically, never wedged by a kill or a concurrent first run.

The default tests drive :mod:`tlsweep.stores` in spawned processes that import MLflow and Optuna
before they build (so a kill lands inside the schema build, not in an import). Never ``fork``: a
pytest worker may have loaded TensorFlow (threads) already, and a forked child of it can crash.
The kill loop over the whole command line is marked slow.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, write_sweep

from tlsweep import stores, tracking
from tlsweep.errors import StoreError
from tlsweep.study import _storage as storage

# A fresh interpreter per child: forking a process that has loaded TensorFlow (or any threaded
# library) may crash the child, depending on which tests this worker ran before.
SPAWN = multiprocessing.get_context("spawn")
KINDS = {"mlflow": tracking.MLFLOW_STORE, "optuna": storage.OPTUNA_STORE}
PREPARE: dict[str, Callable[[str], None]] = {
    "mlflow": tracking.prepare_mlflow,
    "optuna": storage.prepare_optuna,
}


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if stores.TMP_MARK in p.name)


def _usable(kind: str, path: Path, name: str = "probe") -> None:
    """Open the store with the library itself and write to it (a run, or a trial)."""
    if kind == "mlflow":
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=_url(path))
        exp = client.create_experiment(name)
        client.create_run(exp)
        assert client.get_experiment_by_name("Default") is not None
    else:
        import optuna

        study = optuna.create_study(storage=_url(path), study_name=name)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)


def _import_stores() -> None:
    """Import what building a store needs, so a child is past its imports before it builds."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import optuna  # noqa: F401


def _prepare(kind: str, url: str, timing: str | None = None) -> None:
    """A child's job: build the store at ``url``; write the build's seconds to ``timing``."""
    _import_stores()
    t0 = time.monotonic()
    PREPARE[kind](url)
    if timing is not None:
        Path(timing).write_text(repr(time.monotonic() - t0))


def _build_in_child(kind: str, path: Path, timing: Path | None = None) -> multiprocessing.Process:
    p = SPAWN.Process(target=_prepare, args=(kind, _url(path), timing and str(timing)))
    p.start()
    return p


def _first_run(kind: str, path: Path, i: int, go: Any) -> None:
    """A child's job: wait for ``go``, then build the store (or find it built) and use it."""
    _import_stores()
    go.wait()
    PREPARE[kind](_url(path))
    _usable(kind, path, f"w{i}")


def _mlflow_store(url: str, artifacts: str) -> None:
    """A child's job: MLflow itself builds its store (as an older tlsweep did)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(url, artifacts)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, float]]:
    """One store of each kind built by ``prepare`` in a child, and how long the build took
    (the build alone, timed in the child after its imports)."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(f"built_{kind}")
        timing = tmp_path_factory.mktemp(f"timing_{kind}") / "seconds"
        p = _build_in_child(kind, folder / "store.db", timing)
        p.join()
        assert p.exitcode == 0
        out[kind] = (folder / "store.db", float(timing.read_text()))
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- a new store -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_new_store_is_complete_and_alone(built: dict[str, tuple[Path, float]], kind: str) -> None:
    path, _ = built[kind]
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.db"]
    assert stores.diagnose(path, KINDS[kind]) is None
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    if kind == "mlflow":  # experiment 0 points where MLflow itself would put it: ./mlruns/0
        with sqlite3.connect(path) as con:
            (loc,) = con.execute("SELECT artifact_location FROM experiments").fetchone()
        assert loc == str(Path.cwd() / "mlruns" / "0"), loc
    _usable(kind, _copy(path, path.parent / "copy" / "store.db"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_kill_while_building_leaves_no_store_or_a_complete_one(
    built: dict[str, tuple[Path, float]], kind: str, tmp_path: Path
) -> None:
    _, seconds = built[kind]
    outcomes = []
    for i, fraction in enumerate((0.05, 0.35, 0.7, 0.97)):
        path = tmp_path / f"f{i}" / "store.db"
        path.parent.mkdir()
        p = _build_in_child(kind, path)
        while p.is_alive() and not (path.exists() or _tmp_files(path.parent)):
            time.sleep(0.002)
        time.sleep(fraction * seconds)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        if path.exists():
            assert stores.diagnose(path, KINDS[kind]) is None, f"killed at {fraction}: half-built"
            outcomes.append("complete")
        else:
            assert _tmp_files(path.parent), "the build left no trace: was it killed at all?"
            outcomes.append("none")
        stores._remove_stale(path)  # the next run removes what the dead build left
        assert _tmp_files(path.parent) == []
        assert sorted(x.name for x in path.parent.iterdir()) in ([], ["store.db"])
    assert "none" in outcomes, outcomes  # some kill did land inside a build
    # The next run of a folder whose first run was killed builds the store and uses it.
    path = tmp_path / f"f{outcomes.index('none')}" / "store.db"
    PREPARE[kind](_url(path))
    assert stores.diagnose(path, KINDS[kind]) is None
    _usable(kind, path)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_concurrent_first_runs_share_one_store(
    built: dict[str, tuple[Path, float]], kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "store.db"
    go = SPAWN.Event()
    procs = [SPAWN.Process(target=_first_run, args=(kind, path, i, go)) for i in range(3)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert stores.diagnose(path, KINDS[kind]) is None
    assert _tmp_files(tmp_path) == []
    # Every process wrote into the one store in place (none into a file replaced under it).
    with sqlite3.connect(path) as con:
        if kind == "mlflow":
            names = {r[0] for r in con.execute("SELECT name FROM experiments")}
            assert {"w0", "w1", "w2"} <= names
        else:
            assert con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 3


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = stores.tmp_name(path)  # this process is alive: its build is going on
    theirs = Path(str(stores.tmp_name(path)).replace(f".{os.getpid()}.", f".{dead.pid}.", 1))
    other_host = path.with_name(f"{path.name}{stores.TMP_MARK}{dead.pid}.00000000.abcd")
    old_other_host = path.with_name(f"{path.name}{stores.TMP_MARK}{dead.pid}.00000000.ef01")
    for f in (mine, theirs, Path(f"{theirs}-journal"), other_host, old_other_host):
        f.write_bytes(b"x")
    past = time.time() - stores.STALE_SECONDS - 5
    os.utime(old_other_host, (past, past))
    stores._remove_stale(path)
    assert _tmp_files(tmp_path) == sorted([mine.name, other_host.name])


def test_a_wal_left_by_a_deleted_store_is_not_replayed_into_the_new_one(
    built: dict[str, tuple[Path, float]], tmp_path: Path
) -> None:
    """A user deletes a killed run's optuna.db but not its -wal: the new store ignores it."""
    old = _copy(built["optuna"][0], tmp_path / "old" / "store.db")
    con = sqlite3.connect(old)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("INSERT INTO studies (study_name, study_id) VALUES ('ghost', 7)")
    con.commit()
    path = tmp_path / "store.db"
    shutil.copy(f"{old}-wal", f"{path}-wal")  # as a kill -9 leaves it
    con.close()
    storage.prepare_optuna(_url(path))
    assert not Path(f"{path}-wal").exists()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 0


# --- a half-built store ------------------------------------------------------------------------
def _half_build(kind: str, path: Path, how: str) -> None:
    with sqlite3.connect(path) as con:
        if how == "leftover":
            con.execute(
                "CREATE TABLE _alembic_tmp_experiments AS SELECT * FROM experiments"
                if kind == "mlflow"
                else "CREATE TABLE _alembic_tmp_trials AS SELECT * FROM trials"
            )
        else:
            con.execute("DELETE FROM alembic_version")
    con.close()


def _add_data(kind: str, path: Path) -> None:
    _usable(kind, path, "real")


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("how", ["leftover", "no-revision"])
def test_a_half_built_empty_store_is_rebuilt_with_one_line(
    built: dict[str, tuple[Path, float]],
    kind: str,
    how: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = _copy(built[kind][0], tmp_path / "store.db")
    _half_build(kind, path, how)
    assert stores.diagnose(path, KINDS[kind]) is not None
    with caplog.at_level(logging.WARNING, logger="tlsweep"):
        PREPARE[kind](_url(path))
    (rec,) = [r for r in caplog.records if r.name == "tlsweep.stores"]
    assert str(path) in rec.getMessage() and "rebuilt" in rec.getMessage()
    assert stores.diagnose(path, KINDS[kind]) is None
    assert _tmp_files(tmp_path) == []
    _usable(kind, path)


def test_a_store_cut_by_a_kill_inside_mlflow_is_rebuilt(
    built: dict[str, tuple[Path, float]], tmp_path: Path
) -> None:
    """The issue's case: MLflow itself (an older tlsweep) killed inside its migrations."""
    problem = None
    for fraction in (0.5, 0.25, 0.1, 0.03):  # earlier, if the build was over (a quieter machine)
        path = tmp_path / f"at{fraction}" / "mlflow.db"
        path.parent.mkdir()
        p = SPAWN.Process(target=_mlflow_store, args=(_url(path), str(path.parent / "mlruns")))
        p.start()
        while not path.exists():
            time.sleep(0.002)
        time.sleep(built["mlflow"][1] * fraction)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        problem = stores.diagnose(path, tracking.MLFLOW_STORE)
        if problem is not None:
            break
    assert problem is not None and problem.data == 0
    tracking.prepare_mlflow(_url(path))
    _usable("mlflow", path)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("how", ["leftover", "no-revision"])
def test_a_half_built_store_with_data_is_left_alone(
    built: dict[str, tuple[Path, float]], kind: str, how: str, tmp_path: Path
) -> None:
    path = _copy(built[kind][0], tmp_path / "store.db")
    _add_data(kind, path)
    _half_build(kind, path, how)
    before = _digest(path)
    with pytest.raises(StoreError) as e:
        PREPARE[kind](_url(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert ("mlflow db upgrade" if kind == "mlflow" else "optuna storage upgrade") in msg
    assert ("_alembic_tmp_" if how == "leftover" else "alembic_version") in msg
    assert _digest(path) == before and _tmp_files(tmp_path) == []


def test_the_cli_refuses_a_half_built_tracking_store_with_runs(
    built: dict[str, tuple[Path, float]],
    cats_dogs_small: Path,
    cd_features: object,
    shared_cache: Path,
    tmp_path: Path,
) -> None:
    path = _copy(built["mlflow"][0], tmp_path / "mlflow.db")
    _add_data("mlflow", path)
    _half_build("mlflow", path, "leftover")
    before = _digest(path)
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small, cache_dir=shared_cache)
    r = run_cli("run", str(sweep), "-q", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("tlsweep:")]
    assert len(lines) == 1 and lines[0].startswith("tlsweep: error: "), r.stderr
    assert str(path) in lines[0] and "mlflow db upgrade" in lines[0]
    assert _digest(path) == before
    assert not (tmp_path / "optuna.db").exists()


# --- the whole command line, killed while it builds each store --------------------------------
KILL_STEP = 0.1  # seconds between the kill points of consecutive fresh folders


def _kill_after(cmd: list[str], cwd: Path, store: Path, delay: float) -> bool:
    """Start ``cmd``; once ``store`` or its temporary file appears, SIGKILL it ``delay`` s later.

    Returns whether the store was complete when the kill landed."""
    p = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    mark = store.name + stores.TMP_MARK
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if store.exists() or any(n.startswith(mark) for n in os.listdir(cwd)):
            break
        time.sleep(0.005)
    time.sleep(delay)
    assert p.poll() is None, "the run ended before it was killed"
    p.kill()
    p.wait()
    return store.exists() and not any(n.startswith(mark) for n in os.listdir(cwd))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["mlflow.db", "optuna.db"])
def test_cli_killed_at_steps_while_building_a_store_then_reruns(
    cats_dogs_small: Path, cd_features: object, shared_cache: Path, tmp_path: Path, store: str
) -> None:
    """The issue's check: fresh folders whose first run is killed at 0.1 s steps while each
    store is being built (until a kill lands after it was built); every rerun succeeds."""
    search = {
        "n_trials": 1,
        "sampler": "random",
        "pruner": "none",
        "space": {
            "units": 16,
            "dropout": 0.0,
            "learning_rate": 1e-3,
            "batch_size": 32,
            "epochs": 1,
        },
    }
    for step in range(40):
        folder = tmp_path / f"k{step}"
        folder.mkdir()
        sweep = write_sweep(
            folder / "sweep.yaml", cats_dogs_small, cache_dir=shared_cache, search=search
        )
        cmd = [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q"]
        built_already = _kill_after(cmd, folder, folder / store, KILL_STEP * step)
        r = run_cli("run", str(sweep), "-q", cwd=folder)
        assert r.returncode == 0, f"killed {KILL_STEP * step:.1f} s in: {r.stderr[-2000:]}"
        with sqlite3.connect(folder / "optuna.db") as con:
            states = [r[0] for r in con.execute("SELECT state FROM trials")]
        assert states.count("COMPLETE") == 1 and "RUNNING" not in states, states
        con.close()
        with sqlite3.connect(folder / "mlflow.db") as con:
            parents = con.execute(
                "SELECT COUNT(*) FROM tags WHERE key = 'tlsweep.role' AND value = 'study'"
            ).fetchone()[0]
        con.close()
        assert parents == 1
        assert _tmp_files(folder) == []
        for db in ("mlflow.db", "optuna.db"):
            kind = tracking.MLFLOW_STORE if db == "mlflow.db" else storage.OPTUNA_STORE
            assert stores.diagnose(folder / db, kind) is None
        if built_already:
            break
    else:
        pytest.fail(f"{store} was still being built {KILL_STEP * step:.1f} s in")
    assert step >= 1, "the first kill already came after the store was built"


@pytest.mark.parametrize("broken", ["storage", "tracking store"])
def test_a_refused_run_leaves_no_new_store_behind(
    built: dict[str, tuple[Path, float]],
    cats_dogs_small: Path,
    cd_features: object,
    shared_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
) -> None:
    """A storage that cannot be opened leaves no mlflow.db (MLflow's default, in the current
    folder); a tracking store that is refused leaves no optuna.db."""
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.errors import TlsweepError
    from tlsweep.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if broken == "storage":  # nothing listens on port 1
        extra = {"storage": "postgresql://u:p@127.0.0.1:1/x", "tracking_uri": None}
    else:
        path = _copy(built["mlflow"][0], tmp_path / "mlflow.db")
        _add_data("mlflow", path)
        _half_build("mlflow", path, "no-revision")
        extra = {}
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small, cache_dir=shared_cache, **extra)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TlsweepError):
        run_sweep(load_sweep(sweep))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- a worker lock held on a database server: a bounded wait that names the holder -----------
class _Waiting(logging.Handler):
    """Sets ``seen`` when a worker logs that it waits for the study's lock."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        import threading

        self.seen = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for the study's lock" in record.getMessage():
            self.lines.append(record.getMessage())
            self.seen.set()


def _hold_then_wait(
    kind: str, monkeypatch: pytest.MonkeyPatch, release_when_waiting: bool
) -> tuple[dict, list[str], str, str]:
    """Hold the study's lock on the ``kind`` server from another connection while a worker's
    storage_lock waits for it (LOCK_WAIT 1 s, LOCK_GIVE_UP 3 s, or released once the worker
    says it waits); what the worker got, what it logged, the lock's key and the holder's id."""
    import threading
    import uuid
    import zlib

    import sqlalchemy
    from conftest import server_url

    from tlsweep.errors import StudyFailing

    url = server_url(kind)
    name = f"held-{uuid.uuid4().hex[:8]}"
    key = zlib.crc32(name.encode()) & 0x7FFFFFFF
    monkeypatch.setattr(storage, "LOCK_WAIT", 1)
    monkeypatch.setattr(storage, "LOCK_GIVE_UP", 600 if release_when_waiting else 3)
    handler = _Waiting()
    lg = logging.getLogger("tlsweep.study._storage")
    lg.addHandler(handler)
    monkeypatch.setattr(lg, "level", logging.DEBUG)
    pg = kind == "postgres"
    args = {"application_name": "tlsweep-test-holder"} if pg else {}
    engine = sqlalchemy.create_engine(url, connect_args=args)
    result: dict = {}

    def worker() -> None:
        try:
            with storage.storage_lock(url, name):
                result["got"] = True
        except StudyFailing as e:
            result["error"] = str(e)

    try:
        with engine.connect() as con:
            if pg:
                con.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                me = con.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
            else:
                k = f"tlsweep{key}"
                assert con.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 5)"), {"k": k}).scalar()
                me = con.execute(sqlalchemy.text("SELECT CONNECTION_ID()")).scalar()
            t = threading.Thread(target=worker, daemon=True)
            t.start()
            if release_when_waiting:
                assert handler.seen.wait(120), "the worker never said it was waiting"
                unlock = "pg_advisory_unlock(:k)" if pg else "RELEASE_LOCK(:k)"
                con.execute(sqlalchemy.text(f"SELECT {unlock}"), {"k": key if pg else k})
            t.join(120)  # a bound for the test only: the old lock waited for ever
            assert not t.is_alive(), "the worker still waits for the lock"
    finally:
        lg.removeHandler(handler)
        engine.dispose()
    return result, handler.lines, str(key), str(me)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def test_a_server_lock_held_too_long_is_one_error_naming_the_lock_and_its_holder(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, waits, key, holder = _hold_then_wait(kind, monkeypatch, release_when_waiting=False)
    assert "got" not in result, "the worker took a lock another connection holds"
    msg = result["error"]
    assert "\n" not in msg and msg.startswith("storage: another worker has held the study's lock")
    assert key in msg and "study 'held-" in msg  # the lock, named
    if kind == "postgres":  # its holder, as pg_locks and pg_stat_activity tell it
        assert f"server process {holder} (tlsweep-test-holder, user " in msg, msg
    else:
        assert f"by connection {holder}, user " in msg, msg
    assert waits and key in waits[0]  # the wait was logged, naming the lock


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def test_a_server_lock_released_while_a_worker_waits_is_taken(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, waits, key, _ = _hold_then_wait(kind, monkeypatch, release_when_waiting=True)
    assert result == {"got": True} and waits and key in waits[0]
