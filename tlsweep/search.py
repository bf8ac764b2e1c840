"""The Optuna study: search space, sampler, pruner, the objective, and the study's summary.

A study lives in an Optuna storage (opened by :mod:`tlsweep.workers`) and is shared by every
worker and every invocation: running the same sweep again continues it until ``n_trials``
trials have *finished* (COMPLETE or PRUNED). Finished trials are never redone. A study is tied to
its search space: a changed space is refused with the way to start a new study.

This module owns what a trial *is* (its parameters, how it is trained and scored, how it is
reported to Optuna); the machinery that decides which worker runs which trial, keeps trials
alive and recovers them from dead processes is :mod:`tlsweep.workers`. MLflow is reached only
through the :class:`~tlsweep.tracking.Tracker` the caller hands in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from tlsweep.config import BackboneConfig, Param, SweepConfig, redact_url
from tlsweep.errors import StudyError

log = logging.getLogger(__name__)

SPACE_ATTR = "tlsweep.space"
PARENT_ATTR = "tlsweep.mlflow_parent_run"
FINISHED = ("COMPLETE", "PRUNED")  # the states that count towards n_trials
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


# --- Optuna's private API, in one place ---------------------------------------------------------
# Optuna's public API has no way to get a live trial's storage id (needed to record a heartbeat
# the moment a trial is asked for, before the first report) or to fail a trial of another,
# dead, process (``study.tell`` only accepts trials of this process). Both are stable since
# Optuna 3 and used by Optuna's own storages; they are reached only through these two functions.
def trial_id(trial: Any) -> int:
    """The storage id of a live ``optuna.Trial``."""
    return int(trial._trial_id)


def study_storage(study: Any) -> Any:
    """The storage object behind ``study``."""
    return study._storage


def counts(study: Any) -> dict[str, int]:
    """How many trials of the study are in each state."""
    out = dict.fromkeys(STATES, 0)
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# --- sampler, pruner, space --------------------------------------------------------------------
def make_sampler(cfg: SweepConfig, seed: int) -> Any:
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
    return optuna.samplers.GridSampler(grid_space(cfg), seed=seed)


def grid_space(cfg: SweepConfig) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for p in cfg.search.space.values():
        if p.kind == "categorical":
            grid[p.name] = list(p.choices or ())
        elif p.kind == "int":
            grid[p.name] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.kind == "float":
            n = int(math.floor((p.high - p.low) / p.step + 1e-9)) + 1
            grid[p.name] = [round(p.low + i * p.step, 12) for i in range(n)]
    if len(cfg.backbones) > 1:
        grid["backbone"] = [b.label for b in cfg.backbones]
    return grid


def make_pruner(cfg: SweepConfig) -> Any:
    import optuna

    p = cfg.search.pruner
    if p == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if p == "hyperband":
        epochs = cfg.search.space["epochs"]
        max_resource = int(epochs.high if epochs.kind != "fixed" else epochs.value)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource)
    return optuna.pruners.NopPruner()


def suggest(trial: Any, cfg: SweepConfig) -> dict[str, Any]:
    """The trial's head parameters (sampled and fixed) and its backbone label."""
    out: dict[str, Any] = {}
    if len(cfg.backbones) > 1:
        out["backbone"] = trial.suggest_categorical("backbone", [b.label for b in cfg.backbones])
    else:
        out["backbone"] = cfg.backbones[0].label
    for p in cfg.search.space.values():
        out[p.name] = _suggest_one(trial, p)
    return out


def _suggest_one(trial: Any, p: Param) -> Any:
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices or ()))
    if p.kind == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


# --- the study ---------------------------------------------------------------------------------
def open_study(cfg: SweepConfig, storage: Any, seed_offset: int = 0, create: bool = True) -> Any:
    """Create or resume the study; refuse one whose search space changed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not create:
        try:
            return optuna.load_study(study_name=cfg.study, storage=storage)
        except KeyError:
            raise StudyError(
                f"no study '{cfg.study}' in {redact_url(cfg.storage)}; run 'tlsweep run "
                f"{cfg.path.name}' first"
            ) from None
    n_existing = 0
    with contextlib.suppress(KeyError):
        n_existing = len(optuna.load_study(study_name=cfg.study, storage=storage).trials)
    seed = cfg.search.seed + 7919 * seed_offset + n_existing
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
            "space (backbones, space, metric or direction changed); start a new study with --study "
            f"NEW_NAME (or a new study: name), or delete the old one: optuna delete-study "
            f"--study-name {cfg.study} --storage {redact_url(cfg.storage)}"
        )
    return study


def _space_json(cfg: SweepConfig) -> dict[str, Any]:
    d = {n: p.to_json() for n, p in cfg.search.space.items()}
    d["backbone"] = [b.label for b in cfg.backbones]
    return d


# --- running trials ----------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    """What the CLI shows for one finished trial."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    seconds: float
    finished: int
    n_trials: int
    best_value: float | None
    best_number: int | None
    error: str | None = None


@dataclass
class FeatureData:
    """One backbone's cached features, loaded once per process and shared by every trial."""

    backbone: BackboneConfig
    entry: Any
    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    n_classes: int
    sizes: dict[str, int] = field(default_factory=dict)


def load_features(backbones: list[tuple[BackboneConfig, Any]]) -> dict[str, FeatureData]:
    """Memory-map every entry's train and validation split once (never the test split)."""
    from tlsweep.head import as_tensor

    out = {}
    for bb, entry in backbones:
        xt, yt = entry.split("train")
        xv, yv = entry.split("validation")
        if len(yt) == 0 or len(yv) == 0:
            which = "training" if len(yt) == 0 else "validation"
            raise StudyError(
                f"{entry.manifest['data_dir']}: no usable {which} images after skipping "
                "unreadable files; add images or check the folder"
            )
        out[bb.label] = FeatureData(
            bb,
            entry,
            as_tensor(xt),
            yt,
            as_tensor(xv),
            yv,
            len(entry.class_names),
            entry.split_sizes(),
        )
    return out


@dataclass
class TrialResult:
    """How one trial ended."""

    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None
    params: dict[str, Any]
    history: list[dict[str, float]]
    seconds: float
    error: str | None = None


def run_trial(
    study: Any,
    trial: Any,
    cfg: SweepConfig,
    features: dict[str, FeatureData],
    tracker: Any,
    worker: str,
    *,
    keep_alive: AbstractContextManager[Any] | None = None,
    requeue: Callable[[], None] | None = None,
) -> TrialResult:
    """The objective: sample, train the head on the cached features, report, tell Optuna.

    ``keep_alive`` is held while the head trains (the worker's heartbeat); ``requeue`` is
    called when the user interrupts the trial, so its parameters run again on resume.
    """
    import optuna
    from optuna.trial import TrialState

    from tlsweep.head import HeadParams, train_head

    t0 = time.perf_counter()
    metric = cfg.search.metric
    params = suggest(trial, cfg)
    data = features[params["backbone"]]
    bb = data.backbone
    logged = {
        **params,
        "backbone_name": bb.name,
        "input_size": bb.input_size,
        "pooling": bb.pooling,
        "weights": bb.weights,
        "backbone_args": dict(bb.args),
        "cache_key": data.entry.key,
        "data_dir": str(cfg.data.dir),
        "train_size": data.sizes["train"],
        "validation_size": data.sizes["validation"],
        "test_size": data.sizes["test"],
        "seed": cfg.search.seed,
        "trial_number": trial.number,
    }
    run_id = tracker.start_trial(trial.number, logged, worker) if tracker else None
    history: list[dict[str, float]] = []

    def on_epoch(m: Any) -> None:
        history.append(m.as_dict())
        value = getattr(m, metric)
        trial.report(value, m.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

    state, value, error = "FAIL", None, None
    hp = HeadParams.from_dict({**params, "seed": cfg.search.seed})
    with keep_alive or contextlib.nullcontext():
        try:
            train_head(
                data.x_train,
                data.y_train,
                data.x_val,
                data.y_val,
                data.n_classes,
                hp,
                on_epoch=on_epoch,
            )
            value = history[-1][metric]
            study.tell(trial, value)
            state = "COMPLETE"
        except optuna.TrialPruned:
            value = history[-1][metric] if history else None
            study.tell(trial, state=TrialState.PRUNED)
            state = "PRUNED"
        except BaseException as e:  # noqa: BLE001 - a failed trial lets the study go on
            error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                study.tell(trial, state=TrialState.FAIL)
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
            if interrupted and requeue is not None:  # the user stopped us: run these again
                with contextlib.suppress(Exception):
                    requeue()
            if tracker and run_id:
                with contextlib.suppress(Exception):
                    tracker.end_trial(run_id, "FAIL", history, {}, error)
            if interrupted:
                raise
            log.warning("trial %d failed: %s", trial.number, error)
    seconds = time.perf_counter() - t0
    if tracker and run_id and state != "FAIL":
        # The trial's value is the last point of its per-epoch `metric` curve, which MLflow
        # already shows as the run's value (the highest step); logging it again at step 0
        # would add a second point to the curve's first epoch.
        final = {"epochs_run": len(history), "trial_seconds": seconds}
        tracker.end_trial(run_id, state, history, final)
    return TrialResult(state, value, params, history, seconds, error)


def best_of(study: Any) -> tuple[float | None, int | None]:
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
        return self.counts.get("COMPLETE", 0) + self.counts.get("PRUNED", 0)


def summarize(cfg: SweepConfig, study: Any, top: int = 5) -> StudySummary:
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
