"""The winner: one honest test score, an exported model that takes raw images, predictions, reports.

The best trial's head is rebuilt by retraining it from its parameters and seed on the cached
training features (training is deterministic, so this is the same head the trial scored) and is
evaluated once on the test split, which the search never reads. The exported model is one
Keras model: ``Resizing -> preprocessing (a frozen Dense(3)) -> backbone -> pooling -> head``,
taking raw RGB images (0..255) of any size and returning class probabilities; it uses built-in
layers only, so ``keras.models.load_model`` loads it in safe mode without tlsweep installed.
The class names travel inside the ``.keras`` file as ``tlsweep.json`` (see :func:`read_metadata`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep.config import DEFAULT_PREDICT_BATCH, SweepConfig
from tlsweep.errors import StudyError, TlsweepError

log = logging.getLogger(__name__)

METADATA_NAME = "tlsweep.json"


@dataclass
class Winner:
    number: int
    value: float
    params: dict[str, Any]
    backbone: Any
    entry: Any
    head: Any
    test: dict[str, Any] | None  # None: no test split
    test_proba: Any = None  # [n, classes] probabilities on the test split
    test_labels: Any = None  # [n] true labels of the test split
    # Augmented views with test-time augmentation: the validation score of the single plain
    # view, which is what the exported model computes (the trial's value is the views' mean).
    validation_single_view: float | None = None


def best_trial(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:
        raise StudyError(
            f"study '{study.study_name}' has no complete trial yet; run 'tlsweep run' first"
        ) from None


def rebuild(cfg: SweepConfig, study: Any, extracted: list | None = None) -> Winner:
    """Retrain the best trial's head on the cached features and score it on the test split.

    ``extracted``: what :func:`~tlsweep.features.extract_all` returned, when the caller has it
    already (a finished run), so the images are not listed and hashed a second time.
    """
    import optuna

    from tlsweep.features import extract_all
    from tlsweep.head import HeadParams, evaluate_head, train_head
    from tlsweep.search import check_data, suggest, train_views, training_options

    best = best_trial(study)
    # Never retrain the winner's parameters on features other than the ones it was chosen on.
    extracted = extracted or extract_all(cfg, check=lambda keys: check_data(cfg, study, keys))
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
    hp = HeadParams.from_dict({**full, "seed": cfg.search.seed})
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
    from tlsweep.head_graph import proba_loss_acc
    from tlsweep.metrics import scores

    proba = head.predict_proba(np.asarray(x, np.float32))
    name = cfg.search.metric.removeprefix("val_")
    if name in ("loss", "accuracy"):
        loss, acc = proba_loss_acc(proba, np.asarray(y), head.params.label_smoothing)
        return loss if name == "loss" else acc
    return float(scores(proba, y, [name])[name])


def score_test(cfg: SweepConfig, proba: Any, y: Any) -> dict[str, Any]:
    """The objective's metric on the test images (when it has a test form) and a seeded 95%
    bootstrap interval over the test images for it and for accuracy (``ci``)."""
    from tlsweep.config import BOOTSTRAP_SAMPLES
    from tlsweep.metrics import SCORES, bootstrap_intervals, scores

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
    cfg: SweepConfig, study: Any, tracker: Any | None, extracted: list | None = None
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
    return w


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


def log_reports(cfg: SweepConfig, study: Any, tracker: Any) -> list[str]:
    """Optuna's plots (HTML) and the per-backbone comparison on the parent run."""
    import warnings

    from tlsweep.search import summarize

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


# --- export ------------------------------------------------------------------------------------
def image_branch(bb: Any, inputs: Any, suffix: str = "") -> Any:
    """``Resizing -> preprocessing -> backbone (inference mode) -> pooling`` on ``inputs``."""
    import keras

    from tlsweep import backbones as bbs

    size = bb.input_size
    x = keras.layers.Resizing(size, size, interpolation="bilinear", name=f"resize{suffix}")(inputs)
    x = bbs.preprocess_layer(bb, name=f"preprocess{suffix}")(x)
    base = bbs.build_base(bb)
    if suffix:  # two members may build the same Keras model name; layer names must be unique
        base.name = f"{base.name}{suffix}"
    x = base(x, training=False)
    return bbs.pooling_layer(bb.pooling, name=f"pool{suffix}")(x)


def build_features_model(bb: Any) -> Any:
    """Raw RGB images of any size -> the features the head was trained on.

    A fused backbone runs one branch per member on the same images and concatenates them.
    """
    import keras

    inputs = keras.Input((None, None, 3), name="image")
    if bb.members:
        branches = [image_branch(m, inputs, f"_{j}") for j, m in enumerate(bb.members)]
        x = keras.layers.Concatenate(name="features")(branches)
    else:
        x = image_branch(bb, inputs)
    return keras.Model(inputs, x, name="tlsweep_features")


def build_export_model(w: Winner) -> Any:
    """Raw RGB images of any size -> class probabilities [n, classes]."""
    import keras

    features = build_features_model(w.backbone)
    head = w.head.to_keras()
    p = head(features.output)
    if w.head.n_classes == 2:
        p = keras.layers.Concatenate(name="probabilities")([1.0 - p, p])
    return keras.Model(features.input, p, name="tlsweep_classifier")


def _input_sizes(bb: Any) -> list[int]:
    return [m.input_size for m in bb.members] if bb.members else [bb.input_size]


def metadata(cfg: SweepConfig, w: Winner) -> dict[str, Any]:
    return {
        "class_names": w.entry.class_names,
        "input": "RGB images, values 0..255, any size (resized to "
        + " and ".join(f"{s}x{s}" for s in _input_sizes(w.backbone))
        + " inside the model)",
        "output": "class probabilities, one column per class_names entry",
        "backbone": w.entry.manifest["backbone"],
        "study": cfg.study,
        "trial": w.number,
        "params": w.params,
        f"validation_{cfg.search.metric}": w.value,
        "test": w.test,
        **_views_note(cfg, w),
    }


def _views_note(cfg: SweepConfig, w: Winner) -> dict[str, Any]:
    """What an exported model trained on augmented views computes, in its metadata."""
    a = w.backbone.augment
    if a is None:
        return {}
    note = {
        "augment": {"views": a.views, "flip": a.flip, "crop": a.crop, "tta": a.tta},
        "test_time_augmentation": False,
        "scores": "the model sees one image as it is (no test-time augmentation): "
        "test.accuracy is its score"
        + (
            "; the trial's validation value and test.tta_accuracy are the mean over the cached "
            "views, which the model does not compute"
            if a.tta
            else ""
        ),
    }
    if w.validation_single_view is not None:  # the registry ranks on what the model computes
        note[f"validation_{cfg.search.metric}"] = w.validation_single_view
        note[f"validation_{cfg.search.metric}_tta"] = w.value
    return note


@dataclass
class Registration:
    """What :func:`export` did in the model registry."""

    name: str
    version: int
    promoted: bool  # the `champion` alias now points at this version
    previous: float | None  # the champion's validation score before, if it had one


def export(
    cfg: SweepConfig,
    study: Any,
    output: str | Path,
    tracker: Any | None,
    register: str | None = None,
) -> tuple[Winner, Registration | None]:
    """Write the winner as one ``.keras`` file (and log it to the parent run as an MLflow model).

    ``register`` (or the sweep's ``register:``): also register that MLflow model as a new
    version of this registered model, promoted to ``@champion`` on its validation score.
    """
    _check_output(output)
    w = evaluate_and_log(cfg, study, tracker)
    return w, save_model(cfg, w, build_export_model(w), output, tracker, register=register)


def _check_output(output: str | Path) -> None:
    if Path(output).suffix != ".keras":
        raise TlsweepError(f"--output {output}: the file name must end in .keras")


def save_model(
    cfg: SweepConfig,
    w: Winner,
    model: Any,
    output: str | Path,
    tracker: Any | None,
    extra: dict[str, Any] | None = None,
    register: str | None = None,
) -> Registration | None:
    """Save ``model`` (the winner's, frozen or fine-tuned) with its metadata, atomically; log it
    to the parent run and register it (``register`` or the sweep's ``register:``)."""
    _check_output(output)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp.keras")
    meta = {**metadata(cfg, w), **(extra or {})}
    try:  # the model file is whole or absent, never half-written (a full disk, Ctrl-C)
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(METADATA_NAME, json.dumps(meta, indent=1, default=str))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    name = register or cfg.register
    reg = None
    if tracker is not None and tracker.parent_run_id:
        uri = tracker.log_parent_model(model, meta, output)
        if name and uri:
            # ranked on the validation score of the model exported (fine-tuned or frozen)
            value = meta.get(f"validation_{cfg.search.metric}", w.value)
            version, promoted, before = tracker.register(
                uri,
                name,
                value,
                cfg.search.metric,
                cfg.search.direction,
                {"tlsweep.trial": w.number, "tlsweep.backbone": w.backbone.label},
            )
            reg = Registration(name, version, promoted, before)
    elif name:
        raise TlsweepError(f"--register {name}: needs the study's MLflow parent run")
    return reg


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The ``tlsweep.json`` stored inside an exported ``.keras`` file."""
    try:
        with zipfile.ZipFile(model_path) as z:
            return json.loads(z.read(METADATA_NAME))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError):
        return {}


# --- predict -----------------------------------------------------------------------------------
def find_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files from files and folders (recursively); and the paths that are not usable."""
    from tlsweep.data import IMAGE_EXTENSIONS

    files: list[str] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if n.startswith("."):
                        continue
                    f = os.path.join(root, n)
                    if n.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(f)
                    else:
                        bad.append((f, "not an image file extension"))
        elif path.is_file():
            files.append(str(path))
        else:
            bad.append((str(path), "no such file or folder"))
    return files, bad


def predict(
    model_path: str | Path, paths: list[str], batch_size: int = DEFAULT_PREDICT_BATCH
) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """(rows of file/class/probability, unusable files with reasons, class names)."""
    import keras

    from tlsweep.decode import image_batches, why_skipped

    model_path = Path(model_path)
    if not model_path.is_file():
        raise TlsweepError(f"{model_path}: no such model file; create one with 'tlsweep export'")
    try:
        model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise TlsweepError(
            f"{model_path}: not a loadable Keras model ({type(e).__name__})"
        ) from None
    meta = read_metadata(model_path)
    n_out = int(model.output_shape[-1])
    names = meta.get("class_names") or [str(i) for i in range(n_out)]
    # Batches are made at the model's (largest) input size; the model resizes them again.
    sizes = [
        int(layer.get_config()["height"])
        for layer in model.layers
        if layer.name == "resize" or layer.name.startswith("resize_")
    ]
    size = max(sizes) if sizes else 224
    files, bad = find_files(paths)
    ok = files
    rows: list[dict] = []
    seen = np.zeros(len(ok), dtype=bool)
    for idx, batch in image_batches(ok, size, batch_size):
        proba = np.asarray(model.predict_on_batch(batch))
        for i, pr in zip(idx, proba, strict=True):
            seen[i] = True
            k = int(pr.argmax())
            rows.append(
                {
                    "file": ok[i],
                    "class": names[k],
                    "probability": float(pr[k]),
                    **{f"p_{n}": float(v) for n, v in zip(names, pr, strict=True)},
                }
            )
    unseen = [ok[i] for i in np.flatnonzero(~seen)]
    bad += list(zip(unseen, why_skipped(unseen), strict=True))
    rows.sort(key=lambda r: r["file"])
    return rows, bad, names
