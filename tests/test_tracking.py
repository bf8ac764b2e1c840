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
