"""Each trial run records its data as MLflow datasets: named by folder and split, the cache
key as digest, context training / validation (the runs table's Dataset column)."""

from __future__ import annotations

from pathlib import Path

from tlsweep.tracking import Tracker


def test_a_trial_run_records_its_training_and_validation_data(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "lineage")
    t.create_parent({"n": 1}, "study: lineage\n", "sweep.yaml")
    key = "ab" * 32
    params = {
        "units": 8,
        "cache_key": key,
        "data_dir": str(tmp_path / "cats_vs_dogs"),
        "train_size": 80,
        "validation_size": 40,
        "test_size": 40,
    }
    run_id = t.start_trial(0, params, "host:1:1")
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    got = {
        (i.dataset.name, i.dataset.digest, tuple((g.key, g.value) for g in i.tags)) for i in inputs
    }
    assert got == {
        ("cats_vs_dogs/train", key[:16], (("mlflow.data.context", "training"),)),
        ("cats_vs_dogs/validation", key[:16], (("mlflow.data.context", "validation"),)),
    }
    assert all('"num_rows"' in i.dataset.profile for i in inputs)
    # a trial logged without data (as some unit tests start them) records no dataset
    bare = t.start_trial(1, {"units": 8}, "host:1:1")
    assert MlflowClient(uri).get_run(bare).inputs.dataset_inputs == []
