"""A stop signal never cuts a step in two: held inside `deferred`, raised once the step is whole.

The signal here is SIGUSR1 routed to `interrupt()` as the CLI routes Ctrl-C, SIGTERM and SIGHUP,
delivered for real (`os.kill` of this process), so Python runs the handler between bytecodes as
it does for a user's signal.
"""

from __future__ import annotations

import os
import signal
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
    from tlsweep.objective import run_trial

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
    from tlsweep.objective import run_trial

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
    from tlsweep.objective import run_trial

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
