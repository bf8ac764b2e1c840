"""A whole sweep through the CLI in the default test run, on the TinyConvNet stand-in.

extract -> run -> resume with another --n-trials -> best -> export -> predict, on a few dozen
real photos (cats vs dogs, layout A), writing a real Optuna study and real MLflow runs. The
backbone is ``TinyConvNet`` (three seeded random convolutions; ``weights: none``), which goes
through the same build, extraction and export code as the ``keras.applications`` backbones, so
the whole chain costs seconds; the real-backbone versions of these tests are marked slow.

The first ``run`` is a real ``python -m tlsweep`` process, the sweep as a user starts it.
``extract``, the resumed ``run``, ``best``, ``export`` and ``predict`` call the CLI in this
process (each its own invocation, reading only the cache, the study, the tracking store and the
model file on disk), which saves a process start each: 5 to 8 s of CPU for TensorFlow, Keras and
MLflow imported again. (The slow tests load the export in a fresh process without tlsweep.)
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    CATS_DOGS,
    TINY,
    CliInProcess,
    need_shared,
    run_cli,
    small_copy,
    write_sweep,
)

STUDY = "tiny"
SEARCH = {
    "n_trials": 3,
    "sampler": "random",
    "pruner": "none",
    "space": {
        "units": {"low": 8, "high": 64, "log": True},
        "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": 16,  # one batch size: one trace of the epoch function per process
        "epochs": 4,
    },
}


def _ok(*args: str, cwd: Path, real: bool = False) -> subprocess.CompletedProcess:
    r = run_cli(*args, cwd=cwd) if real else CliInProcess()(*args, cwd=cwd)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _parent(tracking_uri: str) -> tuple[Any, Any, list]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    children = [r for r in runs if r.data.tags.get("tlsweep.role") == "trial"]
    return client, parent, children


def _study(d: Path) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{d / 'optuna.db'}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The CLI, command after command, on one sweep; each step's output and state kept."""
    need_shared()
    d = tmp_path_factory.mktemp("tiny")
    data = d / "photos"  # 12 train, 6 validation and 6 test photos per class: 48 real photos
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        small_copy(CATS_DOGS / split, data / split, n, None)
    path = write_sweep(d / "sweep.yaml", data, study=STUDY, backbones=TINY, search=SEARCH)
    out: dict[str, Any] = {"dir": d, "data": data, "sweep": path}
    out["extract"] = _ok("extract", str(path), "-q", cwd=d)
    out["run"] = _ok("run", str(path), "-q", cwd=d, real=True)
    out["after_run"] = _study(d).get_trials(deepcopy=True)
    out["resume"] = _ok("run", str(path), "-q", "--n-trials", "5", cwd=d)
    out["best"] = _ok("best", str(path), cwd=d)
    out["model"] = d / "model.keras"
    out["export"] = _ok("export", str(path), "-o", str(out["model"]), cwd=d)
    out["csv"] = d / "predictions.csv"
    out["predict"] = _ok(
        "predict", str(out["model"]), str(data / "test"), "--csv", str(out["csv"]), cwd=d
    )
    out["tracking"] = f"sqlite:///{d / 'mlflow.db'}"
    return out


def test_extract_then_run_hits_the_cache_and_logs_every_trial(sweep: dict[str, Any]) -> None:
    assert "TinyConvNet-64-avg-random: extracted: 48 images (train 24, validation 12, test 12)" in (
        sweep["extract"].stdout
    )
    assert "cache hit" in sweep["run"].stderr + sweep["run"].stdout
    assert "[3/3]" in sweep["run"].stdout and "3/3 finished" in sweep["run"].stdout
    trials = sweep["after_run"]
    assert [(t.number, t.state.name) for t in trials] == [(i, "COMPLETE") for i in range(3)]
    client, parent, children = _parent(sweep["tracking"])
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(5))
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "COMPLETE"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["backbone"] == "TinyConvNet-64-avg-random"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")]
        assert sorted(steps) == [0, 1, 2, 3]


def test_resume_finishes_the_study_and_says_what_changed(sweep: dict[str, Any]) -> None:
    trials = _study(sweep["dir"]).get_trials(deepcopy=True)
    assert [(t.number, t.state.name) for t in trials] == [(i, "COMPLETE") for i in range(5)]
    for old, new in zip(sweep["after_run"], trials, strict=False):  # never redone
        assert (new.params, new.value) == (old.params, old.value)
    out = sweep["resume"]
    assert "[4/5]" in out.stdout and "[5/5]" in out.stdout and "[3/5]" not in out.stdout
    changed = [ln for ln in out.stderr.splitlines() if "resumed with a change" in ln]
    assert changed == ["study tiny resumed with a change: search.n_trials: 3 -> 5"]
    assert "resumed with a change" not in sweep["run"].stderr


def test_the_resolved_sweep_is_on_the_parent_run_and_in_the_study(sweep: dict[str, Any]) -> None:
    from tlsweep import __version__
    from tlsweep.config._resolved import resolved
    from tlsweep.config._sweepfile import load_sweep

    client, parent, _ = _parent(sweep["tracking"])
    d = sweep["dir"]
    local = Path(client.download_artifacts(parent.info.run_id, "sweep", str(d / "artifacts")))
    text = (local / "resolved.yaml").read_text()
    assert f"tlsweep {__version__}" in text.splitlines()[0]
    doc = yaml.safe_load(text)
    assert doc["search"]["n_trials"] == 5  # the override of the last run
    assert doc["search"]["max_retry"] == 3 and doc["search"]["space"]["optimizer"] == "adam"
    (changes,) = local.glob("changes-*.txt")
    assert changes.read_text() == "search.n_trials: 3 -> 5\n"
    # MLflow alone reproduces the run: the artifact is a sweep file that loads to the same config
    (d / "again.yaml").write_text(text)
    again = load_sweep(d / "again.yaml")
    assert resolved(again) == doc
    stored = _study(d).user_attrs["tlsweep.resolved"]
    assert stored["sweep"] == doc and stored["versions"]["tlsweep"] == __version__


def test_run_export_and_predict_agree_on_the_test_photos(sweep: dict[str, Any]) -> None:
    import keras

    exported = sweep["export"].stdout
    assert "on 12 held-out images" in exported
    test_accuracy = float(exported.split("test accuracy ")[1].split()[0].rstrip(","))
    assert f"test accuracy {test_accuracy:.4f} (95% CI " in exported  # with its interval
    # the winner the run scored at its end is the one `best` scores again and `export` exports
    assert f"test split: accuracy {test_accuracy:.4f}" in sweep["resume"].stdout
    assert f"test accuracy {test_accuracy:.4f} (95% CI " in sweep["best"].stdout
    model = keras.models.load_model(sweep["model"], safe_mode=True, compile=False)
    assert model.output_shape == (None, 2)
    with open(sweep["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and "12 image(s) predicted, 0 skipped" in sweep["predict"].stderr
    # the exported model, on the raw photos, scores what the winner scored on cached features
    right = [Path(r["file"]).parent.name == r["class"] for r in rows]
    assert sum(right) / len(rows) == pytest.approx(test_accuracy, abs=1e-4)
    assert all(0.5 <= float(r["probability"]) <= 1.0 for r in rows)
