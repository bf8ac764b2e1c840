"""The real ``tlsweep`` command line end to end: Optuna storage + MLflow runs, resume, kill -9.

Every sweep here reads the features that ``cd_features`` put in ``shared_cache`` (a cache hit),
so a run costs the process start, the trials and the MLflow logging. The studies of this module
share one MLflow SQLite store (one experiment per study) to pay its schema migration once.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    MNV2_WEIGHTS,
    TWO_MOBILENETS,
    CliInProcess,
    need_shared,
    run_cli,
    write_sweep,
)

PARENT_ATTR = "tlsweep.mlflow_parent_run"
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
REQUIRED_PARAMS = (
    "units",
    "dropout",
    "learning_rate",
    "batch_size",
    "epochs",
    "backbone",
    "input_size",
    "pooling",
    "cache_key",
    "data_dir",
    "train_size",
    "validation_size",
)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _sweep(d: Path, data: Path, cache: Path, tracking_uri: str, study: str, **kw: Any) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return write_sweep(
        d / "sweep.yaml", data, study=study, cache_dir=cache, tracking_uri=tracking_uri, **kw
    )


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd: MLflow puts artifacts of a SQLite store under ./mlruns of the working directory
    r = run_cli(*args, cwd=cwd)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _storage(d: Path) -> str:
    return f"sqlite:///{d / 'optuna.db'}"


def _trials(d: Path, study: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=_storage(d)).get_trials(deepcopy=True)


def _study(d: Path, study: str):  # noqa: ANN202
    import optuna

    return optuna.load_study(study_name=study, storage=_storage(d))


def _mlflow(tracking_uri: str, study: str) -> dict[str, Any]:
    """Every run of the study's experiment: parents, children by trial number, histories."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no MLflow experiment {study}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    children = [r for r in runs if r.data.tags.get("tlsweep.role") == "trial"]
    histories = {
        r.info.run_id: {
            k: [
                (m.step, m.value)
                for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)
            ]
            for k in METRICS
        }
        for r in children
    }
    return {"runs": runs, "parents": parents, "children": children, "histories": histories}


def _by_trial(children: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in children:
        out.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    return out


# --- one study: 3 trials, then resumed to 5 ----------------------------------------------------
@pytest.fixture(scope="module")
def resumed(
    cd_features,
    cats_dogs_small: Path,
    shared_cache: Path,
    tracking_uri: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("resume")
    sweep = _sweep(d, cats_dogs_small, shared_cache, tracking_uri, "resume")
    first = _run("run", str(sweep), "-q", cwd=d)
    after3 = {"trials": _trials(d, "resume"), "mlflow": _mlflow(tracking_uri, "resume")}
    second = _run("run", str(sweep), "-q", "--n-trials", "5", cwd=d)
    after5 = {"trials": _trials(d, "resume"), "mlflow": _mlflow(tracking_uri, "resume")}
    return {
        "dir": d,
        "sweep": sweep,
        "first": first,
        "second": second,
        "after3": after3,
        "after5": after5,
        "entry": cd_features,
        "data": cats_dogs_small,
    }


@pytest.mark.slow  # the `resumed` fixture runs the CLI twice
def test_run_three_trials_logs_everything(resumed: dict[str, Any]) -> None:
    trials = resumed["after3"]["trials"]
    assert [t.number for t in trials] == [0, 1, 2]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert all(0.0 <= t.value <= 1.0 for t in trials)
    assert "[3/3]" in resumed["first"].stdout and "3/3 finished" in resumed["first"].stdout

    ml = resumed["after3"]["mlflow"]
    (parent,) = ml["parents"]
    assert parent.info.status == "FINISHED"
    assert _study(resumed["dir"], "resume").user_attrs[PARENT_ATTR] == parent.info.run_id
    children = _by_trial(ml["children"])
    assert sorted(children) == [0, 1, 2] and all(len(v) == 1 for v in children.values())
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]
    entry = resumed["entry"]
    sizes = entry.split_sizes()
    for t in trials:
        (run,) = children[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.info.status == "FINISHED"
        p = run.data.params
        assert set(REQUIRED_PARAMS) <= set(p), set(REQUIRED_PARAMS) - set(p)
        assert int(p["units"]) == t.params["units"]
        assert float(p["dropout"]) == pytest.approx(t.params["dropout"])
        assert float(p["learning_rate"]) == pytest.approx(t.params["learning_rate"])
        assert int(p["batch_size"]) == t.params["batch_size"]
        assert p["epochs"] == "5" and p["input_size"] == "96" and p["pooling"] == "avg"
        assert p["backbone"] == "MobileNetV2-alpha0.35-96-avg"
        assert p["cache_key"] == entry.key
        assert p["data_dir"] == str(resumed["data"])
        assert int(p["train_size"]) == sizes["train"] == 80
        assert int(p["validation_size"]) == sizes["validation"] == 40
        hist = ml["histories"][run.info.run_id]
        for k in METRICS:
            assert [s for s, _ in hist[k]] == list(range(5)), k
        assert hist["val_accuracy"][-1][1] == pytest.approx(t.value, abs=1e-6)
        assert run.data.metrics["val_accuracy"] == pytest.approx(t.value, abs=1e-6)


@pytest.mark.slow  # the `resumed` fixture runs the CLI twice
def test_resume_continues_the_same_study_under_the_same_parent(resumed: dict[str, Any]) -> None:
    before, after = resumed["after3"], resumed["after5"]
    trials = after["trials"]
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    for old, new in zip(before["trials"], trials[:3], strict=True):  # never redone
        assert (new.params, new.value, new.datetime_complete) == (
            old.params,
            old.value,
            old.datetime_complete,
        )
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5
    (parent,) = after["mlflow"]["parents"]
    assert parent.info.run_id == before["mlflow"]["parents"][0].info.run_id
    assert parent.info.status == "FINISHED"
    children = _by_trial(after["mlflow"]["children"])
    assert sorted(children) == [0, 1, 2, 3, 4] and all(len(v) == 1 for v in children.values())
    for (run,) in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
    assert not [r for r in after["mlflow"]["runs"] if r.info.status == "RUNNING"]
    assert "[5/5]" in resumed["second"].stdout and "[4/5]" in resumed["second"].stdout
    assert "[3/5]" not in resumed["second"].stdout


@pytest.mark.slow  # the `resumed` fixture runs the CLI twice
def test_status_prints_the_counts(resumed: dict[str, Any]) -> None:
    r = _run("status", str(resumed["sweep"]), cwd=resumed["dir"])
    m = re.search(
        r"study resume: (\d+)/(\d+) finished \((\d+) complete, (\d+) pruned\), "
        r"(\d+) failed, (\d+) running, (\d+) queued",
        r.stdout,
    )
    assert m, r.stdout
    trials = _trials(resumed["dir"], "resume")
    n = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert int(m[1]) == n["COMPLETE"] + n["PRUNED"] == 5
    assert int(m[2]) == 3  # n_trials of the sweep file
    assert (int(m[3]), int(m[4]), int(m[5]), int(m[6]), int(m[7])) == (
        n["COMPLETE"],
        n["PRUNED"],
        n["FAIL"],
        0,
        0,
    )
    best = max(trials, key=lambda t: t.value)
    assert re.search(rf"^\s+{best.number}\s+{best.value:.4f}", r.stdout, re.M), r.stdout


@pytest.mark.slow  # the `resumed` fixture runs the CLI twice
def test_status_of_a_missing_study(resumed: dict[str, Any]) -> None:
    r = run_cli("status", str(resumed["sweep"]), "--study", "never-ran", cwd=resumed["dir"])
    assert r.returncode == 2
    assert r.stderr.startswith("tlsweep: error:") and "never-ran" in r.stderr


@pytest.mark.slow  # the `resumed` fixture runs the CLI twice
def test_changed_search_space_is_refused(resumed: dict[str, Any], tracking_uri: str) -> None:
    d = resumed["dir"]
    search = {
        "n_trials": 6,
        "sampler": "random",
        "pruner": "none",
        "space": {"units": {"low": 16, "high": 256, "log": True}, "epochs": 5},
    }
    changed = write_sweep(
        d / "changed.yaml",
        resumed["data"],
        study="resume",
        cache_dir=resumed["entry"].path.parent,
        tracking_uri=tracking_uri,
        search=search,
    )
    r = run_cli("run", str(changed), "-q", cwd=d)
    assert r.returncode == 2, r.stderr[-3000:]
    ours = [line for line in r.stderr.splitlines() if line.startswith("tlsweep:")]
    assert len(ours) == 1, r.stderr
    assert ours[0].startswith("tlsweep: error:") and "--study" in ours[0]
    assert "Traceback" not in r.stderr
    assert len(_trials(d, "resume")) == 5  # nothing was added


@pytest.mark.slow  # the `resumed` fixture runs the CLI twice
def test_changed_data_or_weights_are_refused(
    resumed: dict[str, Any], tracking_uri: str, tmp_path: Path
) -> None:
    """Same study name, other images or other weights bytes: run, best and export refuse it
    before extracting anything (no new cache entry), status warns; nothing is added."""
    d, entry = resumed["dir"], resumed["entry"]
    stored = _study(d, "resume").user_attrs["tlsweep.data"]
    assert stored == {
        "MobileNetV2-alpha0.35-96-avg": {"key": entry.key, "parts": entry.manifest["key_parts"]}
    }
    cache = entry.path.parent
    entries_before = sorted(p.name for p in cache.iterdir())
    data = Path(shutil.copytree(resumed["data"], tmp_path / "data"))
    next((data / "train" / "cats").iterdir()).unlink()
    edited = tmp_path / "edited.h5"
    raw = bytearray(MNV2_WEIGHTS.read_bytes())
    raw[-100] ^= 0xFF
    edited.write_bytes(bytes(raw))
    bb = {"name": "MobileNetV2", "weights": str(edited), "input_size": 96, "pooling": "avg"}
    cases = {
        "images": {"data": data},
        "weights": {"data": resumed["data"], "backbones": [{**bb, "args": {"alpha": 0.35}}]},
    }
    for what, kw in cases.items():
        sweep = write_sweep(
            tmp_path / f"{what}.yaml",
            kw.pop("data"),
            study="resume",
            cache_dir=cache,
            tracking_uri=tracking_uri,
            storage=_storage(d),
            **kw,
        )
        for command in ("run", "best", "export"):
            args = (command, str(sweep)) + (
                ("-o", str(tmp_path / "m.keras")) * (command == "export")
            )
            r = run_cli(*args, cwd=d)
            assert r.returncode == 2, (what, command, r.stderr[-3000:])
            ours = [line for line in r.stderr.splitlines() if line.startswith("tlsweep:")]
            assert len(ours) == 1 and "Traceback" not in r.stderr, r.stderr
            line = ours[0]
            assert line.startswith("tlsweep: error: study 'resume'"), line
            assert "MobileNetV2-alpha0.35-96-avg" in line and f"the {what}" in line, line
            assert "--study NEW_NAME" in line and "optuna delete-study" in line, line
        status = run_cli("status", str(sweep), cwd=d)
        assert status.returncode == 0 and f"the {what}" in status.stderr, status.stderr[-2000:]
        assert "study resume: 5/" in status.stdout, status.stdout
    assert not (tmp_path / "m.keras").exists()
    # nothing extracted (a changed data folder gets its own stat index: hashes, not features)
    assert sorted(p.name for p in cache.iterdir() if "stat-index" not in p.name) == [
        n for n in entries_before if "stat-index" not in n
    ]
    assert len(_trials(d, "resume")) == 5  # nothing was added


# --- a broken sweep file stops at once ---------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"search": {"n_trials": 0}}, "search.n_trials"),
        ({"search": {"samplr": "tpe"}}, "search.samplr"),
        (
            {"backbones": [{"name": "MobilNetV2", "weights": str(MNV2_WEIGHTS)}]},
            "backbones[0].name",
        ),
        ({"data": {"dir": "no/such/folder"}}, "data.dir"),
    ],
)
def test_bad_field_is_one_error_line(tmp_path: Path, change: dict, field_name: str) -> None:
    need_shared()  # the sweep names the real weights file
    (tmp_path / "images").mkdir()
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "images", **change)
    r = run_cli("run", str(sweep), "-q", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tlsweep: error:") and field_name in lines[0]
    assert r.stdout == ""
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", ["status", "best", "export"])
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_reading_a_study_that_never_ran_creates_nothing(
    tmp_path: Path, command: str, storage: str
) -> None:
    need_shared()  # the sweep names the real weights file
    (tmp_path / "images").mkdir()
    url = {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal": "journal:optuna.log"}
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "images", storage=url[storage])
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command, str(sweep)] + (["-o", str(tmp_path / "model.keras")] * (command == "export"))
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsweep: error: no study 'test'"), r.stderr
    assert "does not exist" in lines[0] and "tlsweep run sweep.yaml" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no empty database left behind


# --- pruning -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_median_pruner_prunes(
    cd_features, cats_dogs_small: Path, shared_cache: Path, tracking_uri: str, tmp_path: Path
) -> None:
    epochs = 8
    search = {
        "n_trials": 10,
        "sampler": "random",
        "pruner": "median",
        "space": {
            "units": {"low": 16, "high": 64},
            "dropout": 0.2,
            "learning_rate": {"low": 1e-6, "high": 1e-1, "log": True},
            "batch_size": 32,
            "epochs": epochs,
        },
    }
    sweep = _sweep(tmp_path, cats_dogs_small, shared_cache, tracking_uri, "pruning", search=search)
    _run("run", str(sweep), "-q", cwd=tmp_path)
    trials = _trials(tmp_path, "pruning")
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 10 and "FAIL" not in states
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, states
    ml = _mlflow(tracking_uri, "pruning")
    children = _by_trial(ml["children"])
    assert sorted(children) == list(range(10))
    for t in pruned:
        (run,) = children[t.number]
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert run.info.status == "FINISHED"
        steps = [s for s, _ in ml["histories"][run.info.run_id]["val_accuracy"]]
        assert steps == list(range(len(steps))) and 1 <= len(steps) < epochs
        assert max(t.intermediate_values) == steps[-1]
    for t in trials:
        if t.state.name == "COMPLETE":
            assert children[t.number][0].data.tags["optuna.state"] == "COMPLETE"
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]


# --- kill -9 in the middle of a trial ----------------------------------------------------------
def _states(db: Path) -> list[tuple[int, str, int]]:
    """(number, state, epochs reported so far) of every trial, read straight from SQLite."""
    query = (
        "SELECT t.number, t.state, (SELECT count(*) FROM trial_intermediate_values v "
        "WHERE v.trial_id = t.trial_id) FROM trials t ORDER BY t.number"
    )
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(query).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []  # not created yet


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_the_study(
    cd_features, cats_dogs_small: Path, shared_cache: Path, tracking_uri: str, tmp_path: Path
) -> None:
    n = 6
    search = {
        "n_trials": n,
        "sampler": "random",
        "pruner": "none",
        "space": {
            "units": {"low": 64, "high": 128},
            "dropout": {"low": 0.0, "high": 0.5},
            "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
            "batch_size": 8,
            "epochs": 60,  # a few seconds per trial
        },
    }
    sweep = _sweep(tmp_path, cats_dogs_small, shared_cache, tracking_uri, "killed", search=search)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            states = _states(tmp_path / "optuna.db")
            finished = [num for num, s, _ in states if s in ("COMPLETE", "PRUNED")]
            # running, and training already (its params and MLflow run exist)
            running = [num for num, s, epochs in states if s == "RUNNING" and epochs > 0]
            if len(finished) >= 2 and len(running) == 1:
                killed = running[0]
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None and killed is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed is not None, (
        f"never saw 2 finished trials and one running: {_states(tmp_path / 'optuna.db')}"
    )
    assert proc.returncode == -signal.SIGKILL
    assert {num: st for num, st, _ in _states(tmp_path / "optuna.db")}[killed] == "RUNNING"
    left = _mlflow(tracking_uri, "killed")
    assert [r for r in left["runs"] if r.info.status == "RUNNING"]  # the kill left runs open

    _run("run", str(sweep), "-q", cwd=tmp_path)
    trials = _trials(tmp_path, "killed")
    by_number = {t.number: t for t in trials}
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == n, states
    assert states.count("RUNNING") == 0 and states.count("WAITING") == 0
    assert by_number[killed].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1, [t.system_attrs for t in trials]
    (retry,) = retries
    assert retry.number > killed and retry.state.name == "COMPLETE"
    assert retry.params == by_number[killed].params

    ml = _mlflow(tracking_uri, "killed")
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]
    (parent,) = ml["parents"]
    assert parent.info.status == "FINISHED"
    children = _by_trial(ml["children"])
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in ml["children"])
    (killed_run,) = children[killed]
    assert killed_run.info.status == "FAILED" and killed_run.data.tags["optuna.state"] == "FAIL"
    finished_runs = [
        r for r in ml["children"] if r.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
    ]
    assert len(finished_runs) == n


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_closes_everything_then_resume_finishes(
    cd_features,
    cats_dogs_small: Path,
    shared_cache: Path,
    tracking_uri: str,
    tmp_path: Path,
    sig: int,
    code: int,
) -> None:
    n = 4
    search = {
        "n_trials": n,
        "sampler": "random",
        "pruner": "none",
        "space": {"units": {"low": 64, "high": 128}, "batch_size": 8, "epochs": 60},
    }
    study = f"stopped-{sig}"
    sweep = _sweep(tmp_path, cats_dogs_small, shared_cache, tracking_uri, study, search=search)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    stopped = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            states = _states(tmp_path / "optuna.db")
            running = [num for num, s, epochs in states if s == "RUNNING" and epochs > 0]
            if len(states) >= 2 and len(running) == 1:  # one finished, the next one training
                stopped = running[0]
                proc.send_signal(sig)
                break
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stopped is not None, f"never saw a trial training: {_states(tmp_path / 'optuna.db')}"
    assert proc.returncode == code, stderr[-2000:]
    assert "tlsweep: interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    # Nothing left RUNNING, before any restart cleans up: the process closed it all itself.
    states = {num: st for num, st, _ in _states(tmp_path / "optuna.db")}
    assert states[stopped] == "FAIL" and "RUNNING" not in states.values(), states
    ml = _mlflow(tracking_uri, study)
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]

    _run("run", str(sweep), "-q", cwd=tmp_path)
    finished = [t for t in _trials(tmp_path, study) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n
    ml = _mlflow(tracking_uri, study)
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]
    assert len(ml["parents"]) == 1


# --- several backbones -------------------------------------------------------------------------
@pytest.mark.slow
def test_multi_backbone_sweep(
    cd_features, cats_dogs_small: Path, shared_cache: Path, tracking_uri: str, tmp_path: Path
) -> None:
    backbones = TWO_MOBILENETS
    search = {  # a grid of 2 backbones x 2 widths: 4 trials cover both backbones twice
        "n_trials": 4,
        "sampler": "grid",
        "pruner": "none",
        "space": {
            "units": {"choices": [16, 32]},
            "dropout": 0.1,
            "learning_rate": 1e-3,
            "batch_size": 32,
            "epochs": 4,
        },
    }
    sweep = _sweep(
        tmp_path,
        cats_dogs_small,
        shared_cache,
        tracking_uri,
        "multi",
        backbones=backbones,
        search=search,
    )
    _run("run", str(sweep), "-q", cwd=tmp_path)
    labels = ["MobileNetV2-alpha0.35-96-avg", "MobileNet-alpha0.25-96-avg"]
    trials = _trials(tmp_path, "multi")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    combos = sorted((t.params["backbone"], t.params["units"]) for t in trials)
    assert combos == sorted((b, u) for b in labels for u in (16, 32))
    children = _by_trial(_mlflow(tracking_uri, "multi")["children"])
    keys = {}
    for t in trials:
        (run,) = children[t.number]
        p = run.data.params
        assert p["backbone"] == t.params["backbone"]
        assert p["backbone_name"] == t.params["backbone"].split("-")[0]
        keys.setdefault(p["backbone"], set()).add(p["cache_key"])
    assert all(len(v) == 1 for v in keys.values()) and len(set.union(*keys.values())) == 2
    assert next(iter(keys[labels[0]])) == cd_features.key


# --- a study that cannot succeed stops -------------------------------------------------------
# The CLI with a head that cannot train: train_head raises an error with a cause.
def _broken_head(*args: Any, **kwargs: Any) -> Any:
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        raise RuntimeError("the head cannot train") from e


_FAILING_HEAD = f"""
from typing import Any

import tlsweep.head

{inspect.getsource(_broken_head)}
tlsweep.head.train_head = _broken_head
"""


def test_trials_that_always_fail_stop_the_run_with_exit_1(
    cd_features,
    cats_dogs_small: Path,
    shared_cache: Path,
    tracking_uri: str,
    tmp_path: Path,
    cli: CliInProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    search = {
        "n_trials": 20,
        "sampler": "random",
        "max_failures": 3,
        "space": {"units": {"low": 16, "high": 128}, "epochs": 2},
    }
    sweep = _sweep(tmp_path, cats_dogs_small, shared_cache, tracking_uri, "failing", search=search)
    # in this process (tlsweep.study._objective takes train_head from tlsweep.head when a trial
    # runs); the
    # same head in real worker processes: test_workers_whose_trials_always_fail_stop_... (slow)
    monkeypatch.setattr("tlsweep.head.train_head", _broken_head)
    r = cli("run", str(sweep), cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("tlsweep: error:")]
    assert "3 trials in a row failed (search.max_failures: 3)" in error, error
    assert "trial 0: RuntimeError: the head cannot train (caused by OSError: [Errno 28]" in error
    assert r.stderr.count("the head cannot train") == 2, r.stderr  # the first warning, the error
    trials = _trials(tmp_path, "failing")
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    ml = _mlflow(tracking_uri, "failing")
    assert [r.info.status for r in ml["children"]] == ["FAILED"] * 3
    (parent,) = ml["parents"]
    assert parent.info.status != "RUNNING"
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]


_FAILING_WINNER = """
import sys
import tlsweep.winner

def broken(*args, **kwargs):
    raise MemoryError("cannot allocate the winner's head")

tlsweep.winner.evaluate_and_log = broken
from tlsweep.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a whole run through the CLI
def test_a_crash_while_scoring_the_winner_is_exit_1_and_the_trials_are_safe(
    cd_features, cats_dogs_small: Path, shared_cache: Path, tracking_uri: str, tmp_path: Path
) -> None:
    search = {"n_trials": 2, "sampler": "random", "space": {"units": 16, "epochs": 2}}
    sweep = _sweep(
        tmp_path, cats_dogs_small, shared_cache, tracking_uri, "winner_crash", search=search
    )
    r = subprocess.run(
        [sys.executable, "-c", _FAILING_WINNER, "run", str(sweep)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("tlsweep: error:")]
    assert "2 trials finished and saved, but scoring the winner failed: MemoryError" in error
    assert "tlsweep best sweep.yaml" in error
    assert [t.state.name for t in _trials(tmp_path, "winner_crash")] == ["COMPLETE"] * 2
    ml = _mlflow(tracking_uri, "winner_crash")
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]


@pytest.mark.slow  # three processes
def test_workers_whose_trials_always_fail_stop_and_close_everything(
    cd_features, cats_dogs_small: Path, shared_cache: Path, tracking_uri: str, tmp_path: Path
) -> None:
    """`run --workers 2` with a head that cannot train (in every worker, through a
    sitecustomize): each worker stops after max_failures, the run exits 1, nothing RUNNING."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAILING_HEAD)
    search = {"n_trials": 20, "sampler": "random", "max_failures": 2, "space": {"epochs": 2}}
    sweep = _sweep(tmp_path, cats_dogs_small, shared_cache, tracking_uri, "failing2", search=search)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "--workers", "2", "-q"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path},
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.count("2 trials in a row failed (search.max_failures: 2)") == 2, r.stderr
    assert "2 of 2 workers exited with an error (codes [1, 1])" in r.stderr
    assert [t.state.name for t in _trials(tmp_path, "failing2")] == ["FAIL"] * 4
    ml = _mlflow(tracking_uri, "failing2")
    assert len(ml["children"]) == 4 and len(ml["parents"]) == 1
    assert not [r for r in ml["runs"] if r.info.status == "RUNNING"]
