"""The types that say what flows between the stages: the study, the trial, the tracker, the
entry and the winner are named in the signatures, and the names resolve to real classes."""

from __future__ import annotations

import inspect
import typing

import optuna
import pytest

import tlsweep.sweep
from tlsweep.cli._display import print_test
from tlsweep.config import BackboneConfig, SweepConfig
from tlsweep.features import CachedEntry
from tlsweep.study import TrialTracker
from tlsweep.study._objective import FeatureData, run_trial
from tlsweep.study._recovery import recover, run_may_still_be_closed
from tlsweep.study._runner import StudyRunner
from tlsweep.study._search import open_study, study_storage, suggest, summarize, trial_id
from tlsweep.tracking import Tracker
from tlsweep.winner import FinetuneResult, Registration, Winner
from tlsweep.winner._finetune import run_finetune
from tlsweep.winner._rebuild import best_trial, evaluate_and_log, rebuild

PROTOCOL = ("errors", "start_trial", "log_trial_metrics", "end_trial", "close_stale_runs")


def _params(f: object) -> list[str]:
    return [p for p in inspect.signature(f).parameters if p != "self"]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", PROTOCOL)
def test_the_tracker_takes_what_a_trial_gives_it(name: str) -> None:
    assert _params(getattr(Tracker, name)) == _params(getattr(TrialTracker, name))


def test_the_protocol_names_every_tracker_method_the_study_calls() -> None:
    import tlsweep.study._objective as objective
    import tlsweep.study._runner as runner

    called = set()
    for module in (objective, runner):
        src = inspect.getsource(module)
        called |= {m for m in dir(Tracker) if f"tracker.{m}(" in src}
    assert called and called <= set(PROTOCOL), called - set(PROTOCOL)


# what flows between the stages: these parameters (and fields) never say Any
FLOWING = {"study", "trial", "tracker", "entry", "w", "backbone", "return"}

NAMES = {
    "optuna": optuna,
    "Tracker": Tracker,
    "TrialTracker": TrialTracker,
    "CachedEntry": CachedEntry,
    "BackboneConfig": BackboneConfig,
    "SweepConfig": SweepConfig,
    "Winner": Winner,
    "FinetuneResult": FinetuneResult,
    "Registration": Registration,
}


@pytest.mark.parametrize(
    "f",
    [
        run_trial,
        StudyRunner.__init__,
        StudyRunner._next_trial,
        trial_id,
        study_storage,
        open_study,
        suggest,
        summarize,
        recover,
        run_may_still_be_closed,
        best_trial,
        rebuild,
        evaluate_and_log,
        run_finetune,
        tlsweep.sweep.finetune_winner,
        tlsweep.sweep.export_winner,
        tlsweep.sweep.recorded_finetune,
        print_test,
        FeatureData,
        Winner,
    ],
    ids=lambda f: f.__qualname__,
)
def test_the_annotations_name_real_types(f: object) -> None:
    hints = typing.get_type_hints(f, localns=NAMES)
    typed = {n: t for n, t in hints.items() if n in FLOWING}
    assert typed, hints
    assert typing.Any not in typed.values(), typed
