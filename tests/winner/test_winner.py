"""The winner end to end through the real CLI: test score on the parent run, reports, export,
a fresh-process load of the exported model, the MLflow model, predict over bad files, no test split.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import TINY, run_cli, without_root_powers, write_sweep

pytestmark = pytest.mark.slow

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


def _parent(tracking_uri: str, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'study'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _all_artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        if a.is_dir:
            out |= _all_artifacts(client, run_id, a.path)
        else:
            out.add(a.path)
    return out


@pytest.fixture(scope="module")
def exported(cats_dogs_small: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("winner")
    sweep = write_sweep(
        d / "sweep.yaml", cats_dogs_small, study="winner", cache_dir=shared_cache, search=SEARCH
    )
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    model = d / "m.keras"
    r = run_cli("export", str(sweep), "-o", str(model))
    assert r.returncode == 0, r.stderr[-3000:]
    assert model.is_file()
    return {"dir": d, "sweep": sweep, "model": model, "tracking": f"sqlite:///{d / 'mlflow.db'}"}


def test_parent_run_has_test_metrics_and_reports(exported):
    client, run = _parent(exported["tracking"], "winner")
    m = run.data.metrics
    for k in (
        "test_accuracy",
        "test_loss",
        "test_precision_cats",
        "test_precision_dogs",
        "test_recall_cats",
        "test_recall_dogs",
    ):
        assert k in m, (k, sorted(m))
    assert 0.0 <= m["test_accuracy"] <= 1.0
    arts = _all_artifacts(client, run.info.run_id)
    for a in (
        "test/metrics.json",
        "reports/optimization_history.html",
        "reports/parallel_coordinate.html",
        "reports/backbones.json",
    ):
        assert a in arts, (a, sorted(arts))
    local = client.download_artifacts(run.info.run_id, "test/metrics.json", str(exported["dir"]))
    metrics = json.loads(Path(local).read_text())
    cm = metrics["confusion_matrix"]
    assert len(cm) == 2 and all(len(row) == 2 for row in cm)
    assert sum(map(sum, cm)) == 40  # 20 test images per class
    assert metrics["class_names"] == ["cats", "dogs"]
    assert abs(metrics["accuracy"] - m["test_accuracy"]) < 1e-6
    # the winner's mistakes as a picture, when it makes any
    assert ("test/misclassified.png" in arts) == (m["test_accuracy"] < 1.0), sorted(arts)


FRESH = r"""
import json, sys, zipfile
from pathlib import Path
import numpy as np
import keras
from PIL import Image
path, test_dir = sys.argv[1], Path(sys.argv[2])
meta = json.loads(zipfile.ZipFile(path).read("tlsweep.json"))
names = meta["class_names"]
model = keras.models.load_model(path, safe_mode=True)
correct = n = 0
for k, cls in enumerate(names):
    for f in sorted((test_dir / cls).iterdir()):
        x = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)[None]
        p = np.asarray(model.predict_on_batch(x))
        assert p.shape == (1, len(names)), p.shape
        correct += int(p[0].argmax() == k)
        n += 1
assert "tlsweep" not in sys.modules, "tlsweep was imported"
print(json.dumps({"correct": correct, "n": n, "names": names}))
"""


def test_export_loads_in_fresh_process_without_tlsweep(exported, cats_dogs_small: Path):
    client, run = _parent(exported["tracking"], "winner")
    logged = run.data.metrics["test_accuracy"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    r = subprocess.run(
        [sys.executable, "-c", FRESH, str(exported["model"]), str(cats_dogs_small / "test")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(exported["dir"]),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["names"] == ["cats", "dogs"]
    assert out["n"] == 40
    # raw images of their own size vs features of the cache: allow one image of difference
    assert abs(out["correct"] - logged * out["n"]) <= 1.0 + 1e-6, (out, logged)
    with zipfile.ZipFile(exported["model"]) as z:
        assert json.loads(z.read("tlsweep.json"))["class_names"] == ["cats", "dogs"]


def test_parent_run_holds_mlflow_model(exported):
    client, run = _parent(exported["tracking"], "winner")
    import mlflow

    mlflow.set_tracking_uri(exported["tracking"])
    models = [
        m
        for m in mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], output_format="list"
        )
        if m.name == "model"
    ]
    assert len(models) == 1, models
    assert models[0].source_run_id == run.info.run_id
    arts = _all_artifacts(client, run.info.run_id)
    assert "export/m.keras" in arts
    loaded = mlflow.keras.load_model(models[0].model_uri)
    assert int(loaded.output_shape[-1]) == 2


def test_predict_csv_with_bad_files(exported, cats_dogs_small: Path, tmp_path: Path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    good = (
        sorted((cats_dogs_small / "test" / "cats").iterdir())[:3]
        + sorted((cats_dogs_small / "test" / "dogs").iterdir())[:3]
    )
    for f in good:
        shutil.copy(f, folder / f.name)
    data = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a jpeg\n")
    locked = folder / "locked.jpg"
    shutil.copy(good[0], locked)
    locked.chmod(0)
    out = tmp_path / "out.csv"
    try:
        r = run_cli(
            "predict",
            str(exported["model"]),
            str(folder),
            "--csv",
            str(out),
            wrap=without_root_powers(),
        )
    finally:
        locked.chmod(0o644)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rows = list(csv.DictReader(out.open()))
    listed = {Path(row["file"]).name for row in rows}
    assert {f.name for f in good} <= listed
    assert all(row["class"] in ("cats", "dogs") for row in rows)
    assert all(0.0 <= float(row["probability"]) <= 1.0 for row in rows)
    for bad in ("zero.jpg", "text.jpg", "locked.jpg"):
        assert bad not in listed
        assert bad in r.stderr
    assert "Permission denied" in r.stderr
    # a truncated JPEG is either decoded partially (listed) or reported as skipped
    assert ("truncated.jpg" in listed) != ("truncated.jpg" in r.stderr)


def test_predict_with_nothing_to_read(exported, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no images here\n")
    # folders without a single image: refused before the model is loaded
    r = run_cli("predict", str(exported["model"]), str(empty), str(tmp_path / "notes"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.strip()]
    assert line.startswith("tlsweep: error: PATH:") and "no image file" in line, line
    assert r.stdout == ""
    # a path that does not exist is a typo, not a skipped image
    r = run_cli("predict", str(exported["model"]), str(empty), "/no/such.jpg")
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = [x for x in r.stderr.splitlines() if x.strip()]
    assert "'/no/such.jpg': no such file or folder" in line, line


def test_predict_csv_in_a_new_folder(exported, cats_dogs_small: Path, tmp_path: Path):
    """--csv into a folder that does not exist yet: made, and the file written whole."""
    out = tmp_path / "new" / "deeper" / "out.csv"
    images = cats_dogs_small / "test" / "cats"
    r = run_cli("predict", str(exported["model"]), str(images), "--csv", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(images.iterdir()))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.csv"]  # no temporary file


def test_no_test_split_best_says_so(flowers_small: Path, shared_cache: Path, tmp_path: Path):
    search = {**SEARCH, "n_trials": 2, "space": {**SEARCH["space"], "epochs": 3}}
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        flowers_small,
        study="notest",
        cache_dir=shared_cache,
        search=search,
        data={"dir": str(flowers_small), "test_split": 0},
    )
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("best", str(sweep))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no test split" in r.stdout
    assert "test accuracy" not in r.stdout
    client, run = _parent(f"sqlite:///{tmp_path / 'mlflow.db'}", "notest")
    assert "test_accuracy" not in run.data.metrics


def test_the_winner_is_retrained_with_the_seed_its_trial_ran_with(
    cats_dogs_small: Path, tmp_path: Path, cli
) -> None:
    """``search.seed`` changed after the study ran: ``best`` rebuilds the head the trial scored
    (the seed recorded with the trial), not another one trained with the new seed."""
    import optuna
    import yaml

    search = {**SEARCH, "n_trials": 2, "metric": "val_loss", "direction": "minimize", "seed": 5}
    sweep = write_sweep(tmp_path / "s.yaml", cats_dogs_small, study="seeded", backbones=TINY,
                        search=search)  # fmt: skip
    r = cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = yaml.safe_load(sweep.read_text())
    doc["search"]["seed"] = 6
    sweep.write_text(yaml.safe_dump(doc))
    r = cli("best", str(sweep))
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="seeded", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    client, parent = _parent(f"sqlite:///{tmp_path / 'mlflow.db'}", "seeded")
    rebuilt = client.get_metric_history(parent.info.run_id, "rebuilt_val_loss")
    assert rebuilt and all(m.value == pytest.approx(study.best_value, rel=1e-6) for m in rebuilt)
    assert study.best_trial.user_attrs["tlsweep.seed"] == 5


@pytest.mark.parametrize(("cv_folds", "repeats"), [(3, 2), (None, 2), (None, 1)])
def test_the_console_says_what_the_rebuilt_head_is(
    cv_folds: int | None, repeats: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """With folds or repeats the trial's value is a mean of heads, and the exported head is
    another one: the console says so, with that head's own validation score."""
    from types import SimpleNamespace

    from tlsweep.cli._display import print_test
    from tlsweep.head._train import EpochMetrics

    head = SimpleNamespace(history=[EpochMetrics(4, 0.3, 0.9, 0.4, 0.8125)])
    w = SimpleNamespace(number=7, value=0.85, test=None, head=head)
    search = SimpleNamespace(metric="val_accuracy", cv_folds=cv_folds, repeats=repeats)
    print_test(w, SimpleNamespace(search=search))
    out = capsys.readouterr().out
    assert "winner: trial 7, validation val_accuracy 0.8500" in out
    if cv_folds or repeats > 1:
        heads = (cv_folds or 1) * repeats
        assert f"mean of the trial's {heads} heads" in out
        assert "retrained on the whole training split: validation val_accuracy 0.8125" in out
    else:
        assert "mean" not in out


# --- the hostile user: two exports at once, a full disk, a cut model, a parent still running --
TINY_SEARCH = {
    "n_trials": 2,
    "sampler": "random",
    "pruner": "none",
    "space": {
        "units": {"low": 8, "high": 16},
        "dropout": {"low": 0.0, "high": 0.1},
        "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": {"choices": [16]},
        "epochs": 2,
    },
}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory):
    """A finished two-trial study on the stand-in backbone (seconds, not minutes)."""
    from conftest import CATS_DOGS, TINY, need_shared, small_copy

    need_shared()
    d = tmp_path_factory.mktemp("tiny_winner")
    data = d / "data"
    small_copy(CATS_DOGS / "train", data / "train", 10, None)
    small_copy(CATS_DOGS / "validation", data / "validation", 6, None)
    small_copy(CATS_DOGS / "test", data / "test", 6, None)
    sweep = write_sweep(d / "sweep.yaml", data, study="tiny", backbones=TINY, search=TINY_SEARCH)
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "sweep": sweep, "data": data, "tracking": f"sqlite:///{d / 'mlflow.db'}"}


def _one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("tlsweep: error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_two_exports_to_one_file_at_once_leave_one_whole_model(tmp_path: Path, monkeypatch):
    """Both writers save their model before either renames it (a barrier holds them): each
    has its own temporary file, so both succeed and the file left is one whole model. With one
    shared temporary name, one writer died and the other renamed a zip with a bad CRC."""
    import threading

    import keras

    from tlsweep.winner import _export as export

    monkeypatch.setattr(export, "metadata", lambda cfg, w: {"class_names": ["a", "b"]})
    barrier = threading.Barrier(2, timeout=120)

    class BothSavedFirst:
        def __init__(self, units: int):
            inputs = keras.Input((4,))
            self.model = keras.Model(inputs, keras.layers.Dense(units)(inputs))

        def save(self, path: Any) -> None:
            self.model.save(path)
            barrier.wait()

    out = tmp_path / "model.keras"
    cfg = SimpleNamespace(register=None)
    errors: list[BaseException] = []

    def export_one(units: int) -> None:
        try:
            export.save_model(cfg, None, BothSavedFirst(units), out, None)
        except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=export_one, args=(u,)) for u in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert zipfile.ZipFile(out).testzip() is None
    model = keras.models.load_model(out, safe_mode=True, compile=False)
    assert model.output_shape[-1] in (2, 3)
    assert export.read_metadata(out) == {"class_names": ["a", "b"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]  # no temporary left


def _parent_info(tracking: str):
    client, run = _parent(tracking, "tiny")
    return client, run.info


def test_best_and_export_leave_the_parent_runs_state_as_they_found_it(tiny_study, cli):
    """While a `run` still works in the study its parent is RUNNING: `best` and `export` add
    their results to it and must not mark it FINISHED under the run (nor reopen a finished one)."""
    client, info = _parent_info(tiny_study["tracking"])
    client.update_run(info.run_id, status="RUNNING")  # as while a `run` goes on
    try:
        r = cli("best", str(tiny_study["sweep"]))
        assert r.returncode == 0, r.stderr[-3000:]
        assert client.get_run(info.run_id).info.status == "RUNNING"
        r = cli("export", str(tiny_study["sweep"]), "-o", str(tiny_study["dir"] / "p.keras"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert client.get_run(info.run_id).info.status == "RUNNING"
        assert "test_accuracy" in client.get_run(info.run_id).data.metrics  # it did log
    finally:
        client.set_terminated(info.run_id, "FINISHED", end_time=1_700_000_000_000)
    r = cli("export", str(tiny_study["sweep"]), "-o", str(tiny_study["dir"] / "q.keras"))
    assert r.returncode == 0, r.stderr[-3000:]
    after = client.get_run(info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", 1_700_000_000_000)


def _tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip()}): needs root")


def test_export_to_a_full_disk_says_so_leaves_nothing_and_the_next_export_works(
    tiny_study, cli, tmp_path: Path
):
    disk = tmp_path / "disk"
    _tmpfs(disk, "40k")  # the stand-in's model is about 80 KB
    try:
        out = disk / "new" / "m.keras"
        r = cli("export", str(tiny_study["sweep"]), "-o", str(out))
        assert r.returncode == 1, r.stderr[-3000:]
        _one_error_line(r, f"--output {out}", "No space left on device", "free some space")
        assert list(disk.iterdir()) == []  # no model, no temporary file, no folder made
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        r = cli("export", str(tiny_study["sweep"]), "-o", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        assert [p.name for p in out.parent.iterdir()] == ["m.keras"]
        assert zipfile.ZipFile(out).testzip() is None
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_predict_on_a_model_cut_short_or_damaged_says_so(tiny_study, cli, tmp_path: Path):
    model = tiny_study["dir"] / "whole.keras"
    if not model.is_file():
        r = cli("export", str(tiny_study["sweep"]), "-o", str(model))
        assert r.returncode == 0, r.stderr[-3000:]
    data = model.read_bytes()
    images = str(tiny_study["data"] / "test")
    cut = tmp_path / "cut.keras"
    cut.write_bytes(data[: len(data) // 2])  # a copy or a download stopped half-way
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(data[:300] + bytes(b ^ 0xFF for b in data[300:400]) + data[400:])
    for bad in (cut, damaged):
        csv_out = tmp_path / f"{bad.stem}.csv"
        r = cli("predict", str(bad), images, "--csv", str(csv_out))
        assert r.returncode == 2, r.stderr[-3000:]
        _one_error_line(r, "MODEL: ", str(bad), "cut short", "tlsweep export")
        assert not csv_out.exists()
    r = cli("predict", str(model), images)  # the whole model still answers
    assert r.returncode == 0, r.stderr[-3000:]
