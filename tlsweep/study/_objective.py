"""One trial, the study's objective: its features, its heads, its scores and how it ends.

:func:`run_trial` samples the trial's parameters (:func:`tlsweep.study._search.suggest`), trains the
head on the cached features (:mod:`tlsweep.head`: one head, or one per fold and repeat in
lock-step), reports every epoch to Optuna so the pruner can stop it, and tells the study how
it ended. A trial that fails or is pruned lets the study go on; an interrupt fails it and
queues its parameters again. MLflow is reached only through the
:class:`~tlsweep.tracking.Tracker` the caller hands in; the heartbeat and the choice of the
next trial are the caller's (:mod:`tlsweep.study._runner`).

Also here, for the trials and the winner's retraining: the feature arrays shared by every trial
of a process (:func:`load_features`), the check of a setup before any study exists
(:func:`check_setup`), and the training options taken from the ``search:`` section.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from tlsweep.config import (
    MIN_VALIDATION_PER_CLASS,
    REPEAT_SEED_STRIDE,
    BackboneConfig,
    SweepConfig,
)
from tlsweep.errors import StudyError
from tlsweep.interrupts import deferred
from tlsweep.interrupts import requested as stop_requested

from ._search import SEED_ATTR, suggest

if TYPE_CHECKING:
    import optuna

    from tlsweep.features import CachedEntry
from ._storage import storage_errors

log = logging.getLogger(__name__)


class TrialTracker(Protocol):
    """Where a trial's run is logged: a :class:`tlsweep.tracking.Tracker` (or a test double)."""

    def errors(self) -> tuple[type[BaseException], ...]: ...

    def start_trial(self, number: int, params: Mapping[str, Any], worker: str) -> str: ...

    def log_trial_metrics(
        self, run_id: str, history: list[Mapping[str, float]], final: Mapping[str, float]
    ) -> None: ...

    def end_trial(
        self,
        run_id: str,
        state: str,
        history: list[Mapping[str, float]],
        final: Mapping[str, float],
        error: str | None = None,
        value: float | None = None,
    ) -> None: ...

    def close_stale_runs(self, trial_states: Mapping[int, str], alive: set[int]) -> int: ...


@dataclass
class FeatureData:
    """One backbone's cached features, loaded once per process and shared by every trial."""

    backbone: BackboneConfig
    entry: CachedEntry
    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    n_classes: int
    sizes: dict[str, int] = field(default_factory=dict)


def load_features(
    backbones: list[tuple[BackboneConfig, CachedEntry]],
) -> dict[str, FeatureData]:
    """Memory-map every entry's train and validation split once (never the test split).

    A backbone with augmented views gets ``[views, n, features]`` for its training split (and
    its validation split with ``tta``), in memory.
    """
    from tlsweep.head import as_tensor

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
    from tlsweep.head import SCORES

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


def check_setup(cfg: SweepConfig, backbones: list[tuple[BackboneConfig, CachedEntry]]) -> None:
    """Refuse what cannot work with these classes; warn about too few images to score on.

    Runs on the cache entries before any study or MLflow experiment is made.
    """
    import numpy as np

    from tlsweep.head import SCORES

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
    study: optuna.Study,
    trial: optuna.Trial,
    cfg: SweepConfig,
    features: dict[str, FeatureData],
    tracker: TrialTracker | None,
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

    recorded = False

    def record(strict: bool = False) -> None:
        """The curves and final numbers onto the trial's run, once, before Optuna hears the
        outcome: a kill in between leaves a run with its curves, which the next process closes
        (the other order left a COMPLETE trial whose run had no metrics at all). MLflow failing
        here does not fail a trained trial: the outcome goes to Optuna, and the run is tried
        again when it is closed (``strict``: an error then is raised, as any closing error)."""
        nonlocal recorded
        if not (tracker and run_id) or recorded:
            return
        final = {"epochs_run": len(history), "trial_seconds": time.perf_counter() - t0}
        if "each" in last:
            final.update(_spread(last["each"], groups, group))
        try:
            tracker.log_trial_metrics(run_id, history, final)
        except tracker.errors() as e:
            if strict:
                raise
            log.warning("trial %d: MLflow did not take its curves yet: %s", trial.number, e)
            return
        recorded = True

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
                trial.set_user_attr(SEED_ATTR, cfg.search.seed)  # the winner's retraining reads it
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
                            replace(
                                hp,
                                seed=cfg.search.seed
                                + REPEAT_SEED_STRIDE * (i % cfg.search.repeats),
                            )
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
                record()
                study.tell(trial, value)
                state = "COMPLETE"
        except optuna.TrialPruned:
            value = history[-1][metric] if history else None
            finishing.enter_context(deferred())
            record()
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
                    tracker.end_trial(run_id, "FAIL", [] if recorded else history, {}, error)
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
            # already shows as the run's value (the highest step); `record` does not log it
            # again at step 0, which would add a second point to the curve's first epoch.
            record(strict=True)
            tracker.end_trial(run_id, state, [], {}, value=value)
        return TrialResult(state, value, params, history, seconds, error)


def describe(e: BaseException) -> str:
    """``Type: message`` of an error, and of the error that caused it (one line)."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return " ".join(text.split())
