"""Several worker processes on one study: every trial once, one extraction per backbone."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from conftest import TWO_MOBILENETS, run_cli, write_sweep

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

    if storage.startswith("postgresql://"):  # SQLAlchemy 2.1 would pick psycopg 3
        from tlsweep.workers import _pg_driver

        storage = _pg_driver(storage)
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
    url = os.environ.get("TLSWEEP_TEST_POSTGRES_URL")
    if not url:
        msg = "TLSWEEP_TEST_POSTGRES_URL is not set (.ci/run starts a server and sets it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; it is required in CI")
        pytest.skip(msg)
    study = f"pg-{uuid.uuid4().hex[:10]}"
    backbones = TWO_MOBILENETS
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        cats_dogs_small,
        study=study,
        backbones=backbones,
        search=_search(40, 2, high=32),
    )
    r = run_cli("run", str(sweep), "--workers", "4", "--storage", url, "-q", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    _check_study(url, study, 40)
    entries = _cache_entries(tmp_path / "cache")
    assert len(entries) == 2, entries
    assert {e.split("-")[0] for e in entries} == {"MobileNetV2", "MobileNet"}
    _check_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", study, 40)
    # the sqlite storage of the sweep file was not used
    assert not (tmp_path / "optuna.db").exists()
