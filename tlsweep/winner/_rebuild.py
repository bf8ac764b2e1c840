"""The winner: the best trial's head rebuilt and scored once, honestly, on the test split.

The best trial's head is rebuilt by retraining it from its parameters, with the seed the trial
trained with (recorded with the trial), on the whole cached training split. Training is
deterministic, so without ``cv_folds`` or ``repeats`` this is the head the trial scored. With
them the trial's value is the mean over several heads (folds, seeds) and the rebuilt head is
another one, trained on all the training images with the first seed; its own validation score
is logged beside the trial's (``rebuilt_<metric>``). It is evaluated once on the test split,
which the search never reads. Its scores (with bootstrap intervals), per-class table, MLflow's
evaluation and the study's reports go on the parent run.
The winner becomes a model file in :mod:`tlsweep.winner._export`; :mod:`tlsweep.winner._predict`
uses that file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlsweep.config import SweepConfig
from tlsweep.errors import StudyError
from tlsweep.images import image_grid

if TYPE_CHECKING:
    import optuna

    from tlsweep.config import BackboneConfig
    from tlsweep.features import CachedEntry
    from tlsweep.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Winner:
    number: int
    value: float
    params: dict[str, Any]
    backbone: BackboneConfig
    entry: CachedEntry
    head: Any
    test: dict[str, Any] | None  # None: no test split
    test_proba: Any = None  # [n, classes] probabilities on the test split
    test_labels: Any = None  # [n] true labels of the test split
    # Augmented views with test-time augmentation: the validation score of the single plain
    # view, which is what the exported model computes (the trial's value is the views' mean).
    validation_single_view: float | None = None


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise StudyError(
            f"study '{study.study_name}' has no complete trial yet; run 'tlsweep run' first"
        ) from None


def rebuild(cfg: SweepConfig, study: optuna.Study, extracted: list | None = None) -> Winner:
    """Retrain the best trial's head on the cached features and score it on the test split.

    ``extracted``: what :func:`~tlsweep.features.extract_all` returned, when the caller has it
    already (a finished run), so the images are not listed and hashed a second time.
    """
    import optuna

    from tlsweep.features import plan_extraction
    from tlsweep.head import HeadParams, evaluate_head, train_head
    from tlsweep.study import SEED_ATTR, check_data, suggest, train_views, training_options

    best = best_trial(study)
    # Never retrain the winner's parameters on features other than the ones it was chosen on.
    if not extracted:
        extraction = plan_extraction(cfg)
        check_data(cfg, study, extraction.expected())
        extracted = extraction.extract()
    entries = {bb.label: (bb, e) for bb, e, _ in extracted}
    params = dict(best.params)
    # Replay the trial's parameters through the same suggest() code path (fixed ones included).
    full = suggest(optuna.trial.FixedTrial(params), cfg)
    label = full["backbone"]
    if label not in entries:
        raise StudyError(f"the best trial's backbone {label} is not in the sweep file any more")
    bb, entry = entries[label]
    xt, yt = entry.views("train") if bb.augment else entry.split("train")
    xv, yv = entry.views("validation") if bb.augment else entry.split("validation")
    # The seed the trial trained with, not the sweep file's now: a study resumed with another
    # search.seed keeps its trials, and the winner must be the head that won. (Trials from
    # before the seed was recorded ran with the file's seed, as their study did.)
    seed = int(best.user_attrs.get(SEED_ATTR, cfg.search.seed))
    if seed != cfg.search.seed:
        log.info(
            "the winner (trial %d) is retrained with the seed it ran with, %d (search.seed is %d)",
            best.number,
            seed,
            cfg.search.seed,
        )
    hp = HeadParams.from_dict({**full, "seed": seed})
    names = list(entry.class_names)
    head = train_head(
        xt,
        yt,
        xv,
        yv,
        len(names),
        hp,
        train_views=train_views(bb),
        **training_options(cfg, yt, names),
    )
    # The test score is the plain view's, as the exported model computes it (one image in, no
    # test-time augmentation: its views depend on the file, which a model does not see).
    xs, ys = entry.split("test")
    test = evaluate_head(head, xs, ys) if len(ys) else None
    proba = None
    single = None
    if np.ndim(xv) == 3:
        single = _metric(cfg, head, xv[0], yv)
    if test is not None:
        test["class_names"] = entry.class_names
        proba = head.predict_proba(np.asarray(xs, np.float32))
        test.update(score_test(cfg, proba, ys))
        if bb.augment is not None and bb.augment.tta:
            xs_views, _ = entry.views("test")
            test["tta_accuracy"] = evaluate_head(head, xs_views, ys)["accuracy"]
            test["tta_views"] = bb.augment.views
    return Winner(best.number, float(best.value), full, bb, entry, head, test, proba, ys, single)


def _metric(cfg: SweepConfig, head: Any, x: Any, y: Any) -> float:
    """The objective's metric of ``head`` on features ``x`` (one view) as a trial scores it."""
    from tlsweep.head import objective_value

    proba = head.predict_proba(np.asarray(x, np.float32))
    return objective_value(cfg.search.metric, proba, y, head.params.label_smoothing)


def score_test(cfg: SweepConfig, proba: Any, y: Any) -> dict[str, Any]:
    """The objective's metric on the test images (when it has a test form) and a seeded 95%
    bootstrap interval over the test images for it and for accuracy (``ci``)."""
    from tlsweep.config import BOOTSTRAP_SAMPLES
    from tlsweep.head import SCORES, bootstrap_intervals, scores

    names = ["accuracy"]
    objective = cfg.search.metric.removeprefix("val_")
    if objective in SCORES and objective != "accuracy":
        names.append(objective)
    out: dict[str, Any] = {k: v for k, v in scores(proba, y, names).items() if k != "accuracy"}
    ci = bootstrap_intervals(proba, y, names, samples=BOOTSTRAP_SAMPLES, seed=cfg.search.seed)
    out["ci"] = {k: list(v) for k, v in ci.items()}
    out["ci_level"] = 0.95
    out["ci_samples"] = BOOTSTRAP_SAMPLES
    return out


def evaluate_and_log(
    cfg: SweepConfig,
    study: optuna.Study,
    tracker: Tracker | None,
    extracted: list | None = None,
) -> Winner:
    """Rebuild the winner, score it on the test split and put the results on the parent run."""
    w = rebuild(cfg, study, extracted)
    if tracker is not None and tracker.parent_run_id:
        metrics: dict[str, float] = {
            f"rebuilt_{cfg.search.metric}": w.head.history[-1].as_dict()[cfg.search.metric]
        }
        if w.validation_single_view is not None:  # what the exported model computes
            metrics[f"rebuilt_{cfg.search.metric}_single_view"] = w.validation_single_view
        if w.test is not None:
            metrics["test_accuracy"] = w.test["accuracy"]
            if "tta_accuracy" in w.test:  # not what the exported model computes
                metrics["test_tta_accuracy"] = w.test["tta_accuracy"]
            metrics["test_loss"] = w.test["loss"]
            for name, (lo, hi) in w.test.get("ci", {}).items():
                metrics[f"test_{name}"] = w.test[name]
                metrics[f"test_{name}_ci_low"] = lo
                metrics[f"test_{name}_ci_high"] = hi
            for name, p, r in zip(
                w.entry.class_names, w.test["precision"], w.test["recall"], strict=True
            ):
                metrics[f"test_precision_{_safe(name)}"] = p
                metrics[f"test_recall_{_safe(name)}"] = r
            tracker.log_parent_dict(w.test, "test/metrics.json")
            tracker.log_parent_text(_confusion_text(w.test), "test/confusion_matrix.txt")
        else:
            tracker.log_parent_text(
                "no test split: layout A without a test/ folder, or test_split: 0\n",
                "test/NO_TEST_SPLIT.txt",
            )
        tracker.log_parent_metrics(metrics)
        tracker.set_parent_tag("winner_trial", str(w.number))
        log_reports(cfg, study, tracker)
        if w.test is not None:
            try:
                tracker.log_evaluation(w.test_proba, w.test_labels, list(w.entry.class_names))
            except Exception as e:  # noqa: BLE001 - the test score above is logged already
                log.warning("MLflow's evaluation of the winner failed: %s", e)
            try:  # the winner's mistakes, to look at rather than read
                paths = [f["path"] for f in w.entry.manifest["files"] if f["split"] == "test"]
                with tempfile.TemporaryDirectory() as tmp:
                    png = Path(tmp) / "misclassified.png"
                    if misclassified_grid(
                        Path(cfg.data.dir),
                        paths,
                        w.test_labels,
                        w.test_proba,
                        list(w.entry.class_names),
                        png,
                    ):
                        tracker.log_parent_artifact(str(png), "test")
            except Exception as e:  # noqa: BLE001 - a picture must not undo the scores above
                log.warning("could not draw the winner's misclassified test images: %s", e)
    return w


MISCLASSIFIED_SHOWN = 16  # the most confident mistakes of the winner on the test split


def misclassified_grid(
    data_dir: Path,
    paths: list[str],
    labels: Any,
    proba: Any,
    class_names: list[str],
    out: Path,
    n: int = MISCLASSIFIED_SHOWN,
) -> bool:
    """A PNG of the test images the winner gets wrong, most confident mistakes first, each
    with its file, true class and predicted class (and probability). False (nothing written)
    when it gets none wrong."""
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels)
    if proba.ndim == 1 or proba.shape[1] == 1:  # two classes as one sigmoid output
        p1 = proba.reshape(-1)
        proba = np.stack([1.0 - p1, p1], axis=1)
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    if not len(wrong) or len(paths) != len(labels):
        return False
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n]
    items = [
        (
            paths[i],
            f"{paths[i]}\ntrue {class_names[labels[i]]}, "
            f"predicted {class_names[pred[i]]} ({proba[i, pred[i]]:.2f})",
        )
        for i in wrong
    ]
    return image_grid(data_dir, items, out)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _confusion_text(test: dict[str, Any]) -> str:
    names = test["class_names"]
    width = max(8, *(len(n) for n in names))
    lines = [
        "rows: true class, columns: predicted class",
        " " * width + "".join(f"{n:>{width}}" for n in names),
    ]
    for n, row in zip(names, test["confusion_matrix"], strict=True):
        lines.append(f"{n:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines) + "\n"


def log_reports(cfg: SweepConfig, study: optuna.Study, tracker: Tracker) -> list[str]:
    """Optuna's plots (HTML) and the per-backbone comparison on the parent run."""
    import warnings

    from tlsweep.study import summarize

    written = []
    summary = summarize(cfg, study)
    tracker.log_parent_dict(summary.per_backbone, "reports/backbones.json")
    rows = ["| backbone | trials | best | median | s/trial |", "|---|---|---|---|---|"]
    for b in summary.per_backbone:
        rows.append(
            f"| {b['backbone']} | {b['trials']} | {b['best']} | {b['median']} | "
            f"{round(b['seconds_per_trial'], 2) if b['seconds_per_trial'] else None} |"
        )
    tracker.log_parent_text("\n".join(rows) + "\n", "reports/backbones.md")
    try:
        import optuna.visualization as vis
    except ImportError:  # pragma: no cover
        return written
    plots = {
        "optimization_history": vis.plot_optimization_history,
        "param_importances": vis.plot_param_importances,
        "parallel_coordinate": vis.plot_parallel_coordinate,
    }
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in plots.items():
            try:
                fig = fn(study)
                path = Path(tmp) / f"{name}.html"
                fig.write_html(str(path), include_plotlyjs="cdn")
                tracker.log_parent_artifact(str(path), "reports")
                written.append(name)
            except (ValueError, RuntimeError, ImportError) as e:  # e.g. importances need 2+
                log.info("report %s skipped: %s", name, e)  # varied trials, or no plotly
            except tracker.errors() as e:
                log.warning("report %s not logged: %s", name, e)
    return written
