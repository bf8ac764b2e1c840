"""kill -9 at random moments (extraction, trials), restart, finish: nothing lost or left open."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_sweep

pytestmark = pytest.mark.slow

N_TRIALS = 8


def _search() -> dict:
    return {
        "n_trials": N_TRIALS,
        "sampler": "random",
        "pruner": "none",
        "heartbeat_interval": 1,
        "grace_period": 3,
        "space": {
            "units": {"low": 16, "high": 64, "log": True},
            "dropout": {"low": 0.0, "high": 0.3},
            "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
            "batch_size": {"choices": [32]},
            "epochs": 30,
        },
    }


def _start(sweep: Path) -> tuple[subprocess.Popen, list[str]]:
    p = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in p.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return p, lines


def _kill(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def _complete(storage: str) -> set[int]:
    import optuna

    try:
        s = optuna.load_study(study_name="faults", storage=storage)
    except KeyError:
        return set()
    return {
        t.number
        for t in s.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE
    }


def _trial_lines(lines: list[str]) -> int:
    return sum(1 for line in lines if " trial " in line)


def test_sigkill_during_extraction_and_trials(cats_dogs_small: Path, tmp_path: Path):
    rng = random.Random(1234)
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small, study="faults", search=_search())
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cache = tmp_path / "cache"
    complete_before: set[int] = set()

    # 1. during extraction: soon after its shard folder (or a temporary entry) shows up, at a
    # random moment (or after a random 2-6 s); on an idle machine the whole run can take
    # seconds, so waiting for the temporary entry alone (made only to assemble) can miss it
    p, _ = _start(sweep)
    deadline = time.monotonic() + rng.uniform(2, 6) + 10
    while time.monotonic() < deadline and p.poll() is None:
        if cache.is_dir() and any(
            q.name.endswith(".shards") or ".tmp-" in q.name for q in cache.iterdir()
        ):
            time.sleep(rng.uniform(0.0, 0.5))
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed during extraction"
    _kill(p)
    published = [q.name for q in cache.iterdir() if q.is_dir() and "." not in q.name]
    assert not published, f"killed after the extraction, not during it: {published}"

    # 2..4. during trials: after a random number of finished trials, at a random moment
    for _ in range(3):
        p, lines = _start(sweep)
        target = rng.randint(1, 2)
        deadline = time.monotonic() + 240
        while _trial_lines(lines) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.3, 2.5))
        if p.poll() is None:
            _kill(p)
        now = _complete(storage)
        assert complete_before <= now, (complete_before, now)
        complete_before = now
        if len(now) >= N_TRIALS:
            break

    # to completion
    r = run_cli("run", str(sweep), "-q", timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]

    import optuna

    s = optuna.load_study(study_name="faults", storage=storage)
    trials = s.get_trials(deepcopy=False)
    finished = [
        t
        for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) == N_TRIALS, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    final_complete = {t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert complete_before <= final_complete, (complete_before, final_complete)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    assert len(parents) == 1

    # the cache: exactly one complete, verifiable entry, no temporary folders left in use
    dirs = [q for q in cache.iterdir() if q.is_dir()]
    entries = [q for q in dirs if ".tmp-" not in q.name]
    assert len(entries) == 1, [q.name for q in dirs]
    assert [q for q in dirs if ".tmp-" in q.name] == []
    m = json.loads((entries[0] / "manifest.json").read_text())
    arr = np.load(entries[0] / "features.npy", mmap_mode="r", allow_pickle=False)
    assert list(arr.shape) == m["shape"]
    assert arr.shape[0] == len(m["files"]) == 160
    assert np.isfinite(np.asarray(arr)).all()


def test_a_full_disk_during_extraction_says_so_and_the_next_extract_works(tmp_path: Path):
    """The cache on a small tmpfs: the stat index fits, the features do not. One line naming
    the problem and the fix, no entry (whole or half) left, and once there is room the same
    command extracts the entry."""
    from conftest import CATS_DOGS, TINY, need_shared, small_copy

    need_shared()
    data = tmp_path / "data"
    small_copy(CATS_DOGS / "train", data / "train", 10, None)
    small_copy(CATS_DOGS / "validation", data / "validation", 6, None)
    small_copy(CATS_DOGS / "test", data / "test", 6, None)
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip()}): needs root")
    try:
        cache = disk / "cache"
        sweep = write_sweep(tmp_path / "sweep.yaml", data, backbones=TINY, cache_dir=cache)
        r = run_cli("extract", str(sweep), "-q")
        assert r.returncode == 1, r.stdout + r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("tlsweep: error: ")]
        assert len(errors) == 1, r.stderr[-3000:]
        assert "No space left on device" in errors[0] and "free some space" in errors[0]
        left = sorted(p.name for p in cache.iterdir() if p.is_dir())
        assert left == [], left  # no entry, no shard folder, no temporary entry
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        r = run_cli("extract", str(sweep), "-q")
        assert r.returncode == 0, r.stderr[-3000:]
        entries = [p for p in cache.iterdir() if p.is_dir()]
        assert len(entries) == 1 and (entries[0] / "manifest.json").is_file(), entries
        m = json.loads((entries[0] / "manifest.json").read_text())
        assert len(m["files"]) == 44
    finally:
        subprocess.run(["umount", str(disk)], check=False)
