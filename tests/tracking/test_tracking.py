"""MLflow tracking with study names MLflow's filter strings cannot quote, and bounded retries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tlsweep.errors import ServiceError
from tlsweep.tracking import Tracker, check_server

NAMES = ["it's", 'say "hi"', "both ' and \"", "team/exp 1 été"]


def test_odd_study_names_find_their_own_parent_and_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, trials = {}, {}
    for name in NAMES:
        t = Tracker(uri, name)
        assert t.find_parent() is None
        parents[name] = t.create_parent({"n": 1}, "study: x\n", "sweep.yaml")
        trials[name] = t.start_trial(0, {"units": 8}, "host:1:1")
    for name in NAMES:
        t = Tracker(uri, name)  # a resumed process finds the same experiment and parent
        assert t.attach_parent(None, {}, "", "sweep.yaml") == parents[name]
    # closing the runs a dead process left RUNNING touches this study's runs only
    t = Tracker(uri, NAMES[0], parents[NAMES[0]])
    assert t.close_stale_runs({0: "FAIL"}, alive=set()) == 1
    status = {n: t.client.get_run(trials[n]).info.status for n in NAMES}
    assert status == {NAMES[0]: "FAILED", **{n: "RUNNING" for n in NAMES[1:]}}


def test_a_tracking_server_that_is_down_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = s.getsockname()[1]
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # the user's own setting
        with pytest.raises(ServiceError) as e:
            check_server(f"http://user:s3cret@127.0.0.1:{port}")
    msg = str(e.value)
    assert "\n" not in msg and "s3cret" not in msg
    assert "Connection refused" in msg and "run the command again" in msg
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # restored after the check


def test_a_parent_whose_creator_died_before_describing_it_is_described_on_resume(
    tmp_path: Path,
) -> None:
    """A process killed between creating the parent run and logging its params: the next one
    attaches to that parent (found by its tags) and logs the params and the sweep file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "s")
    bare = t.client.create_run(
        t.experiment_id, run_name="s", tags={"tlsweep.role": "study", "tlsweep.study": "s"}
    ).info.run_id  # what create_parent had made when the kill came
    t2 = Tracker(uri, "s")
    assert t2.attach_parent(None, {"n": 1}, "study: s\n", "s.yaml") == bare
    run = t2.client.get_run(bare)
    assert run.data.params == {"n": "1"} and run.info.status == "RUNNING"
    (sweep,) = t2.client.list_artifacts(bare, "sweep")
    assert sweep.path == "sweep/s.yaml"
    # and a described parent is left as it is on the next resume
    assert Tracker(uri, "s").attach_parent(bare, {"n": 2}, "study: s\n", "s.yaml") == bare
    assert t2.client.get_run(bare).data.params == {"n": "1"}


def test_a_change_is_logged_even_if_the_run_that_saw_it_first_was_killed(tmp_path: Path) -> None:
    """The resolved sweep goes to MLflow before the study: a run killed in between logs the
    change again next time, rather than never (the study would already hold the new record)."""
    import dataclasses

    import optuna
    from conftest import trial_inputs

    from tlsweep.sweep import record_resolved

    class Killed:
        def log_resolved(self, text: str, changed: list[str]) -> None:
            raise SystemExit(9)

    class Logs:
        def __init__(self) -> None:
            self.changed: list[list[str]] = []

        def log_resolved(self, text: str, changed: list[str]) -> None:
            self.changed.append(changed)

    cfg, _ = trial_inputs(tmp_path)
    study = optuna.create_study()
    logs = Logs()
    assert record_resolved(cfg, study, logs) == []
    more = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, n_trials=7))
    with pytest.raises(SystemExit):
        record_resolved(more, study, Killed())
    (line,) = record_resolved(more, study, logs)
    assert line.startswith("search.n_trials: 3 -> 7"), line
    assert logs.changed[-1] == [line]


# A password with every character that breaks naive URL parsing: "/", ":", "@" (written %40 in
# the URL, as SQLAlchemy needs) and a %-escape; found anywhere below in either form is a leak.
PASSWORD = "Sekr1t/Pw:k@Zz"
WRITTEN = "Sekr1t/Pw:k%40Zz"


@pytest.mark.postgres
def test_a_storage_password_reaches_neither_mlflow_nor_the_console(tmp_path: Path) -> None:
    """A tiny sweep on PostgreSQL as a user whose password has a "/": the whole MLflow store
    (database bytes, every artifact) and the console hold the password in no form."""
    import uuid

    import sqlalchemy
    from conftest import (
        CATS_DOGS,
        TINY,
        CliInProcess,
        create_database,
        need_shared,
        server_url,
        small_copy,
        write_sweep,
    )
    from sqlalchemy.engine import make_url

    need_shared()
    url = server_url("postgres")
    user = f"tl_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f"CREATE ROLE {user} LOGIN PASSWORD '{PASSWORD}'"))
    finally:
        engine.dispose()
    db = make_url(create_database(url, f"optuna_{uuid.uuid4().hex[:10]}")).database
    server = make_url(url)
    storage = f"postgresql://{user}:{WRITTEN}@{server.host}:{server.port}/{db}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f'ALTER DATABASE "{db}" OWNER TO {user}'))
    finally:
        engine.dispose()
    assert make_url(storage).password == PASSWORD  # the URL a user would write
    data = tmp_path / "photos"
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        small_copy(CATS_DOGS / split, data / split, n, None)
    search = {
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "space": {"units": 8, "learning_rate": 1e-3, "batch_size": 16, "epochs": 1},
    }
    mlruns = tmp_path / "store"
    mlruns.mkdir()
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        data,
        study="secret",
        backbones=TINY,
        search=search,
        storage=storage,
        tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}",
        cache_dir=str(tmp_path / "cache"),
    )
    assert PASSWORD in sweep.read_text() or WRITTEN in sweep.read_text()
    r = CliInProcess()("run", str(sweep), cwd=mlruns)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = [PASSWORD.encode(), WRITTEN.encode(), b"Sekr1t"]
    console = (r.stdout + r.stderr).encode()
    assert not [b for b in bad if b in console], r.stdout + r.stderr
    files = [p for p in mlruns.rglob("*") if p.is_file()]
    assert len(files) > 3 and any(p.name == "sweep.yaml" for p in files), files
    assert any(p.name == "resolved.yaml" for p in files), files
    leaks = [str(p) for p in files for b in bad if b in p.read_bytes()]
    assert not leaks, leaks
    # what was logged still names the server and the user
    logged = next(p for p in files if p.name == "sweep.yaml").read_text()
    assert f"postgresql://{user}:***@{server.host}:{server.port}/{db}" in logged
