"""``run`` and the audit: a warning when validation or test images copy training images, the
counts on the parent run, and ``data.dedupe: eval`` leaving the copies out (a changed value
needs a new study)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import write_sweep

SEARCH = {
    "n_trials": 1,
    "sampler": "random",
    "pruner": "none",
    "space": {"units": 16, "dropout": 0.1, "learning_rate": 1e-3, "batch_size": 32, "epochs": 2},
}


@pytest.fixture(scope="module")
def copied(cats_dogs_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """cats_dogs_small with two exact copies of training images in test/ and a re-encoded one
    in validation/, run once (one trial) with data.dedupe off, the default."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("copied")
    data = tmp / "data"
    shutil.copytree(cats_dogs_small, data)
    cats = sorted((data / "train" / "cats").iterdir())
    dogs = sorted((data / "train" / "dogs").iterdir())
    shutil.copy(cats[0], data / "test" / "cats" / "copy-1.jpg")
    shutil.copy(dogs[0], data / "test" / "dogs" / "copy-2.jpg")
    Image.open(cats[1]).convert("RGB").save(data / "validation" / "cats" / "re.jpg", quality=70)
    sweep = write_sweep(tmp / "sweep.yaml", data, search=SEARCH)
    return {"dir": tmp, "data": data, "sweep": sweep}


def _parent(tmp: Path, study: str = "test") -> Any:
    """The parent run of ``study`` (the experiment is named after it; another test of this
    module adds a second study to the same store, in whatever order the tests run)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    return parent


def test_run_warns_about_copies_and_records_them(copied: dict[str, Any], cli: Any) -> None:
    out = cli("run", str(copied["sweep"]), "-q")
    assert out.returncode == 0, out.stderr
    assert (
        "2 test images are copies of training images: the test score may be inflated" in out.stderr
    )
    assert "1 validation image is a copy of a training image" in out.stderr
    parent = _parent(copied["dir"])
    assert parent.data.metrics["test_copies_of_train"] == 2
    assert parent.data.metrics["validation_copies_of_train"] == 1
    assert parent.data.tags["data_dedupe"] == "off"
    # the copies as an MLflow table and a grid to look at, on the parent run
    import json

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{copied['dir'] / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "audit")}
    assert {"audit/copies.json", "audit/copies.png"} <= arts
    table = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "audit/copies.json")).read_text()
    )
    cols = table["columns"]
    rows = [dict(zip(cols, r, strict=True)) for r in table["data"]]
    pairs = {(r["a"], r["b"]) for r in rows}
    assert {"test/cats/copy-1.jpg", "test/dogs/copy-2.jpg", "validation/cats/re.jpg"} <= {
        p for pair in pairs for p in pair
    }
    # lineage: the parent run names the data its winner was trained, chosen and scored on
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    inputs = [i for i in inputs if i.dataset.name.startswith("data/")]  # not MLflow's evaluate
    contexts = {i.dataset.name: [t.value for t in i.tags] for i in inputs}
    assert contexts == {
        "data/train": ["training"],
        "data/validation": ["validation"],
        "data/test": ["test"],
    }
    assert len({i.dataset.digest for i in inputs}) == 1
    png = Path(client.download_artifacts(parent.info.run_id, "audit/copies.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_changed_dedupe_needs_a_new_study(copied: dict[str, Any], cli: Any) -> None:
    """After the run of the test above: the same study with dedupe: eval is refused."""
    first = cli("run", str(copied["sweep"]), "-q")
    assert first.returncode == 0, first.stderr  # made the study (or reran it: nothing to do)
    import yaml

    doc = yaml.safe_load(copied["sweep"].read_text())
    doc["data"]["dedupe"] = "eval"
    changed = copied["dir"] / "eval.yaml"
    changed.write_text(yaml.safe_dump(doc))
    out = cli("run", str(changed), "-q")
    assert out.returncode == 2
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("tlsweep:")]
    assert line.startswith("tlsweep: error: ") and "data.dedupe" in line
    assert "copies of training images" not in out.stderr  # refused before any warning
    assert "Traceback" not in out.stderr
    # a new study takes it, and says the copies are left out
    fresh = cli("run", str(changed), "-q", "--study", "deduped")
    assert fresh.returncode == 0, fresh.stderr
    assert "2 test images are copies of training images" in fresh.stderr
    assert "(left out: data.dedupe: eval)" in fresh.stderr
    assert "(40 images)" in fresh.stdout  # the winner scored on the 40 test images left
    best = cli("best", str(changed), "--study", "deduped")
    assert best.returncode == 0, best.stderr
    assert "on 40 held-out images" in best.stdout


def test_dedupe_eval_leaves_the_copies_out_of_validation_and_test(
    copied: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    from tlsweep.audit import eval_copies, warn_copies
    from tlsweep.config import load_sweep
    from tlsweep.features import extract_all

    doc_off = load_sweep(copied["sweep"])
    entries = extract_all(doc_off)
    same, report = eval_copies(doc_off, entries)
    assert {s: len(v) for s, v in report.copies_of_train.items()} == {"validation": 1, "test": 2}
    assert same[0][1].split_sizes() == {"train": 80, "validation": 41, "test": 42}
    import yaml

    doc = yaml.safe_load(copied["sweep"].read_text())
    doc["data"]["dedupe"] = "eval"
    (copied["dir"] / "eval2.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_sweep(copied["dir"] / "eval2.yaml")
    assert cfg.space_fingerprint() != doc_off.space_fingerprint()
    kept, report = eval_copies(cfg, extract_all(cfg))
    with caplog.at_level("WARNING", logger="tlsweep"):
        counts = warn_copies(cfg, report)
    assert counts == {"validation": 1, "test": 2}
    entry = kept[0][1]
    assert entry.split_sizes() == {"train": 80, "validation": 40, "test": 40}
    paths = {f["path"] for f in entry.manifest["files"]}
    assert not paths & {"test/cats/copy-1.jpg", "test/dogs/copy-2.jpg", "validation/cats/re.jpg"}
    x, y = entry.split("test")
    assert len(x) == len(y) == 40
    assert "left out: data.dedupe: eval" in caplog.text


def test_a_bad_dedupe_value_is_one_error_line(tmp_path: Path, cli: Any) -> None:
    (tmp_path / "images").mkdir()
    import yaml

    sweep = write_sweep(tmp_path / "s.yaml", tmp_path / "images")
    doc = yaml.safe_load(sweep.read_text())
    doc["data"]["dedupe"] = "all"
    sweep.write_text(yaml.safe_dump(doc))
    out = cli("run", str(sweep), "-q")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "data.dedupe" in line and "off, eval" in line
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_dedupe_off_written_plainly_in_yaml_is_off(tmp_path: Path) -> None:
    """``dedupe: off`` unquoted is YAML's false: it means off, as written."""
    from tlsweep.config import load_sweep

    (tmp_path / "images").mkdir()
    sweep = write_sweep(tmp_path / "s.yaml", tmp_path / "images")
    sweep.write_text(sweep.read_text().replace("data:\n", "data:\n  dedupe: off\n", 1))
    assert "dedupe: off" in sweep.read_text()
    assert load_sweep(sweep, check_data_dir=False).data.dedupe == "off"


def test_audit_goes_on_the_study_run_and_creates_nothing_without_one(
    cats_dogs_small: Path, tmp_path: Path, cli: Any
) -> None:
    """Before any run, audit creates no tracking store; after one, its copies and its likely
    label errors are on the study's run as MLflow tables and grids."""
    import json

    from mlflow import MlflowClient

    data = tmp_path / "data"
    shutil.copytree(cats_dogs_small, data)
    for f in sorted((data / "train" / "cats").iterdir())[:3]:  # filed under the wrong class
        shutil.move(f, data / "train" / "dogs" / f"flipped-{f.name}")
    sweep = write_sweep(tmp_path / "sweep.yaml", data, search=SEARCH)
    first = cli("audit", str(sweep), "-q", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no study yet: nothing made for it
    assert cli("run", str(sweep), "-q", cwd=tmp_path).returncode == 0
    out = cli("audit", str(sweep), "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    parent = _parent(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "audit")}
    assert {"audit/label_issues.json", "audit/label_issues.png"} <= arts, sorted(arts)
    table = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "audit/label_issues.json")).read_text()
    )
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert rows and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["file"].startswith(("train/", "validation/")) for r in rows)
