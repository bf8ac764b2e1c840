"""The winner you can trust, end to end through the real CLI: the test score's bootstrap
interval, MLflow's own evaluation on the parent run, and the model registry's champion loaded
in a fresh Python on raw photos.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, write_sweep

pytestmark = pytest.mark.slow

NAME = "cats-dogs"
SEARCH = {
    "n_trials": 3,
    "sampler": "random",
    "pruner": "none",
    "space": {
        "units": {"low": 16, "high": 64, "log": True},
        "dropout": {"low": 0.0, "high": 0.3},
        "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": {"choices": [32]},
        "epochs": 5,
    },
}


@pytest.fixture(scope="module")
def registered(
    cats_dogs_small: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("registry")
    sweep = write_sweep(
        d / "sweep.yaml", cats_dogs_small, study="reg", cache_dir=shared_cache, search=SEARCH
    )
    r = run_cli("run", str(sweep), "-q", cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    model = d / "m.keras"
    r = run_cli("export", str(sweep), "-o", str(model), "--register", NAME, cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "model": model, "run": r, "tracking": f"sqlite:///{d / 'mlflow.db'}"}


def _parent(tracking: str) -> tuple[Any, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("reg")
    (run,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'study'")
    return client, run


def test_test_score_has_an_interval_that_a_fresh_measure_falls_in(
    registered: dict[str, Any], cats_dogs_small: Path, tmp_path: Path
) -> None:
    out = registered["run"].stdout
    assert "test accuracy" in out and "(95% CI " in out, out
    _, run = _parent(registered["tracking"])
    m = run.data.metrics
    lo, hi = m["test_accuracy_ci_low"], m["test_accuracy_ci_high"]
    assert lo <= m["test_accuracy"] <= hi and 0.0 < hi - lo < 0.5
    # Re-measure: the exported model on the raw test photos, through `tlsweep predict`
    csv_path = tmp_path / "p.csv"
    r = run_cli(
        "predict", str(registered["model"]), str(cats_dogs_small / "test"), "--csv", str(csv_path)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(csv_path.open()))
    correct = [Path(row["file"]).parent.name == row["class"] for row in rows]
    assert len(rows) == 40
    fresh = sum(correct) / len(correct)
    assert lo <= fresh <= hi, (fresh, lo, hi)


def test_parent_run_has_mlflow_evaluation(registered: dict[str, Any]) -> None:
    client, run = _parent(registered["tracking"])
    m = run.data.metrics
    for k in ("accuracy_score", "roc_auc", "precision_recall_auc", "f1_score", "log_loss"):
        assert f"test_eval_{k}" in m, sorted(m)
    assert m["test_eval_accuracy_score"] == pytest.approx(m["test_accuracy"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    for plot in ("confusion_matrix", "roc_curve_plot", "precision_recall_curve_plot"):
        assert f"test_eval_{plot}.png" in names, sorted(names)


def test_export_registers_a_champion_on_the_validation_score(registered: dict[str, Any]) -> None:
    from tlsweep.tracking import Tracker

    assert f"registered {NAME} version 1" in registered["run"].stdout
    assert f"now models:/{NAME}@champion" in registered["run"].stdout
    client, run = _parent(registered["tracking"])
    champ = client.get_model_version_by_alias(NAME, "champion")
    assert int(champ.version) == 1
    assert float(champ.tags["tlsweep.validation_score"]) == pytest.approx(
        run.data.metrics["best_val_accuracy"]
    )
    assert champ.tags["tlsweep.validation_metric"] == "val_accuracy"
    # later versions: promoted only when their validation score is better
    tracker = Tracker(registered["tracking"], "reg", run.info.run_id)
    score = float(champ.tags["tlsweep.validation_score"])
    uri = f"models:/{NAME}/1"
    assert tracker.register(uri, NAME, score - 0.1, "val_accuracy", "maximize") == (2, False, score)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1
    assert tracker.register(uri, NAME, score, "val_accuracy", "maximize")[1] is False  # a tie
    assert (
        tracker.register(uri, NAME, 0.2, "val_log_loss", "minimize")[1] is False
    )  # not comparable
    assert tracker.register(uri, NAME, score + 0.01, "val_accuracy", "maximize") == (5, True, score)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 5


LOAD = """
import sys, keras, numpy as np, mlflow
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
exported = keras.models.load_model(sys.argv[3], safe_mode=True, compile=False)
for f in sys.argv[4:]:
    image = np.asarray(Image.open(f).convert("RGB"), np.float32)[None]  # raw, its own size
    p = np.asarray(model.predict(image))[0]
    q = np.asarray(exported.predict_on_batch(image))[0]
    print(f, *p.tolist(), float(np.abs(p - q).max()))
"""


def test_champion_loads_in_a_fresh_python_and_predicts_raw_photos(
    registered: dict[str, Any], cats_dogs_small: Path, tmp_path: Path
) -> None:
    photos = {c: sorted((cats_dogs_small / "test" / c).iterdir())[:4] for c in ("cats", "dogs")}
    files = [str(f) for fs in photos.values() for f in fs]
    model = str(registered["model"])
    r = subprocess.run(
        [sys.executable, "-c", LOAD, registered["tracking"], f"models:/{NAME}@champion", model]
        + files,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in files:
            got[parts[0]] = [float(v) for v in parts[1:]]
    assert sorted(got) == sorted(files)
    names = json.loads(zipfile.ZipFile(model).read("tlsweep.json"))["class_names"]
    correct = 0
    for f, (p_cat, p_dog, diff) in got.items():
        assert p_cat + p_dog == pytest.approx(1.0, abs=1e-5)
        assert diff < 1e-5  # the champion is the exported model, to the float
        correct += names[int(p_dog > p_cat)] == Path(f).parent.name
    assert correct >= 6, got  # 8 photos; the winner scores about 0.8 on this small test split


def test_bad_model_names_are_refused_before_any_work(cats_dogs_small: Path, tmp_path: Path) -> None:
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.errors import ConfigError

    sweep = write_sweep(tmp_path / "s.yaml", cats_dogs_small, register="champ/1")
    with pytest.raises(ConfigError, match=r"s\.yaml: register: got 'champ/1'; expected a model"):
        load_sweep(sweep)
    sweep = write_sweep(tmp_path / "s.yaml", cats_dogs_small, register=" cats-dogs ")
    assert load_sweep(sweep).register == "cats-dogs"
    r = run_cli("export", str(sweep), "-o", str(tmp_path / "m.keras"), "--register", "a/b")
    assert r.returncode == 2
    assert r.stderr.strip().endswith(
        "tlsweep: error: --register: got 'a/b'; expected a model name "
        "(letters, digits, _ . - space)"
    )
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / "optuna.db").exists()
