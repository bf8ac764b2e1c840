"""The Optuna study: search space, sampler, pruner, storage, the worker loop and resume.

A study lives in an Optuna storage (SQLite by default, any RDB URL, or ``journal:FILE``) and is
shared by every worker and every invocation: running the same sweep again continues it until
``n_trials`` trials have *finished* (COMPLETE or PRUNED). Finished trials are never redone.

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

Logging to MLflow goes through a :class:`~tlsweep.tracking.Tracker` handed in by the caller.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlsweep.config import BackboneConfig, Param, SweepConfig
from tlsweep.errors import StudyError

log = logging.getLogger(__name__)

SPACE_ATTR = "tlsweep.space"
PARENT_ATTR = "tlsweep.mlflow_parent_run"
WORKER_ATTR = "tlsweep.worker"
FINISHED = ("COMPLETE", "PRUNED")


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
        engine_kwargs = {"pool_pre_ping": True}
        url = _pg_driver(url)
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
            raise StudyError(
                f"storage: cannot open {_redact(url)} ({first}); check the URL, the server and "
                "its driver (pip install psycopg2-binary for PostgreSQL)"
            ) from None


def _pg_driver(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy 2.1 defaults to psycopg 3, but
    the documented driver is psycopg2-binary; use psycopg2 when psycopg 3 is missing."""
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
                return "postgresql+psycopg2://" + url[len(scheme) :]
            return "postgresql://" + url[len(scheme) :]
    return url


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """A mutex shared by every worker of a storage, held in or beside the storage itself."""
    path = _sqlite_path(url) or (
        Path(url[len("journal:") :]) if url.startswith("journal:") else None
    )
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
            con.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 60)"), {"k": f"tlsweep{key}"})
            try:
                yield
            finally:
                con.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"tlsweep{key}"})
        else:
            yield


_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(_pg_driver(url), pool_size=1, pool_pre_ping=True)
    return _ENGINES[url]


# --- sampler, pruner, space --------------------------------------------------------------------
def make_sampler(cfg: SweepConfig, seed: int) -> Any:
    import optuna

    s = cfg.search.sampler
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if s == "gp":
        try:
            import scipy  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            raise StudyError(
                "search.sampler: 'gp' needs PyTorch and SciPy (pip install torch scipy); or use tpe"
            ) from None
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_space(cfg), seed=seed)


def grid_space(cfg: SweepConfig) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for p in cfg.search.space.values():
        if p.kind == "categorical":
            grid[p.name] = list(p.choices or ())
        elif p.kind == "int":
            grid[p.name] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.kind == "float":
            n = int(math.floor((p.high - p.low) / p.step + 1e-9)) + 1
            grid[p.name] = [round(p.low + i * p.step, 12) for i in range(n)]
    if len(cfg.backbones) > 1:
        grid["backbone"] = [b.label for b in cfg.backbones]
    return grid


def make_pruner(cfg: SweepConfig) -> Any:
    import optuna

    p = cfg.search.pruner
    if p == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if p == "hyperband":
        epochs = cfg.search.space["epochs"]
        max_resource = int(epochs.high if epochs.kind != "fixed" else epochs.value)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource)
    return optuna.pruners.NopPruner()


def suggest(trial: Any, cfg: SweepConfig) -> dict[str, Any]:
    """The trial's head parameters (sampled and fixed) and its backbone label."""
    out: dict[str, Any] = {}
    if len(cfg.backbones) > 1:
        out["backbone"] = trial.suggest_categorical("backbone", [b.label for b in cfg.backbones])
    else:
        out["backbone"] = cfg.backbones[0].label
    for p in cfg.search.space.values():
        out[p.name] = _suggest_one(trial, p)
    return out


def _suggest_one(trial: Any, p: Param) -> Any:
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices or ()))
    if p.kind == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


# --- the study ---------------------------------------------------------------------------------
def open_study(cfg: SweepConfig, storage: Any, seed_offset: int = 0, create: bool = True) -> Any:
    """Create or resume the study; refuse one whose search space changed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not create:
        try:
            return optuna.load_study(study_name=cfg.study, storage=storage)
        except KeyError:
            raise StudyError(
                f"no study '{cfg.study}' in {_redact(cfg.storage)}; run 'tlsweep run "
                f"{cfg.path.name}' first"
            ) from None
    n_existing = 0
    with contextlib.suppress(KeyError):
        n_existing = len(optuna.load_study(study_name=cfg.study, storage=storage).trials)
    seed = cfg.search.seed + 7919 * seed_offset + n_existing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.create_study(
                study_name=cfg.study,
                storage=storage,
                sampler=make_sampler(cfg, seed),
                pruner=make_pruner(cfg),
                direction=cfg.search.direction,
                load_if_exists=True,
            )
        except ValueError as e:
            raise StudyError(
                f"study '{cfg.study}': {e}; use a new name with --study NAME or study: in the file"
            ) from None
    fingerprint = cfg.space_fingerprint()
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, fingerprint)
        study.set_user_attr("tlsweep.space_json", _space_json(cfg))
    elif stored != fingerprint:
        raise StudyError(
            f"study '{cfg.study}' in {_redact(cfg.storage)} was made with a different search space "
            "(backbones, space, metric or direction changed); start a new study with --study "
            f"NEW_NAME (or a new study: name), or delete the old one: optuna delete-study "
            f"--study-name {cfg.study} --storage {_redact(cfg.storage)}"
        )
    return study


def _space_json(cfg: SweepConfig) -> dict[str, Any]:
    d = {n: p.to_json() for n, p in cfg.search.space.items()}
    d["backbone"] = [b.label for b in cfg.backbones]
    return d


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


class _Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds in a thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._storage.record_heartbeat(self._trial_id)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> _Heartbeat:
        if hasattr(self._storage, "record_heartbeat"):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def recover(
    study: Any, retry: Callable[[Any, Any], None] | None, grace_period: float = 30.0
) -> list[int]:
    """Fail the trials of dead workers and queue their parameters again; returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get(WORKER_ATTR) or t.system_attrs.get(WORKER_ATTR)
        # A worker tags its trial within milliseconds of asking for it; an untagged trial older
        # than the grace period was asked for by a process killed in between (no heartbeat
        # either, so Optuna's stale-trial check would never see it).
        orphan = (
            not w
            and t.datetime_start is not None
            and ((datetime.datetime.now() - t.datetime_start).total_seconds() > grace_period)
        )
        if orphan or (w and worker_is_dead(w)):
            try:
                ok = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                ok = False
            if ok:
                failed.append(t.number)
                if retry is not None:
                    retry(study, study._storage.get_trial(t._trial_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    failed += sorted(after - before - set(failed))
    if failed:
        log.info("trial(s) %s were left running by a dead worker: failed and queued again", failed)
    return failed


# --- running trials ----------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    """What the CLI shows for one finished trial."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    seconds: float
    finished: int
    n_trials: int
    best_value: float | None
    best_number: int | None
    error: str | None = None


@dataclass
class FeatureData:
    """One backbone's cached features, loaded once per process and shared by every trial."""

    backbone: BackboneConfig
    entry: Any
    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    n_classes: int
    sizes: dict[str, int] = field(default_factory=dict)


def load_features(backbones: list[tuple[BackboneConfig, Any]]) -> dict[str, FeatureData]:
    """Memory-map every entry's train and validation split once (never the test split)."""
    from tlsweep.head import as_tensor

    out = {}
    for bb, entry in backbones:
        xt, yt = entry.split("train")
        xv, yv = entry.split("validation")
        if len(yt) == 0 or len(yv) == 0:
            which = "training" if len(yt) == 0 else "validation"
            raise StudyError(
                f"{entry.manifest['data_dir']}: no usable {which} images after skipping "
                "unreadable files; add images or check the folder"
            )
        out[bb.label] = FeatureData(
            bb,
            entry,
            as_tensor(xt),
            yt,
            as_tensor(xv),
            yv,
            len(entry.class_names),
            entry.split_sizes(),
        )
    return out


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
        self.study = open_study(cfg, self.storage, seed_offset=worker_index)
        self.worker = worker_id()
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.search.max_retry)

    def counts(self) -> dict[str, int]:
        out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def finished(self) -> int:
        c = self.counts()
        return c["COMPLETE"] + c["PRUNED"]

    def recover(self) -> None:
        recover(self.study, self.retry, self.cfg.search.grace_period)
        if self.tracker is not None:
            states = {t.number: t.state.name for t in self.study.get_trials(deepcopy=False)}
            alive = {n for n, s in states.items() if s == "RUNNING"}
            self.tracker.close_stale_runs(states, alive)

    def _next_trial(self) -> tuple[Any | None, bool]:
        """(trial to run or None, study done?) decided under the storage lock."""
        with storage_lock(self.cfg.storage, self.cfg.study):
            c = self.counts()
            done = c["COMPLETE"] + c["PRUNED"]
            if done >= self.cfg.search.n_trials:
                return None, True
            if c["WAITING"] == 0 and done + c["RUNNING"] >= self.cfg.search.n_trials:
                return None, False
            trial = self.study.ask()
            trial.set_user_attr(WORKER_ATTR, self.worker)
            if hasattr(self.storage, "record_heartbeat"):
                self.storage.record_heartbeat(trial._trial_id)
            return trial, False

    def run(self, stop: threading.Event | None = None) -> int:
        """Run trials until the study is done, the timeout passes or ``stop`` is set."""
        self.recover()
        deadline = (
            time.monotonic() + self.cfg.search.timeout if self.cfg.search.timeout else math.inf
        )
        ran = 0
        last_recover = time.monotonic()
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            trial, done = self._next_trial()
            if done:
                break
            if trial is None:  # others are running the last trials: wait, and watch for deaths
                if time.monotonic() - last_recover > 1.0:
                    self.recover()
                    last_recover = time.monotonic()
                time.sleep(0.5)
                continue
            self._run_trial(trial)
            ran += 1
        self.recover()
        return ran

    def _run_trial(self, trial: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        from tlsweep.head import HeadParams, train_head

        t0 = time.perf_counter()
        cfg = self.cfg
        metric = cfg.search.metric
        params = suggest(trial, cfg)
        data = self.features[params["backbone"]]
        bb = data.backbone
        logged = {
            **params,
            "backbone_name": bb.name,
            "input_size": bb.input_size,
            "pooling": bb.pooling,
            "weights": bb.weights,
            "backbone_args": dict(bb.args),
            "cache_key": data.entry.key,
            "data_dir": str(cfg.data.dir),
            "train_size": data.sizes["train"],
            "validation_size": data.sizes["validation"],
            "test_size": data.sizes["test"],
            "seed": cfg.search.seed,
            "trial_number": trial.number,
        }
        run_id = (
            self.tracker.start_trial(trial.number, logged, self.worker) if self.tracker else None
        )
        history: list[dict[str, float]] = []

        def on_epoch(m: Any) -> None:
            history.append(m.as_dict())
            value = getattr(m, metric)
            trial.report(value, m.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

        state, value, error = "FAIL", None, None
        hp = HeadParams.from_dict({**params, "seed": cfg.search.seed})
        with _Heartbeat(self.storage, trial._trial_id, cfg.search.heartbeat_interval):
            try:
                train_head(
                    data.x_train,
                    data.y_train,
                    data.x_val,
                    data.y_val,
                    data.n_classes,
                    hp,
                    on_epoch=on_epoch,
                )
                value = history[-1][metric]
                self.study.tell(trial, value)
                state = "COMPLETE"
            except optuna.TrialPruned:
                value = history[-1][metric] if history else None
                self.study.tell(trial, state=TrialState.PRUNED)
                state = "PRUNED"
            except BaseException as e:  # noqa: BLE001 - a failed trial lets the study go on
                error = f"{type(e).__name__}: {e}"
                with contextlib.suppress(Exception):
                    self.study.tell(trial, state=TrialState.FAIL)
                interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
                if interrupted:  # the user stopped us mid-trial: run these parameters again
                    with contextlib.suppress(Exception):
                        self.retry(self.study, self.study._storage.get_trial(trial._trial_id))
                if self.tracker and run_id:
                    with contextlib.suppress(Exception):
                        self.tracker.end_trial(run_id, "FAIL", history, {}, error)
                if interrupted:
                    raise
                log.warning("trial %d failed: %s", trial.number, error)
        if self.tracker and run_id and state != "FAIL":
            # The trial's value is the last point of its per-epoch `metric` curve, which MLflow
            # already shows as the run's value (the highest step); logging it again at step 0
            # would add a second point to the curve's first epoch.
            final = {"epochs_run": len(history), "trial_seconds": time.perf_counter() - t0}
            self.tracker.end_trial(run_id, state, history, final, value=value)
        if self.on_trial:
            best_value, best_number = self.best()
            self.on_trial(
                TrialOutcome(
                    trial.number,
                    state,
                    value,
                    params,
                    time.perf_counter() - t0,
                    self.finished(),
                    cfg.search.n_trials,
                    best_value,
                    best_number,
                    error,
                )
            )

    def best(self) -> tuple[float | None, int | None]:
        try:
            b = self.study.best_trial
            return b.value, b.number
        except ValueError:
            return None, None
