"""Every trial of a study as one table (number, state, value, backbone, every parameter,
seconds): what the parent MLflow run holds, so a study of any size compares in one sortable
view."""

from __future__ import annotations

from typing import Any


def trials_table(study: Any, backbone: str | None = None) -> dict[str, list[Any]]:
    """Column name -> one value per trial, by trial number; a parameter a trial did not draw
    (another backbone's, say) is None. ``backbone``: the label of a study's only backbone (not
    drawn, so not among a trial's parameters)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names = sorted({k for t in trials for k in t.params} - {"backbone"})
    table: dict[str, list[Any]] = {
        "number": [t.number for t in trials],
        "state": [t.state.name for t in trials],
        "value": [t.value if t.state.name == "COMPLETE" else None for t in trials],
        "backbone": [t.params.get("backbone", backbone) for t in trials],
    }
    for n in names:
        table[n] = [t.params.get(n) for t in trials]
    table["seconds"] = [
        round(t.duration.total_seconds(), 2) if t.duration else None for t in trials
    ]
    return table
