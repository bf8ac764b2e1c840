"""`tlsweep ui` and what the MLflow UI shows: the experiment's kind, run names, the server.

The server tests start the real `tlsweep ui` in a subprocess and send it real signals; each
checks afterwards that no process of the MLflow server is left and the port is free. The
browser test drives Debian's Chromium through Playwright (no browser download) after a real
sweep, as a user would: skipped without chromium or playwright, required in CI (CI=true).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import CliInProcess, _in_ci, run_cli, write_sweep

from tlsweep.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    Tracker,
    best_first_url,
    runs_page_url,
    trial_run_name,
)
from tlsweep.tracking._ui import group_members

CHROMIUM = os.environ.get("TLSWEEP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The MLflow server starts in ~5 s on an idle machine; a loaded 2-core CI box needs far more.
SERVER_WAIT = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def processes_with(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and alive(int(d.name)):
                out.append(int(d.name))
    return out


def tiny_store(tmp_path: Path, studies: tuple[str, ...] = ("ui_test",)) -> Path:
    """A sweep file (random-weights backbone, no data needed) and a tracking store holding
    ``studies``, each with a parent run, made in-process without TensorFlow."""
    db = tmp_path / "mlflow.db"
    for name in studies:
        t = Tracker(f"sqlite:///{db}", name)
        t.create_parent({"n_trials": 1}, "study: x\n", "sweep.yaml")
        t.close_parent(True)
    sweep = tmp_path / "sweep.yaml"
    doc = {
        "study": studies[0] if studies else "ui_test",
        "data": {"dir": str(tmp_path / "no_images_needed")},
        "backbones": [{"name": "MobileNetV2", "weights": "none", "input_size": 96}],
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "tracking_uri": f"sqlite:///{db}",
    }
    sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
    return sweep


class UiProcess:
    """`tlsweep ui` in a subprocess, its output collected by a thread."""

    def __init__(self, *args: str, cwd: Path | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tlsweep", "ui", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _drain(stream, sink: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            sink.append(line)

    def wait_url(self, timeout: float = SERVER_WAIT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out:
                if line.startswith("http"):
                    return line.strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"tlsweep ui printed no URL:\n{''.join(self.out)}\n{''.join(self.err)}")

    def urls(self) -> list[str]:
        return [line.strip() for line in self.out if line.startswith("http")]

    def server_pid(self) -> int:
        """The MLflow launcher: a child of `tlsweep ui`, leader of its own process group."""
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                    cmd = (d / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[1]) == self.proc.pid and b"mlflow" in cmd:
                    return int(d.name)
        pytest.fail("tlsweep ui has no MLflow child process")

    def kill(self) -> None:
        """Clean-up after a failed test: the whole server group, then tlsweep ui."""
        if self.proc.poll() is None:
            try:
                pgid = self.server_pid()
                os.killpg(pgid, signal.SIGKILL)
            except BaseException:  # noqa: BLE001 - best effort, the test has already failed
                pass
            self.proc.kill()
            self.proc.wait()


# --- what MLflow stores --------------------------------------------------------------------------
def test_experiment_is_marked_as_model_training_when_created_and_reused(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "fresh")
    assert t.client.get_experiment(t.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    # made by plain MLflow (or by an older tlsweep): tagged when tlsweep reuses it
    old = MlflowClient(uri).create_experiment("older")
    assert EXPERIMENT_KIND_TAG not in MlflowClient(uri).get_experiment(old).tags
    t2 = Tracker(uri, "older")
    assert t2.experiment_id == old
    assert MlflowClient(uri).get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_trial_runs_are_named_by_number_backbone_and_outcome(tmp_path: Path) -> None:
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "names")
    parent = t.create_parent({"n_trials": 4}, "study: names\n", "sweep.yaml")
    label = "MobileNetV2-alpha0.35-160-avg"
    params = {"backbone": label, "units": 64, "dropout": 0.2, "learning_rate": 1e-3}
    hist = [{"val_accuracy": 0.9, "val_loss": 0.3}]
    done, pruned, failed, stale = (t.start_trial(n, params, "w") for n in (12, 3, 4, 5))
    assert t.client.get_run(done).info.run_name == f"running · trial 12 · {label}"
    t.end_trial(done, "COMPLETE", hist, {}, value=0.97301)
    t.end_trial(pruned, "PRUNED", hist, {}, value=0.5)
    t.end_trial(failed, "FAIL", [], {}, error="ValueError: boom")
    # a run left RUNNING by a process that died: closed, and named, from Optuna's state
    Tracker(t.tracking_uri, "names").close_stale_runs({5: "PRUNED"}, alive=set())
    names = {r: t.client.get_run(r).info.run_name for r in (done, pruned, failed, stale)}
    assert names == {
        done: f"0.9730 · trial 12 · {label}",
        pruned: f"pruned · trial 3 · {label}",
        failed: f"failed · trial 4 · {label}",
        stale: f"pruned · trial 5 · {label}",
    }
    assert t.client.get_run(parent).info.run_name == "names"
    assert trial_run_name(7, "X", "COMPLETE", None) == "complete · trial 7 · X"


def test_runs_page_url_opens_the_training_runs_table() -> None:
    # the route and parameter MLflow 3.17's UI reads (mlflow/server/js: workflowType, runs tab)
    assert (
        runs_page_url("http://127.0.0.1:5000/", "7")
        == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert (
        runs_page_url("http://h:1", "7", "abc")
        == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"
    )


# --- `tlsweep ui`: refusals --------------------------------------------------------------------
# A missing store is refused by a real `python -m tlsweep ui`; the other refusals call the CLI in
# this process (no server is started), those that only read it on one store made once.
@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep file of a tracking store with one study, ``ui_test``, read by refusals."""
    return tiny_store(tmp_path_factory.mktemp("ui_store"))


def test_ui_missing_store_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    sweep = tiny_store(tmp_path, studies=())
    db = tmp_path / "mlflow.db"
    assert not db.exists()
    r = run_cli("ui", str(sweep), "--port", str(free_port()))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("tlsweep: error: ") and "study: ui_test" in r.stderr
    assert "no such study" in r.stderr and "tlsweep run" in r.stderr
    assert not db.exists()  # MLflow would have created an empty store


def test_ui_unknown_study_names_the_flag_and_lists_the_studies(
    tmp_path: Path, cli: CliInProcess
) -> None:
    from mlflow import MlflowClient

    sweep = tiny_store(tmp_path, studies=("cats", "dogs"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = sorted(e.name for e in MlflowClient(uri).search_experiments())
    r = cli("ui", str(sweep), "--study", "birds", "--port", str(free_port()))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("tlsweep: error: --study birds: no such study")
    assert "studies there: cats, dogs; pick one with --study NAME" in r.stderr
    assert sorted(e.name for e in MlflowClient(uri).search_experiments()) == before


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--port", "0"), "tlsweep: error: --port: got 0; expected a port number from 1 to 65535"),
        (("--port", "70000"), "tlsweep: error: --port: got 70000;"),
        (("--start-timeout", "0"), "tlsweep: error: --start-timeout: got 0.0;"),
        (("--host", "no-such-host.invalid"), "tlsweep: error: --host no-such-host.invalid:"),
        (("--host", "192.0.2.1"), "tlsweep: error: --host 192.0.2.1: not an address of this"),
    ],
)
def test_ui_bad_flags(
    ui_store: Path, flags: tuple[str, ...], expected: str, cli: CliInProcess
) -> None:
    extra = () if "--port" in flags else ("--port", str(free_port()))
    r = cli("ui", str(ui_store), *flags, *extra)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(expected) and r.stderr.count("\n") == 1, r.stderr


def test_ui_tracking_server_down_is_one_line(ui_store: Path, cli: CliInProcess) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    r = cli("ui", str(ui_store), "--tracking-uri", down)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"tlsweep: error: cannot read the tracking store {down}: ")
    assert r.stderr.endswith("check that it is up and reachable, then try again\n")


def test_ui_port_in_use_is_one_line(ui_store: Path, cli: CliInProcess) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("ui", str(ui_store), "--port", str(port))
    assert r.returncode == 1, r.stderr
    assert r.stderr == (
        f"tlsweep: error: --port {port}: 127.0.0.1:{port} is already in use; "
        "pick another with --port N\n"
    )
    assert not processes_with(f"--port {port}")  # no server was started


def test_ui_server_that_does_not_come_up_is_stopped(tmp_path: Path) -> None:
    sweep = tiny_store(tmp_path)
    port = free_port()
    r = run_cli("ui", str(sweep), "--port", str(port), "--start-timeout", "0.5", timeout=120)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("tlsweep: error:")]
    assert errors == [
        f"tlsweep: error: the MLflow server did not answer on http://127.0.0.1:{port}/health "
        "within 0.5 s; stopped it (a busy machine may need more: --start-timeout SECONDS)"
    ]
    assert "Traceback" not in r.stderr
    assert not processes_with(f"--port {port}")
    assert port_is_free(port)


# --- `tlsweep ui`: owns its server -------------------------------------------------------------
@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGHUP, marks=pytest.mark.slow),
    ],
    ids=lambda s: s.name,
)
def test_ui_signal_stops_the_whole_server(tmp_path: Path, sig: signal.Signals) -> None:
    sweep = tiny_store(tmp_path)
    port = free_port()
    ui = UiProcess(str(sweep), "--port", str(port), "--start-timeout", str(SERVER_WAIT))
    try:
        url = ui.wait_url()
        t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ui_test")
        base = f"http://127.0.0.1:{port}"
        assert url == runs_page_url(base, t.experiment_id)
        assert ui.urls() == [
            url,
            runs_page_url(base, t.experiment_id, t.find_parent()),
            best_first_url(base, t.experiment_id, "val_accuracy", "maximize"),
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert r.status == 200
        leader = ui.server_pid()
        members = group_members(leader)
        assert leader in group_members(leader)  # it leads a process group of its own
        server = set(processes_with(f"--port {port}")) - {ui.proc.pid}
        assert len(server) >= 2 and server <= set(members)  # the launcher and uvicorn
        ui.proc.send_signal(sig)
        assert ui.proc.wait(timeout=60) == 128 + sig
    finally:
        ui.kill()
    assert not [p for p in members if alive(p)], "a process of the MLflow server survived"
    assert not group_members(leader)
    assert port_is_free(port)
    assert f"stopping the MLflow UI ({sig.name})" in "".join(ui.err)


@pytest.mark.slow
def test_ui_killed_with_sigkill_still_takes_its_server_down(tmp_path: Path) -> None:
    sweep = tiny_store(tmp_path)
    port = free_port()
    ui = UiProcess(str(sweep), "--port", str(port), "--start-timeout", str(SERVER_WAIT))
    leader = 0
    try:
        ui.wait_url()
        leader = ui.server_pid()
        members = group_members(leader)
        ui.proc.kill()  # no handler runs: the parent-death signal must do it
        ui.proc.wait()
        deadline = time.monotonic() + 60
        while any(alive(p) for p in members) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in members if alive(p)], "the MLflow server outlived tlsweep ui"
        assert port_is_free(port)
    finally:
        if leader:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader, signal.SIGKILL)
        ui.kill()


# --- a real sweep, as MLflow shows it ------------------------------------------------------------
@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory, cats_dogs_small: Path) -> Path:
    """A 3-trial sweep on real photos, run by the real CLI; its tracking store is beside it."""
    sweep = write_sweep(
        tmp_path_factory.mktemp("ui_sweep") / "sweep.yaml", cats_dogs_small, study="ui_browser"
    )
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr
    return sweep


def sweep_runs(sweep: Path) -> tuple[object, list, str]:
    """The sweep's (parent run, child runs sorted by trial number, experiment id)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ui_browser")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("tlsweep.role") == "study"]
    children = [x for x in runs if x.data.tags.get("tlsweep.role") == "trial"]
    children.sort(key=lambda x: int(x.data.tags["optuna.trial_number"]))
    return parent, children, exp.experiment_id


@pytest.mark.slow
def test_real_sweep_runs_compare_well(real_sweep: Path) -> None:
    from mlflow import MlflowClient

    parent, children, exp_id = sweep_runs(real_sweep)
    client = MlflowClient(f"sqlite:///{real_sweep.parent / 'mlflow.db'}")
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert parent.info.run_name == "ui_browser"
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [parent.info.run_id] * 3
    for n, c in enumerate(children):
        value = c.data.metrics["val_accuracy"]  # the last epoch's, the trial's value
        label = "MobileNetV2-alpha0.35-96-avg"
        assert c.info.run_name == f"{value:.4f} · trial {n} · {label}"
        assert c.data.params["backbone"] == label
    # the same plain params in every child, numbers as numbers, for MLflow's chart views
    keys = {frozenset(c.data.params) for c in children}
    assert len(keys) == 1
    compared = {"backbone", "units", "dropout", "learning_rate", "batch_size", "input_size"}
    assert compared <= set(next(iter(keys)))
    for c in children:
        for k in ("units", "dropout", "learning_rate", "batch_size", "input_size"):
            float(c.data.params[k])


# --- a real browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser_path() -> str:
    """The system Chromium and Playwright, or skip (fail in CI) when either is missing."""
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if missing:
        msg = "the browser test needs " + " and ".join(missing)
        if _in_ci():
            pytest.fail(msg + " (required in CI)")
        pytest.skip(msg)
    return CHROMIUM


def real_sweep_data_name(sweep: Path) -> str:
    """The name the runs give their data folder in MLflow's Dataset column."""
    import yaml

    return Path(yaml.safe_load(sweep.read_text())["data"]["dir"]).name


@pytest.mark.browser
@pytest.mark.slow
def test_browser_lands_on_the_training_runs(
    browser_path: str, real_sweep: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    parent, children, _ = sweep_runs(real_sweep)
    trials = [c.info.run_name for c in children]
    test_accuracy = parent.data.metrics["test_accuracy"]

    port = free_port()
    ui = UiProcess(str(real_sweep), "--port", str(port), "--start-timeout", str(SERVER_WAIT))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        url = ui.wait_url()
        assert "/runs?workflowType=machine_learning" in url
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(dir=tmp_path, prefix="profile-"),  # a fresh profile
                executable_path=browser_path,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1600, "height": 1000},
            )
            try:
                page = ctx.new_page()
                page.set_default_timeout(120_000)
                page.goto(url)
                # the training-runs table with the parent run, not a GenAI overview page
                run_link = "a[href*='/runs/']"
                parent_row = page.locator(
                    "[role=row]", has=page.locator(run_link, has_text="ui_browser")
                ).first
                parent_row.wait_for()
                assert page.get_by_role("heading", name="Runs").is_visible()
                for genai in ("Overview", "Evaluation runs"):  # GenAI's side menu
                    assert page.get_by_text(genai, exact=True).filter(visible=True).count() == 0
                assert page.get_by_text("No data available").filter(visible=True).count() == 0
                page.screenshot(path=str(shots / "1-training-runs.png"))
                # expand the parent: every trial nested under it (hidden until then), named
                # for scanning
                trial_links = page.locator(run_link, has_text="trial ").filter(visible=True)
                assert trial_links.count() == 0
                parent_row.locator("button[data-component-id*='runnamecellrenderer']").click()
                for name in trials:
                    page.locator(run_link, has_text=name).first.wait_for()
                page.screenshot(path=str(shots / "2-trials-nested.png"))
                # the Dataset column names what each trial trained on (MLflow datasets logged
                # with the cache key as digest), not "-"
                data = real_sweep_data_name(real_sweep)
                page.get_by_text(f"{data}/train").filter(visible=True).first.wait_for()
                # the parent's page: the winner's test metrics
                page.locator(run_link, has_text="ui_browser").first.click()
                page.wait_for_url(re.compile(f"/runs/{parent.info.run_id}"))
                row = page.locator(
                    "[role=row]", has=page.locator("a", has_text=re.compile("^test_accuracy$"))
                ).first
                row.scroll_into_view_if_needed()
                assert str(test_accuracy) in row.inner_text()  # JS prints doubles as repr does
                page.screenshot(path=str(shots / "3-parent-test-metrics.png"))
                # the parent's page as `tlsweep ui` prints it: in the model-training view
                parent_url = ui.urls()[1]
                assert f"/runs/{parent.info.run_id}?workflowType=machine_learning" in parent_url
                page.goto(parent_url)
                page.reload()  # a hash change alone keeps the page's state
                row.wait_for()
                assert str(test_accuracy) in row.inner_text()
                for genai in ("Evaluation runs", "Judges", "Prompts"):  # GenAI's side menu
                    assert page.get_by_text(genai, exact=True).filter(visible=True).count() == 0
                row.scroll_into_view_if_needed()
                page.screenshot(path=str(shots / "4-printed-parent-page.png"))
            finally:
                ctx.close()
        print("screenshots:", *sorted(str(s) for s in shots.iterdir()), sep="\n  ")
    finally:
        if ui.proc.poll() is None:
            ui.proc.send_signal(signal.SIGTERM)
            ui.proc.wait(timeout=60)
        ui.kill()
    assert port_is_free(port)


# --- a study larger than one page of the UI ------------------------------------------------------
BIG_TRIALS = 150  # the UI pages at 100 runs
BEST_TRIAL = 7  # an early trial: the UI's default order (newest first) leaves it off page one


def big_store(tmp_path: Path) -> tuple[Path, dict[int, float]]:
    """A sweep file and a tracking store holding a study of :data:`BIG_TRIALS` finished trials,
    made through the tracking API (no training); returns the trials' values."""
    from mlflow.entities import Metric, Param

    sweep = tiny_store(tmp_path, studies=("big_study",))
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "big_study")
    parent = t.find_parent()
    # distinct values (151 is prime), the best one set apart
    values = {n: round(0.5 + 0.4 * ((n * 37) % 151) / 151, 4) for n in range(BIG_TRIALS)}
    values[BEST_TRIAL] = 0.9876
    for n, v in values.items():
        label = ("MobileNetV2-alpha0.35-160-avg", "MobileNet-alpha0.25-160-avg")[n % 2]
        run = t.client.create_run(
            t.experiment_id,
            run_name=trial_run_name(n, label, "COMPLETE", v),
            tags={
                "mlflow.parentRunId": parent,
                "tlsweep.study": "big_study",
                "tlsweep.role": "trial",
                "optuna.trial_number": str(n),
                "optuna.state": "COMPLETE",
            },
        )
        t.client.log_batch(
            run.info.run_id,
            metrics=[Metric("val_accuracy", v, 0, 0)],
            params=[Param("backbone", label), Param("units", str(32 + n))],
        )
        t.client.set_terminated(run.info.run_id, "FINISHED")
    return sweep, values


@pytest.mark.browser
@pytest.mark.slow
def test_browser_best_first_address_opens_a_large_study_on_its_best_trial(
    browser_path: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    sweep, values = big_store(tmp_path)
    best = max(values, key=values.get)
    assert best == BEST_TRIAL
    port = free_port()
    ui = UiProcess(str(sweep), "--port", str(port), "--start-timeout", str(SERVER_WAIT))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        ui.wait_url()
        deadline = time.monotonic() + 60
        while len(ui.urls()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        best_first = ui.urls()[2]
        assert "the trials, best first (by val_accuracy, highest first):\n" in "".join(ui.out)
        assert best_first.endswith("&orderByKey=metrics.%60val_accuracy%60&orderByAsc=false")
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(dir=tmp_path, prefix="profile-"),
                executable_path=browser_path,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1600, "height": 1000},
            )
            try:
                page = ctx.new_page()
                page.set_default_timeout(120_000)
                trial_links = page.locator("a[href*='/runs/']", has_text=" · trial ")
                # a fresh browser opens the runs page newest first, the trials under the
                # study's run: expanded, the best trial (an early one) is beyond the first 100
                page.goto(ui.urls()[0])
                parent_row = page.locator(
                    "[role=row]", has=page.locator("a[href*='/runs/']", has_text="big_study")
                ).first
                parent_row.locator("button[data-component-id*='runnamecellrenderer']").click()
                trial_links.first.wait_for()
                newest = f"trial {BIG_TRIALS - 1}"
                assert trial_links.first.inner_text().split(" · ")[1] == newest
                assert page.locator("a", has_text=f"· trial {best} ·").count() == 0
                # the best-first address: the best trial first, then the next best
                page.goto(best_first)
                page.reload()  # a hash change alone keeps the page's state
                trial_links.first.wait_for()
                ranked = sorted(values, key=values.get, reverse=True)
                shown = [trial_links.nth(i).inner_text() for i in range(5)]
                assert shown[0].startswith(f"{values[best]:.4f} · trial {best} · ")
                assert [s.split(" · ")[1] for s in shown] == [f"trial {n}" for n in ranked[:5]]
                page.screenshot(path=str(shots / "ui-runs.png"))
            finally:
                ctx.close()
        print("screenshots:", *sorted(str(s) for s in shots.iterdir()), sep="\n  ")
    finally:
        if ui.proc.poll() is None:
            ui.proc.send_signal(signal.SIGTERM)
            ui.proc.wait(timeout=60)
        ui.kill()
    assert port_is_free(port)
