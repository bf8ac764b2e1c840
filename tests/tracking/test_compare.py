"""Comparing many trials in the MLflow UI: the best-first address, the run names that lead with
the value, and the parent run's table of every trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import TINY, CliInProcess, write_sweep

from tlsweep.study import trials_table
from tlsweep.tracking import TRIALS_TABLE, Tracker, best_first_url, log_trials_table


def test_best_first_url_sorts_by_the_metric_in_the_studys_direction() -> None:
    base = "http://127.0.0.1:5000"
    assert best_first_url(base, "7", "val_accuracy", "maximize") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&orderByKey=metrics.%60val_accuracy%60&orderByAsc=false"
    )
    assert best_first_url(base, "7", "val_loss", "minimize").endswith(
        "&orderByKey=metrics.%60val_loss%60&orderByAsc=true"
    )


def table_of(t: Tracker) -> tuple[list[str], list[list[Any]]]:
    path = t.client.download_artifacts(t.parent_run_id, TRIALS_TABLE)
    doc = json.loads(Path(path).read_text())
    return doc["columns"], doc["data"]


def small_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dist = {
        "backbone": optuna.distributions.CategoricalDistribution(["A-96-avg", "B-96-avg"]),
        "units": optuna.distributions.IntDistribution(8, 64),
    }
    for n, (state, value) in enumerate([("COMPLETE", 0.8), ("PRUNED", 0.5), ("FAIL", None)]):
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState[state],
                value=value,
                params={"backbone": "AB"[n % 2] + "-96-avg", "units": 8 * (n + 1)},
                distributions=dist,
            )
        )
    return study


def test_parent_run_holds_every_trial_in_one_table_replaced_on_refresh(tmp_path: Path) -> None:
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "table")
    t.create_parent({"n_trials": 3}, "study: table\n", "sweep.yaml")
    study = small_study()
    log_trials_table(t, trials_table(study))
    columns, rows = table_of(t)
    assert columns == ["number", "state", "value", "backbone", "units", "seconds"]
    assert [r[:5] for r in rows] == [
        [0, "COMPLETE", 0.8, "A-96-avg", 8],
        [1, "PRUNED", None, "B-96-avg", 16],
        [2, "FAIL", None, "A-96-avg", 24],
    ]
    # MLflow knows it as a table (its UI shows it so), once
    logged = json.loads(t.client.get_run(t.parent_run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": TRIALS_TABLE, "type": "table"}]
    # a refresh replaces the table (MLflow's log_table alone would append the rows again)
    study.enqueue_trial({"backbone": "B-96-avg", "units": 40})
    study.optimize(
        lambda tr: (
            tr.suggest_int("units", 8, 64) / 100
            + 0 * len(tr.suggest_categorical("backbone", ["A-96-avg", "B-96-avg"]))
        ),
        n_trials=1,
    )
    log_trials_table(t, trials_table(study))
    columns, rows = table_of(t)
    assert [r[0] for r in rows] == [0, 1, 2, 3]
    assert rows[3][:5] == [3, "COMPLETE", 0.4, "B-96-avg", 40]
    assert rows[3][5] is not None and rows[3][5] >= 0  # seconds
    logged = json.loads(t.client.get_run(t.parent_run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": TRIALS_TABLE, "type": "table"}]


def test_a_run_and_best_leave_the_table_of_every_trial_on_the_parent(
    tmp_path: Path, cats_dogs_small: Path, cli: CliInProcess
) -> None:
    from mlflow import MlflowClient

    search = {
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "space": {"units": {"low": 8, "high": 32}, "batch_size": 16, "epochs": 2},
    }
    sweep = write_sweep(
        tmp_path / "sweep.yaml", cats_dogs_small, study="tabled", backbones=TINY, search=search
    )
    r = cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tabled")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("tlsweep.role") == "study"]
    children = {
        int(x.data.tags["optuna.trial_number"]): x
        for x in runs
        if x.data.tags.get("tlsweep.role") == "trial"
    }
    doc = json.loads(Path(client.download_artifacts(parent.info.run_id, TRIALS_TABLE)).read_text())
    rows = [dict(zip(doc["columns"], row, strict=True)) for row in doc["data"]]
    assert [r["number"] for r in rows] == [0, 1]
    for row in rows:
        child = children[row["number"]]
        assert row["state"] == "COMPLETE"
        assert row["value"] == pytest.approx(child.data.metrics["val_accuracy"])
        assert str(row["units"]) == child.data.params["units"]
        assert row["backbone"] == child.data.params["backbone"]
        assert child.info.run_name.startswith(f"{row['value']:.4f} · trial {row['number']} · ")
    # a trial added since (another worker's, say): `best` refreshes the table, not appends
    study = optuna.load_study(study_name="tabled", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.add_trial(
        optuna.trial.create_trial(
            value=0.01,
            params={"units": 9},
            distributions={"units": optuna.distributions.IntDistribution(8, 32)},
        )
    )
    r = cli("best", str(sweep))
    assert r.returncode == 0, r.stderr
    doc = json.loads(Path(client.download_artifacts(parent.info.run_id, TRIALS_TABLE)).read_text())
    assert [row[:3] for row in doc["data"]][2] == [2, "COMPLETE", 0.01]
    assert [row[0] for row in doc["data"]] == [0, 1, 2]
