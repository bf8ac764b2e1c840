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
from dataclasses import dataclass, field, replace
from typing import Any

from tlsweep.config import (
    MIN_VALIDATION_PER_CLASS,
    BackboneConfig,
    Param,
    SweepConfig,
    redact_url,
)
from tlsweep.errors import StudyError
from tlsweep.interrupts import deferred
from tlsweep.interrupts import requested as stop_requested

log = logging.getLogger(__name__)

SPACE_ATTR = "tlsweep.space"
DATA_ATTR = "tlsweep.data"  # label -> {"key", "parts"}: the feature cache entries of the study
PARENT_ATTR = "tlsweep.mlflow_parent_run"
RESOLVED_ATTR = "tlsweep.resolved"  # the resolved sweep of the last `tlsweep run`
FINETUNE_ATTR = "tlsweep.finetune"  # the fine-tuning stage's last outcome, for `tlsweep status`
FINISHED = ("COMPLETE", "PRUNED")  # the states that count towards n_trials
STATES = (*FINISHED, "FAIL", "RUNNING", "WAITING")


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
def open_study(
    cfg: SweepConfig,
    storage: Any,
    seed_offset: int = 0,
    create: bool = True,
    data: dict[str, dict[str, Any]] | None = None,
) -> Any:
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
    if data is not None:
        check_data(cfg, study, data, store=True)
    return study


def existing_study(cfg: SweepConfig, storage: Any) -> Any | None:
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
    cfg: SweepConfig, study: Any, data: dict[str, dict[str, Any]], store: bool = False
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
    """Memory-map every entry's train and validation split once (never the test split).

    A backbone with augmented views gets ``[views, n, features]`` for its training split (and
    its validation split with ``tta``), in memory.
    """
    from tlsweep.head_graph import as_tensor

    out = {}
    for bb, entry in backbones:
        xt, yt = entry.views("train") if bb.augment else entry.split("train")
        xv, yv = entry.views("validation") if bb.augment else entry.split("validation")
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


def extra_metrics(cfg: SweepConfig, n_classes: int) -> tuple[str, ...]:
    """The validation metrics beyond loss and accuracy a trial computes each epoch: none on the
    default path (``val_accuracy`` or ``val_loss`` without class weights), all the others when
    the objective or the class weights call for them."""
    from tlsweep.metrics import SCORES

    if cfg.search.metric in ("val_accuracy", "val_loss") and cfg.search.class_weight == "none":
        return ()
    return tuple(n for n, two in SCORES.items() if n != "accuracy" and (not two or n_classes == 2))


def training_options(cfg: SweepConfig, y_train: Any, class_names: list[str]) -> dict[str, Any]:
    """The keyword arguments of ``train_head`` that come from the ``search:`` section."""
    from tlsweep.head import class_weight_vector

    try:
        weights = class_weight_vector(cfg.search.class_weight, y_train, class_names)
    except ValueError as e:  # a class name the data does not have
        raise StudyError(str(e)) from None
    return {"class_weights": weights, "extra_metrics": extra_metrics(cfg, len(class_names))}


def train_views(bb: BackboneConfig) -> str:
    """How the head trains on ``bb``'s augmented views: one per image per epoch, or all."""
    return bb.augment.train if bb.augment is not None else "one"


def stratified_folds(y: Any, k: int, seed: int) -> list[Any]:
    """``k`` disjoint index arrays covering ``y``, each with every class in proportion."""
    import numpy as np

    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    start = 0  # continue the round-robin across classes, so fold sizes differ by at most one
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold_of[idx] = (start + np.arange(len(idx))) % k
        start += len(idx)
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def check_setup(cfg: SweepConfig, backbones: list[tuple[BackboneConfig, Any]]) -> None:
    """Refuse what cannot work with these classes; warn about too few images to score on.

    Runs on the cache entries before any study or MLflow experiment is made.
    """
    import numpy as np

    from tlsweep.metrics import SCORES

    for _, entry in backbones[:1]:  # every backbone has the same images and splits
        names = list(entry.class_names)
        files = entry.manifest["files"]
        y_train = np.array([f["label"] for f in files if f["split"] == "train"], np.int64)
        y_val = np.array([f["label"] for f in files if f["split"] == "validation"], np.int64)
        if SCORES.get(cfg.search.metric.removeprefix("val_")) and len(names) != 2:
            raise StudyError(
                f"search.metric: got '{cfg.search.metric}'; it needs two classes and "
                f"{entry.manifest['data_dir']} has {len(names)}: use "
                "val_balanced_accuracy, val_macro_f1 or val_log_loss"
            )
        training_options(cfg, y_train, names)
        k = cfg.search.cv_folds
        if k:
            where = "held-out fold of the training split"
            per_class = np.bincount(np.asarray(y_train, np.int64), minlength=len(names)) // k
        else:
            where = "validation split"
            per_class = np.bincount(np.asarray(y_val, np.int64), minlength=len(names))
        few = [
            f"{n} ({int(c)})"
            for n, c in zip(names, per_class, strict=True)
            if c < MIN_VALIDATION_PER_CLASS
        ]
        if few:
            log.warning(
                "fewer than %d images of %s in the %s: scores on it are mostly noise",
                MIN_VALIDATION_PER_CLASS,
                ", ".join(few),
                where,
            )


def _tasks(cfg: SweepConfig, data: FeatureData) -> tuple[list[tuple], list[int], str]:
    """The (x_train, y_train, x_val, y_val) of every head of a trial, the group (fold or seed)
    each belongs to, and the group's name."""
    import numpy as np
    import tensorflow as tf

    k, r = cfg.search.cv_folds, cfg.search.repeats
    if not k:
        task = (data.x_train, data.y_train, data.x_val, data.y_val)
        return [task] * r, list(range(r)), "seed"
    y = np.asarray(data.y_train)
    folds = stratified_folds(y, k, cfg.search.seed)
    tasks, groups = [], []
    x = data.x_train
    views = len(x.shape) == 3  # augmented views: [views, n, features]
    tta = views and bool(data.backbone.augment and data.backbone.augment.tta)
    for f, held in enumerate(folds):
        train = np.sort(np.concatenate([folds[j] for j in range(k) if j != f]))
        x_held = tf.gather(x, held, axis=1) if tta else tf.gather(x[0] if views else x, held)
        task = (tf.gather(x, train, axis=1 if views else 0), y[train], x_held, y[held])
        tasks += [task] * r
        groups += [f] * r
    return tasks, groups, "fold"


def _spread(each: list[Any], groups: list[int], group: str) -> dict[str, float]:
    """Per-group final validation metrics (mean over a group's heads), their mean and std."""
    import numpy as np

    out: dict[str, float] = {}
    names = [k for k in each[0].as_dict() if k.startswith("val_")]
    for name in names:
        per = []
        for g in sorted(set(groups)):
            vals = [m.as_dict()[name] for m, gg in zip(each, groups, strict=True) if gg == g]
            v = float(np.mean(vals))
            out[f"{name}_{group}_{g}"] = v
            per.append(v)
        out[f"{name}_mean"] = float(np.mean(per))
        out[f"{name}_std"] = float(np.std(per, ddof=1)) if len(per) > 1 else 0.0
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
    alive: Callable[[], None] | None = None,
    requeue: Callable[[], None] | None = None,
    started: Callable[[], None] | None = None,
) -> TrialResult:
    """The objective: sample, train the head on the cached features, report, tell Optuna.

    ``keep_alive`` is held while the head trains (the worker's heartbeat); ``alive`` is called
    after every epoch and before the trial is told complete, and raises to stop (fail) the
    trial; ``requeue`` is called when the user interrupts the trial, so its parameters run
    again on resume; ``started`` (a :func:`tlsweep.interrupts.deferred` release) is called
    once an interrupt would fail the trial here rather than leave it running.
    """
    import optuna
    from optuna.trial import TrialState

    from tlsweep.head import HeadParams, train_head, train_heads

    t0 = time.perf_counter()
    metric = cfg.search.metric
    state, value, error = "FAIL", None, None
    params: dict[str, Any] = {}
    run_id: str | None = None
    history: list[dict[str, float]] = []
    last: dict[str, Any] = {}  # the last epoch's metrics of every head, when there are several
    groups: Any = None
    group: Any = None

    def on_epoch(m: Any) -> None:
        history.append(m.as_dict())
        if alive is not None:
            alive()
        value = history[-1][metric]
        trial.report(value, m.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")

    def on_mean_epoch(mean: Any, each: list[Any]) -> None:
        last["each"] = each
        on_epoch(mean)

    # From here on an interrupt fails the trial and queues it again: the caller may hold
    # interrupts since it asked for the trial and release them with ``started``. From telling
    # the study the trial's outcome to closing its run, they are held again (``finishing``):
    # one that arrives then is raised on the way out, once both are recorded.
    with contextlib.ExitStack() as finishing:  # its end raises an interrupt held meanwhile
        try:
            if started is not None:
                started()
            with keep_alive or contextlib.nullcontext():
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
                    "cv_folds": cfg.search.cv_folds or 0,
                    "repeats": cfg.search.repeats,
                    "class_weight": cfg.search.class_weight,
                }
                if bb.augment is not None:
                    logged.update(
                        views=bb.augment.views, tta=bb.augment.tta, train_views=bb.augment.train
                    )
                if tracker:
                    with deferred():  # a run created is a run whose id we hold, to close it
                        run_id = tracker.start_trial(trial.number, logged, worker)
                hp = HeadParams.from_dict({**params, "seed": cfg.search.seed})
                names = list(data.entry.class_names)
                if cfg.search.cv_folds or cfg.search.repeats > 1:
                    # Several heads in lock-step; Optuna sees their mean after every epoch, so the
                    # pruner compares the same curves (and epochs) as without folds.
                    tasks, groups, group = _tasks(cfg, data)
                    train_heads(
                        tasks,
                        data.n_classes,
                        # head i is repeat i % repeats of its fold: seeds seed, seed + 1, ...
                        [
                            replace(hp, seed=cfg.search.seed + i % cfg.search.repeats)
                            for i in range(len(tasks))
                        ],
                        on_mean_epoch,
                        class_weights=[
                            training_options(cfg, t[1], names)["class_weights"] for t in tasks
                        ],
                        extra_metrics=extra_metrics(cfg, data.n_classes),
                        train_views=train_views(bb),
                    )
                else:
                    train_head(
                        data.x_train,
                        data.y_train,
                        data.x_val,
                        data.y_val,
                        data.n_classes,
                        hp,
                        on_epoch=on_epoch,
                        train_views=train_views(bb),
                        **training_options(cfg, data.y_train, names),
                    )
                value = history[-1][metric]
                if alive is not None:
                    alive()
                finishing.enter_context(deferred())
                study.tell(trial, value)
                state = "COMPLETE"
        except optuna.TrialPruned:
            value = history[-1][metric] if history else None
            finishing.enter_context(deferred())
            study.tell(trial, state=TrialState.PRUNED)
            state = "PRUNED"
        except BaseException as e:  # noqa: BLE001 - a failed trial lets the study go on
            error = describe(e)
            try:  # another worker may have failed it already (its heartbeat went stale)
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            except storage_errors() as e2:
                log.warning("trial %d: its failure could not be recorded: %s", trial.number, e2)
            # a library may have turned the user's interrupt into an error of its own
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit)) or stop_requested()
            if interrupted and requeue is not None:  # the user stopped us: run these again
                try:
                    requeue()
                except storage_errors() as e2:
                    log.warning("trial %d: could not be queued again: %s", trial.number, e2)
            if tracker and run_id:
                try:
                    tracker.end_trial(run_id, "FAIL", history, {}, error)
                except tracker.errors() as e2:
                    log.warning(
                        "trial %d: its MLflow run could not be closed: %s", trial.number, e2
                    )
            if interrupted:
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                raise KeyboardInterrupt from e
        seconds = time.perf_counter() - t0
        if tracker and run_id and state != "FAIL":
            # The trial's value is the last point of its per-epoch `metric` curve, which MLflow
            # already shows as the run's value (the highest step); logging it again at step 0
            # would add a second point to the curve's first epoch.
            final = {"epochs_run": len(history), "trial_seconds": seconds}
            if "each" in last:
                final.update(_spread(last["each"], groups, group))
            tracker.end_trial(run_id, state, history, final, value=value)
        return TrialResult(state, value, params, history, seconds, error)


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a failing Optuna storage raises: Optuna wraps SQLAlchemy's errors in
    StorageInternalError; journal files and SQLite raise OSError and sqlite3.Error."""
    import sqlite3

    import optuna
    import sqlalchemy.exc

    return (
        optuna.exceptions.StorageInternalError,
        sqlalchemy.exc.SQLAlchemyError,
        sqlite3.Error,
        OSError,
    )


def describe(e: BaseException) -> str:
    """``Type: message`` of an error, and of the error that caused it (one line)."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return " ".join(text.split())


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
        return sum(self.counts.get(s, 0) for s in FINISHED)


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
