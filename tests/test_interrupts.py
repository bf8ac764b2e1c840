"""A stop signal never cuts a step in two: held inside `deferred`, raised once the step is whole.

The signal here is SIGUSR1 routed to `interrupt()` as the CLI routes Ctrl-C, SIGTERM and SIGHUP,
delivered for real (`os.kill` of this process), so Python runs the handler between bytecodes as
it does for a user's signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import trial_inputs

from tlsweep.interrupts import clear, deferred, interrupt, requested


@pytest.fixture
def stop_signal() -> Iterator[None]:
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: interrupt())
    yield
    signal.signal(signal.SIGUSR1, previous)
    clear()


def _signal() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before the next line


def test_an_interrupt_outside_a_step_stops_at_once(stop_signal: None) -> None:
    after = []
    with pytest.raises(KeyboardInterrupt):
        _signal()
        after.append(1)
    assert after == []


def test_an_interrupt_inside_a_step_is_raised_when_it_ends(stop_signal: None) -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred():
            _signal()
            done.append("first half")
            with deferred():  # nested: held until the outer step ends
                done.append("inner")
            done.append("second half")
    assert done == ["first half", "inner", "second half"]
    with deferred():  # nothing pending any more
        pass


def test_release_ends_the_hold_early(stop_signal: None) -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred() as release:
            _signal()
            done.append("held")
            release()
            done.append("not reached")
    assert done == ["held"]
    _check_not_holding()


def _check_not_holding() -> None:
    with pytest.raises(KeyboardInterrupt):
        _signal()


def test_an_interrupt_held_since_the_ask_fails_the_trial_and_queues_it_again(
    tmp_path: Path, stop_signal: None
) -> None:
    """`tlsweep run` holds interrupts from asking for a trial until the objective's handler is
    in place (`started`); one that arrived meanwhile fails the trial there and queues its
    parameters again, instead of leaving it RUNNING."""
    from tlsweep.study._objective import run_trial

    cfg, features = trial_inputs(tmp_path)
    study = optuna.create_study(direction="maximize")
    requeued = []
    with pytest.raises(KeyboardInterrupt):
        with deferred() as started:
            trial = study.ask()
            _signal()
            run_trial(
                study,
                trial,
                cfg,
                features,
                None,
                "w",
                started=started,
                requeue=lambda: requeued.append(1),
            )
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert requeued == [1]
    _check_not_holding()


def test_an_interrupt_while_the_outcome_is_told_comes_after_it_is_recorded(
    tmp_path: Path, stop_signal: None
) -> None:
    """From telling the study a trial's outcome to closing its run, an interrupt is held: the
    trial is COMPLETE (not failed, not queued again) and the interrupt is raised after."""
    from tlsweep.study._objective import run_trial

    cfg, features = trial_inputs(tmp_path)
    study = optuna.create_study(direction="maximize")
    tell = study.tell

    def tell_then_signal(*args, **kwargs):
        _signal()  # arrives while the outcome is being recorded
        return tell(*args, **kwargs)

    study.tell = tell_then_signal  # type: ignore[method-assign]
    requeued = []
    with pytest.raises(KeyboardInterrupt):
        run_trial(study, study.ask(), cfg, features, None, "w", requeue=lambda: requeued.append(1))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert requeued == []
    _check_not_holding()


def test_an_interrupt_a_library_turned_into_its_own_error_still_stops_the_study(
    tmp_path: Path, stop_signal: None
) -> None:
    """A library may turn a KeyboardInterrupt raised inside it into an error of its own (as
    TensorFlow does inside a tf.py_function): the trial is still an interrupted one (failed,
    queued again) and the stop goes on up, instead of a failed trial and the next starting."""
    from tlsweep.study._objective import run_trial

    cfg, features = trial_inputs(tmp_path)
    study = optuna.create_study(direction="maximize")
    requeued = []

    def alive() -> None:
        try:
            _signal()
        except KeyboardInterrupt:
            raise RuntimeError("UnknownError: KeyboardInterrupt") from None  # as TF would

    assert not requested()
    with pytest.raises(KeyboardInterrupt):
        run_trial(
            study, study.ask(), cfg, features, None, "w", alive=alive,
            requeue=lambda: requeued.append(1),
        )  # fmt: skip
    assert requested()
    assert [t.state.name for t in study.trials] == ["FAIL"] and requeued == [1]


# --- Ctrl-C, SIGTERM, SIGHUP in `best`, `export` and `predict` (real processes) ---------------
@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from conftest import CATS_DOGS, TINY, need_shared, run_cli, small_copy, write_sweep

    need_shared()
    d = tmp_path_factory.mktemp("stop_winner")
    data = d / "data"
    small_copy(CATS_DOGS / "train", data / "train", 10, None)
    small_copy(CATS_DOGS / "validation", data / "validation", 6, None)
    small_copy(CATS_DOGS / "test", data / "test", 6, None)
    search = {
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "space": {
            "units": {"low": 8, "high": 16},
            "dropout": {"low": 0.0, "high": 0.1},
            "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
            "batch_size": {"choices": [16]},
            "epochs": 50,  # the winner's retraining runs long enough to be stopped
        },
    }
    sweep = write_sweep(d / "sweep.yaml", data, study="stop", backbones=TINY, search=search)
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "sweep": sweep, "data": data, "tracking": f"sqlite:///{d / 'mlflow.db'}"}


def _stopped_when(argv: list[str], line: str, signum: int) -> subprocess.CompletedProcess:
    """Run ``tlsweep argv``; send ``signum`` once ``line`` shows on its stderr."""
    import threading

    p = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    err: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for text in p.stderr:
            err.append(text)
            if line in text:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if seen.wait(300):
        p.send_signal(signum)
    out = p.stdout.read()
    p.wait(300)
    reader.join(30)
    assert seen.is_set(), "".join(err)[-3000:]
    return subprocess.CompletedProcess(argv, p.returncode, out, "".join(err))


def _parent_state(tracking: str) -> tuple[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("stop")
    (run,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'study'")
    return run.info.status, run.info.end_time


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "signum"),
    [("export", signal.SIGTERM), ("best", signal.SIGINT), ("export", signal.SIGHUP)],
)
def test_a_stop_in_best_or_export_says_so_leaves_nothing_and_the_next_export_works(
    finished_study: dict, tmp_path: Path, command: str, signum: int
) -> None:
    """Stopped while the winner is retrained: one line, the shell's exit code, no model file
    nor temporary file, and the parent run as it was (a killed command once left it RUNNING)."""
    before = _parent_state(finished_study["tracking"])
    out = tmp_path / "out" / "m.keras"
    argv = [command, str(finished_study["sweep"])]
    if command == "export":
        argv += ["-o", str(out)]
    r = _stopped_when(argv, "cache hit", signum)
    assert r.returncode == 128 + signum, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "tlsweep: interrupted", r.stderr[-3000:]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert _parent_state(finished_study["tracking"]) == before
    if command == "export":
        from conftest import run_cli

        r = run_cli(*argv)
        assert r.returncode == 0, r.stderr[-3000:]
        assert [p.name for p in out.parent.iterdir()] == ["m.keras"]
