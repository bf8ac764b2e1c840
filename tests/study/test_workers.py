"""Several worker processes on one study: every trial once, one extraction per backbone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    CATS_DOGS,
    TINY,
    TWO_MOBILENETS,
    create_database,
    run_cli,
    server_url,
    small_copy,
    write_sweep,
)

pytestmark = pytest.mark.slow


def _search(n: int, epochs: int, high: int = 64) -> dict:
    return {
        "n_trials": n,
        "sampler": "random",
        "pruner": "none",
        "space": {
            "units": {"low": 8, "high": high, "log": True},
            "dropout": {"low": 0.0, "high": 0.3},
            "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
            "batch_size": {"choices": [32]},
            "epochs": epochs,
        },
    }


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def _check_mlflow(tracking: str, study: str, n: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    children = [r for r in runs if r.data.tags.get("tlsweep.role") != "study"]
    assert len(parents) == 1
    assert len(children) == n, len(children)
    pid = parents[0].info.run_id
    assert all(r.data.tags.get("mlflow.parentRunId") == pid for r in children)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert numbers == list(range(n)), numbers


def _check_study(storage: str, study: str, n: int) -> None:
    import optuna

    s = optuna.load_study(study_name=study, storage=storage)
    states = [t.state for t in s.get_trials(deepcopy=False)]
    finished = [
        st
        for st in states
        if st in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) == n, states
    assert optuna.trial.TrialState.FAIL not in states
    assert optuna.trial.TrialState.RUNNING not in states


def test_three_workers_sqlite(cats_dogs_small: Path, tmp_path: Path):
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small, study="w3", search=_search(9, 3))
    r = run_cli("run", str(sweep), "--workers", "3", "-q")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    _check_study(f"sqlite:///{tmp_path / 'optuna.db'}", "w3", 9)
    entries = _cache_entries(tmp_path / "cache")
    assert len(entries) == 1 and ".tmp-" not in entries[0], entries
    _check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", "w3", 9)


@pytest.mark.postgres
def test_four_workers_postgres(cats_dogs_small: Path, tmp_path: Path):
    url = server_url("postgres")
    study = f"pg-{uuid.uuid4().hex[:10]}"
    tracking = create_database(url, f"mlflow_{uuid.uuid4().hex[:10]}")
    backbones = TWO_MOBILENETS
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        cats_dogs_small,
        study=study,
        backbones=backbones,
        search=_search(40, 2, high=32),
    )
    # both stores on PostgreSQL, through the one driver of the [postgres] extra (psycopg 3)
    r = run_cli(
        "run",
        str(sweep),
        "--workers",
        "4",
        "--storage",
        url,
        "--tracking-uri",
        tracking,
        "-q",
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    _check_study(url, study, 40)
    entries = _cache_entries(tmp_path / "cache")
    assert len(entries) == 2, entries
    assert {e.split("-")[0] for e in entries} == {"MobileNetV2", "MobileNet"}
    _check_mlflow(tracking, study, 40)
    # the sqlite stores of the sweep file were not used
    assert not (tmp_path / "optuna.db").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.mysql
def test_two_workers_mysql(tmp_path: Path):
    """Both stores on MySQL/MariaDB (PyMySQL, the [mysql] extra), two workers, the stand-in
    backbone: every trial and run finished, none closed by the other worker as stale."""
    url = server_url("mysql")
    suffix = uuid.uuid4().hex[:10]
    storage = create_database(url, f"optuna_{suffix}")
    tracking = create_database(url, f"mlflow_{suffix}")
    data = tmp_path / "photos"
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        small_copy(CATS_DOGS / split, data / split, n, None)
    search = {**_search(8, 4), "space": {**_search(8, 4)["space"], "batch_size": 16}}
    sweep = write_sweep(tmp_path / "sweep.yaml", data, study="my", backbones=TINY, search=search)
    r = run_cli(
        "run", str(sweep), "--workers", "2", "--storage", storage, "--tracking-uri", tracking,
        timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    assert "left RUNNING" not in r.stderr, r.stderr[-4000:]  # a live worker's run, not stale
    _check_study(storage, "my", 8)
    _check_mlflow(tracking, "my", 8)
    r = run_cli("status", str(sweep), "--storage", storage)
    assert r.returncode == 0 and "8/8 finished" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


# --- the workers never outlive their parent; SIGHUP is SIGTERM ---------------------------------
def _workers(pid: int) -> set[int]:
    """The `run --workers N` worker processes of ``pid`` (not its stderr filter)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids |= {int(x) for x in (task / "children").read_text().split()}
    workers = set()
    for k in kids:
        with contextlib.suppress(OSError):
            if b"--worker-index" in Path(f"/proc/{k}/cmdline").read_bytes():
                workers.add(k)
    return workers


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


def _start_run(sweep: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """Start `tlsweep run` in its own session; its stderr goes to ``stderr.txt`` beside the
    sweep file (read it with :func:`_stderr` when an assertion fails)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=(sweep.parent / "stderr.txt").open("w"),
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        start_new_session=True,  # a signal to it is not a Ctrl-C of this test's process group
    )
    lines: list[str] = []

    def read() -> None:
        for line in p.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return p, lines


def _stderr(sweep: Path) -> str:
    return (sweep.parent / "stderr.txt").read_text()[-4000:]


def _wait_for_trials(p: subprocess.Popen, lines: list[str], n: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while sum(" trial " in x for x in lines) < n and p.poll() is None:
        assert time.monotonic() < deadline, lines
        time.sleep(0.2)
    assert p.poll() is None, ("the run ended before the signal", lines)


def _no_open_trials_or_runs(tmp_path: Path, study: str, parent_too: bool = False) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    s = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    running = [t.number for t in s.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    assert running == [], running
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    if not parent_too:  # the parent run of a killed parent process is closed by the next run
        runs = [r for r in runs if r.data.tags.get("tlsweep.role") == "trial"]
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []


def test_kill_9_of_the_parent_stops_the_workers(cats_dogs_small: Path, tmp_path: Path):
    n = 12
    search = {**_search(n, 60), "heartbeat_interval": 1, "grace_period": 3}
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small, study="orphans", search=search)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # as the sweep file says, given as a flag
    p, lines = _start_run(sweep, "--workers", "2", "--storage", storage)
    _wait_for_trials(p, lines, 1)
    workers = _workers(p.pid)
    assert len(workers) == 2, workers
    # a URL (it may hold a password) reaches the workers through their environment, which only
    # this user can read, not through their command line, which `ps` shows to everyone
    for w in workers:
        assert storage.encode() not in Path(f"/proc/{w}/cmdline").read_bytes()
    os.kill(p.pid, signal.SIGKILL)  # the parent only: no signal reaches the workers from us
    p.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)], "workers outlived their parent"
    # A worker closes its running trial and run on the way out (FAIL, parameters queued again);
    # one stopped between asking for a trial and starting it leaves it RUNNING, and the next run
    # recovers it: exactly n finished trials, nothing left open.
    r = run_cli("run", str(sweep), "-q", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    import optuna

    s = optuna.load_study(study_name="orphans", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in s.get_trials(deepcopy=False)]
    assert sum(st in ("COMPLETE", "PRUNED") for st in states) == n, states  # FAIL: interrupted
    _no_open_trials_or_runs(tmp_path, "orphans", parent_too=True)


def test_sighup_stops_run_like_sigterm(cats_dogs_small: Path, tmp_path: Path):
    sweep = write_sweep(
        tmp_path / "sweep.yaml", cats_dogs_small, study="hangup", search=_search(50, 60)
    )
    p, lines = _start_run(sweep)
    _wait_for_trials(p, lines, 1)
    os.kill(p.pid, signal.SIGHUP)  # the terminal was closed
    assert p.wait(timeout=120) == 128 + signal.SIGHUP, _stderr(sweep)
    _no_open_trials_or_runs(tmp_path, "hangup")


def test_sighup_during_extraction_leaves_no_partial_entry(cats_dogs_small: Path, tmp_path: Path):
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small, study="hangup-x")
    cache = tmp_path / "cache"
    p = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", "extract", str(sweep), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (cache.is_dir() and any(q.name.endswith(".shards") for q in cache.iterdir())):
        assert p.poll() is None, "extraction ended before it could be signalled"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGHUP)
    assert p.wait(timeout=120) == 128 + signal.SIGHUP
    # no entry, no temporary one, no shards (nobody else was extracting)
    assert [q.name for q in cache.iterdir() if q.is_dir()] == []
