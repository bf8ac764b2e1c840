"""The Optuna study: search space, sampler, pruner, what is recorded with it, and its summary.

A study lives in an Optuna storage (opened by :mod:`tlsweep.study._storage`) and is shared by every
worker and every invocation: running the same sweep again continues it until ``n_trials``
trials have *finished* (COMPLETE or PRUNED). Finished trials are never redone. A study is tied to
its search space: a changed space is refused with the way to start a new study; and to the
features its trials were scored on (:func:`check_data`).

What one trial does (train the head, report each epoch, tell the study) is
:mod:`tlsweep.study._objective`; which worker runs which trial is :mod:`tlsweep.study._runner`, and
keeping trials alive and recovering them from dead processes :mod:`tlsweep.study._recovery`. This
module knows nothing of MLflow, locks or processes.
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlsweep.config import (
    FINISHED,
    HYPERBAND_MIN_RESOURCE,
    MEDIAN_STARTUP_TRIALS,
    MEDIAN_WARMUP_STEPS,
    WORKER_SEED_STRIDE,
    Param,
    SweepConfig,
    grid_values,
    largest,
    redact_url,
)
from tlsweep.errors import StudyError

if TYPE_CHECKING:
    import optuna

SPACE_ATTR = "tlsweep.space"
DATA_ATTR = "tlsweep.data"  # label -> {"key", "parts"}: the feature cache entries of the study
PARENT_ATTR = "tlsweep.mlflow_parent_run"
RESOLVED_ATTR = "tlsweep.resolved"  # the resolved sweep of the last `tlsweep run`
# a trial's training seed (search.seed when it ran), with the trial: its head is retrained with it
SEED_ATTR = "tlsweep.seed"
FINETUNE_ATTR = "tlsweep.finetune"  # the fine-tuning stage's last outcome, for `tlsweep status`
STATES = (*FINISHED, "FAIL", "RUNNING", "WAITING")


# --- Optuna's private API, in one place ---------------------------------------------------------
# Optuna's public API has no way to get a live trial's storage id (needed to record a heartbeat
# the moment a trial is asked for, before the first report) or to fail a trial of another,
# dead, process (``study.tell`` only accepts trials of this process). Both are stable since
# Optuna 3 and used by Optuna's own storages; they are reached only through these two functions.
def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage id of a live ``optuna.Trial`` (or of a ``FrozenTrial`` read from the storage)."""
    return int(trial._trial_id)


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage object behind ``study``."""
    return study._storage


def counts(study: optuna.Study) -> dict[str, int]:
    """How many trials of the study are in each state."""
    out = dict.fromkeys(STATES, 0)
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# --- sampler, pruner, space --------------------------------------------------------------------
def make_sampler(cfg: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    s = cfg.search.sampler
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if s == "gp":
        try:
            import scipy  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            raise StudyError(
                "search.sampler: 'gp' needs PyTorch and SciPy (pip install torch scipy); or use tpe"
            ) from None
        return optuna.samplers.GPSampler(seed=seed)
    return _grid_sampler(grid_space(cfg), seed)


def grid_space(cfg: SweepConfig) -> dict[str, list[Any]]:
    """The grid of the grid sampler: each searched parameter's values (and the backbones)."""
    grid: dict[str, list[Any]] = {}
    for p in cfg.search.space.values():
        if p.kind != "fixed":
            values = grid_values(p)
            assert values is not None, "refused by config.check_combinations"
            grid[p.name] = values
    if len(cfg.backbones) > 1:
        grid["backbone"] = [b.label for b in cfg.backbones]
    return grid


def _grid_sampler(grid: dict[str, list[Any]], seed: int) -> Any:
    """Optuna's GridSampler without its ``study.stop()`` once the grid is done.

    Optuna stops the study from ``after_trial``, which raises outside ``study.optimize``;
    tlsweep asks and tells, and its runner stops after ``n_trials``, which
    :func:`tlsweep.config._schema.check_combinations` keeps within the grid.
    """
    import optuna

    class _Grid(optuna.samplers.GridSampler):
        def after_trial(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            state: optuna.trial.TrialState,
            values: Sequence[float] | None,
        ) -> None:
            return None

    return _Grid(grid, seed=seed)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    import optuna

    p = cfg.search.pruner
    if p == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_STEPS
        )
    if p == "hyperband":
        # the resource is the epoch: a trial runs at most the largest epochs it can draw
        max_resource = int(largest(cfg.search.space["epochs"]))
        return optuna.pruners.HyperbandPruner(
            min_resource=HYPERBAND_MIN_RESOURCE, max_resource=max_resource
        )
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.trial.BaseTrial, cfg: SweepConfig) -> dict[str, Any]:
    """The trial's head parameters (sampled and fixed) and its backbone label."""
    out: dict[str, Any] = {}
    if len(cfg.backbones) > 1:
        out["backbone"] = trial.suggest_categorical("backbone", [b.label for b in cfg.backbones])
    else:
        out["backbone"] = cfg.backbones[0].label
    for p in cfg.search.space.values():
        out[p.name] = _suggest_one(trial, p)
    return out


def _suggest_one(trial: optuna.trial.BaseTrial, p: Param) -> Any:
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices or ()))
    if p.kind == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


# --- the study ---------------------------------------------------------------------------------
def open_study(
    cfg: SweepConfig,
    storage: optuna.storages.BaseStorage,
    seed_offset: int = 0,
    create: bool = True,
    data: dict[str, dict[str, Any]] | None = None,
) -> optuna.Study:
    """Create or resume the study; refuse one whose search space changed, or (given ``data``,
    label -> cache key and key parts, see :func:`check_data`) one made on other features."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not create:
        try:
            study = optuna.load_study(study_name=cfg.study, storage=storage)
        except KeyError:
            raise StudyError(
                f"no study '{cfg.study}' in {redact_url(cfg.storage)}; run 'tlsweep run "
                f"{cfg.path.name}' first"
            ) from None
        if data is not None:
            check_data(cfg, study, data)
        return study
    n_existing = 0
    with contextlib.suppress(KeyError):
        n_existing = len(optuna.load_study(study_name=cfg.study, storage=storage).trials)
    seed = cfg.search.seed + WORKER_SEED_STRIDE * seed_offset + n_existing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.create_study(
                study_name=cfg.study,
                storage=storage,
                sampler=make_sampler(cfg, seed),
                pruner=make_pruner(cfg),
                direction=cfg.search.direction,
                load_if_exists=True,
            )
        except ValueError as e:
            raise StudyError(
                f"study '{cfg.study}': {e}; use a new name with --study NAME or study: in the file"
            ) from None
    fingerprint = cfg.space_fingerprint()
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, fingerprint)
        study.set_user_attr("tlsweep.space_json", _space_json(cfg))
    elif stored != fingerprint:
        raise StudyError(
            f"study '{cfg.study}' in {redact_url(cfg.storage)} was made with a different search "
            "space (backbones, space, metric, direction or data.dedupe changed); start a new "
            "study with --study NEW_NAME (or a new study: name), or delete the old one: "
            f"optuna delete-study --study-name {cfg.study} --storage {redact_url(cfg.storage)}"
        )
    if data is not None:
        check_data(cfg, study, data, store=True)
    return study


def existing_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    """The study if it exists in ``storage`` (nothing is created), else None."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError:
        return None


def _fix(cfg: SweepConfig) -> str:
    return (
        f"start a new study with --study NEW_NAME (or a new study: name), or delete the old one: "
        f"optuna delete-study --study-name {cfg.study} --storage {redact_url(cfg.storage)}"
    )


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The changed key parts of one backbone's features, in words."""
    words = []
    if old.get("images") != new.get("images"):
        words.append("the images (their bytes, file names, classes or splits)")
    if old.get("weights") != new.get("weights"):
        words.append(f"the weights ({old.get('weights')} -> {new.get('weights')})")
    for k in sorted(set(old) | set(new)):
        if k not in ("images", "weights") and old.get(k) != new.get(k):
            words.append(f"{k} ({old.get(k)} -> {new.get(k)})")
    return ", ".join(words) or "the cache key"


def check_data(
    cfg: SweepConfig, study: optuna.Study, data: dict[str, dict[str, Any]], store: bool = False
) -> None:
    """Refuse a study whose trials were scored on other features than ``data`` (label ->
    {"key", "parts"} of each backbone's feature cache entry): other images, splits, weights
    or settings. ``store``: tie a study that has no record yet (new, or made before tlsweep
    recorded it) to ``data``. A backbone absent from ``data`` (its ImageNet file is not
    downloaded yet, so its key is unknown) is not checked."""
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        if store:
            study.set_user_attr(DATA_ATTR, data)
        return
    for label, now in data.items():
        was = stored.get(label)
        if was is None or was.get("key") == now["key"]:
            continue  # a backbone new to the study is refused by the space check
        raise StudyError(
            f"study '{cfg.study}' in {redact_url(cfg.storage)} was scored on other features: "
            f"{label}: {_what_changed(was.get('parts', {}), now['parts'])} changed since; its "
            f"trials would compete with trials on the new features: {_fix(cfg)}"
        )


def _space_json(cfg: SweepConfig) -> dict[str, Any]:
    d = {n: p.to_json() for n, p in cfg.search.space.items()}
    d["backbone"] = [b.label for b in cfg.backbones]
    return d


def best_of(study: optuna.Study) -> tuple[float | None, int | None]:
    """(value, number) of the study's best trial, or (None, None) before the first."""
    try:
        b = study.best_trial
        return b.value, b.number
    except ValueError:
        return None, None


# --- the summary --------------------------------------------------------------------------------
@dataclass
class StudySummary:
    """What ``tlsweep status`` and the end of ``tlsweep run`` show."""

    study: str
    n_trials: int
    counts: dict[str, int]
    best: list[dict[str, Any]]  # the best finished trials, best first
    per_backbone: list[dict[str, Any]]
    metric: str
    direction: str
    test: dict[str, Any] | None = None  # the winner's held-out test score, once evaluated
    test_note: str | None = None  # why there is no test score
    finetune: Any | None = None  # the fine-tuning stage's result (tlsweep.finetune), if any

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED)


def summarize(cfg: SweepConfig, study: optuna.Study, top: int = 5) -> StudySummary:
    """Counts, the best trials and the per-backbone comparison of a study."""
    trials = study.get_trials(deepcopy=False)
    sign = -1 if cfg.search.direction == "maximize" else 1
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    ranked = sorted(complete, key=lambda t: sign * t.value)
    best = [
        {
            "number": t.number,
            "value": t.value,
            "params": dict(t.params),
            "seconds": t.duration.total_seconds() if t.duration else None,
        }
        for t in ranked[:top]
    ]
    per_bb = []
    labels = [b.label for b in cfg.backbones]
    for label in labels:
        ts = [t for t in trials if t.params.get("backbone", labels[0]) == label]
        vals = [t.value for t in ts if t.state.name == "COMPLETE" and t.value is not None]
        secs = [t.duration.total_seconds() for t in ts if t.duration and t.state.name in FINISHED]
        per_bb.append(
            {
                "backbone": label,
                "trials": len([t for t in ts if t.state.name in FINISHED]),
                "best": (max(vals) if sign < 0 else min(vals)) if vals else None,
                "median": statistics.median(vals) if vals else None,
                "seconds_per_trial": statistics.mean(secs) if secs else None,
            }
        )
    return StudySummary(
        cfg.study,
        cfg.search.n_trials,
        counts(study),
        best,
        per_bb,
        cfg.search.metric,
        cfg.search.direction,
    )
