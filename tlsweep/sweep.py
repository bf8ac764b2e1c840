"""One sweep end to end: features (cached) -> study (Optuna) -> runs (MLflow) -> summary.

This is the only module that wires the steps together; each step lives in its own module. The
checks before any work are :mod:`tlsweep.sweep`'s, the worker processes of ``--workers N``
:mod:`tlsweep.study._launch`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsweep.config import SweepConfig, changes, redact_url, resolved_record, resolved_yaml
from tlsweep.errors import StudyError, StudyFailing, TlsweepError
from tlsweep.study import StudySummary, extract_in_workers, run_workers, stop_held, summarize

if TYPE_CHECKING:
    import optuna

    from tlsweep.tracking import Tracker
    from tlsweep.winner import FinetuneResult, Registration, Winner

log = logging.getLogger(__name__)


def _parent_params(cfg: SweepConfig) -> dict[str, Any]:
    s = cfg.search
    return {
        "sweep_file": str(cfg.path),
        "data_dir": str(cfg.data.dir),
        "backbones": ", ".join(b.label for b in cfg.backbones),
        "n_trials": s.n_trials,
        "sampler": s.sampler,
        "pruner": s.pruner,
        "metric": s.metric,
        "direction": s.direction,
        "seed": s.seed,
        "storage": redact_url(cfg.storage),
        **{f"space.{n}": p.to_json() for n, p in s.space.items()},
    }


def attach_parent(
    cfg: SweepConfig, study: optuna.Study, tracker: Tracker, reopen: bool = True
) -> str:
    """Find the study's parent MLflow run (resume) or create it, and remember it in the study;
    ``reopen=False`` leaves a found parent's state as it is (see ``Tracker.attach_parent``)."""
    from tlsweep.study import PARENT_ATTR

    rid = tracker.attach_parent(
        study.user_attrs.get(PARENT_ATTR), _parent_params(cfg), cfg.text, cfg.path.name, reopen
    )
    study.set_user_attr(PARENT_ATTR, rid)
    return rid


def record_resolved(cfg: SweepConfig, study: optuna.Study, tracker: Tracker) -> list[str]:
    """Store the resolved sweep with the study and log it to the parent run; on resume, log
    one line per setting that differs from the previous run of the study (and return them)."""
    from tlsweep.study import RESOLVED_ATTR

    record = resolved_record(cfg)
    previous = study.user_attrs.get(RESOLVED_ATTR)
    changed = changes(previous, record) if previous is not None else []
    for line in changed:
        log.info("study %s resumed with a change: %s", cfg.study, line)
    # MLflow first: a kill between the two writes then logs the change again next time, where
    # the other order would compare with the new record and never log the change at all
    tracker.log_resolved(resolved_yaml(record), changed)
    study.set_user_attr(RESOLVED_ATTR, record)
    return changed


def run_sweep(
    cfg: SweepConfig,
    *,
    on_trial: Callable[[Any], None] | None = None,
    progress: Callable[[Any], Any] | None = None,
    workers: int = 1,
    worker_index: int | None = None,
    worker_argv: Sequence[str] | None = None,
    worker_env: dict[str, str] | None = None,
    evaluate_winner: bool = True,
    finetune_progress: Callable[[int, int, int, int], None] | None = None,
) -> StudySummary:
    """Extract (or reuse) features, run the study to ``n_trials`` finished trials, summarize.

    With ``workers > 1`` this process prepares everything (features, study, parent run) and
    starts ``workers`` worker processes (``worker_argv``) on the same study, then waits.
    """
    from tlsweep.features import plan_extraction
    from tlsweep.study import check_setup

    preflight(cfg, cache=True)
    held: list[Any] = []  # `--workers N`: the workers, started to extract the missing features
    try:
        extraction = plan_extraction(cfg)
        # a study made on other features is refused before minutes of extraction
        _check_existing(cfg, extraction.expected())
        if workers > 1 and not extraction.ready():  # the workers extract the shards, we wait
            held.extend(
                extract_in_workers(workers, worker_argv or [], worker_env or {}, extraction.ready)
            )
        entries = extraction.extract(progress)  # whatever is still missing
        if worker_index is None:  # workers of `--workers N`: their parent has checked
            check_setup(cfg, [(bb, e) for bb, e, _ in entries])
        from tlsweep.audit import eval_copies

        copies = None  # a worker of `--workers N` needs them only to leave them out
        if worker_index is None or cfg.data.dedupe == "eval":
            entries, copies = eval_copies(cfg, entries)
        return _run_study(
            cfg,
            entries,
            on_trial,
            workers,
            worker_index,
            worker_argv,
            worker_env,
            evaluate_winner,
            finetune_progress,
            held,
            copies,
        )
    finally:
        stop_held([p for p in held if not p.stdin.closed])  # not let go: an error stopped us


def _run_study(
    cfg: SweepConfig,
    entries: list,
    on_trial: Callable[[Any], None] | None,
    workers: int,
    worker_index: int | None,
    worker_argv: Sequence[str] | None,
    worker_env: dict[str, str] | None,
    evaluate_winner: bool,
    finetune_progress: Callable[[int, int, int, int], None] | None,
    held: list[Any],
    copies: Any = None,
) -> StudySummary:
    """:func:`run_sweep` once the features exist (``held``: workers waiting for ``go``;
    ``copies``: validation and test images that copy training images, put on the parent run)."""
    from tlsweep.features import study_keys
    from tlsweep.study import StudyRunner, load_features, open_storage, open_study
    from tlsweep.tracking import Tracker, prepare_mlflow, resolve_uri

    # A command refused here leaves no new store behind: a broken tracking store is refused
    # before the storage is created, and a storage that cannot be opened before mlflow.db is;
    # the study comes before the MLflow experiment, so a refused study (another search space,
    # other data) leaves no empty experiment behind.
    prepare_mlflow(resolve_uri(cfg.tracking_uri), create=False)
    storage = open_storage(cfg)
    if workers > 1:
        study = open_study(cfg, storage, data=study_keys(entries))
        tracker = Tracker(cfg.tracking_uri, cfg.study)
        attach_parent(cfg, study, tracker)
        record_resolved(cfg, study, tracker)
        _log_copies(cfg, tracker, copies)
        try:
            run_workers(workers, worker_argv or [], worker_env or {}, held)
        except BaseException:  # close the parent run; what stopped the workers goes on up
            _close_after_error(cfg, study, tracker)
            raise
        summary = summarize(cfg, study)
        _finish_or_fail(
            cfg, study, tracker, summary, evaluate_winner, None, entries, finetune_progress
        )
        return summary
    features = load_features([(bb, e) for bb, e, _ in entries])
    runner = StudyRunner(cfg, features, None, on_trial, worker_index or 0)
    tracker = runner.tracker = Tracker(cfg.tracking_uri, cfg.study)
    attach_parent(cfg, runner.study, tracker)
    if worker_index is None:  # the workers of `--workers N`: their parent has recorded it
        record_resolved(cfg, runner.study, tracker)
        _log_copies(cfg, tracker, copies)
    done = False
    try:
        runner.run()
        done = runner.finished() >= cfg.search.n_trials
    except BaseException:
        if worker_index is None:  # close the parent run; what stopped the run goes on up
            _close_after_error(cfg, runner.study, tracker)
        raise
    summary = summarize(cfg, runner.study)
    if worker_index is None:
        _finish_or_fail(
            cfg,
            runner.study,
            tracker,
            summary,
            evaluate_winner and done,
            done,
            entries,
            finetune_progress,
        )
    return summary


def _log_copies(cfg: SweepConfig, tracker: Any, copies: Any) -> None:
    """Warn about validation and test images that copy training images, and put their counts,
    the copies found (a table) and the closest pairs (a PNG grid) on the parent run."""
    if copies is not None:
        from tlsweep.audit import log_on_parent, warn_copies

        counts = warn_copies(cfg, copies)  # once the study is open: a refused study says why
        tracker.log_parent_metrics({f"{s}_copies_of_train": n for s, n in counts.items()})
        tracker.set_parent_tag("data_dedupe", cfg.data.dedupe)
        tracker.log_parent_inputs(str(cfg.data.dir), copies.cache_key, copies.split_sizes)
        try:  # a picture that cannot be drawn must not stop the study
            log_on_parent(tracker, copies)
        except Exception as e:  # noqa: BLE001 - matplotlib and MLflow raise many kinds
            why = str(e).strip().partition("\n")[0] or type(e).__name__
            log.warning("could not draw the copies found on the study's run: %s", why)


def _finish_or_fail(
    cfg: SweepConfig,
    study: optuna.Study,
    tracker: Tracker,
    summary: StudySummary,
    evaluate: bool,
    done: bool | None,
    extracted: list,
    finetune_progress: Callable[[int, int, int, int], None] | None = None,
) -> None:
    """:func:`_finish`; a failure (scoring the winner, most likely) is a runtime failure that
    names its cause: the finished trials are safe in the study."""
    try:
        _finish(cfg, study, tracker, summary, evaluate, done, extracted, finetune_progress)
    except Exception as e:  # noqa: BLE001 - re-raised as a one-line runtime failure
        from tlsweep.study import describe
        from tlsweep.tracking import tracking_errors

        log.debug("scoring the winner failed", exc_info=True)
        with contextlib.suppress(*tracking_errors()):
            tracker.close_parent(bool(done))
        raise StudyFailing(
            f"study '{cfg.study}': {summary.finished} trials finished and saved, but scoring the "
            f"winner failed: {describe(e)}; score it again with 'tlsweep best {cfg.path.name}'"
        ) from None


def _close_after_error(cfg: SweepConfig, study: optuna.Study, tracker: Tracker) -> None:
    """Record the best trial and close the parent run after the run stopped on an error."""
    from tlsweep.study import storage_errors
    from tlsweep.tracking import tracking_errors

    try:
        _finish(cfg, study, tracker, summarize(cfg, study), False, False)
    except (*tracking_errors(), *storage_errors()) as e:
        log.warning("could not close the study's MLflow run: %s", e)


def _check_existing(cfg: SweepConfig, keys: dict[str, dict[str, Any]]) -> None:
    """Refuse, before extracting, to resume a study that was scored on other features."""
    from tlsweep.study import check_data, existing_study, open_storage

    try:
        storage = open_storage(cfg, must_exist=True)
    except StudyError:
        return  # no storage file yet, so no study; a broken storage is reported when opened
    study = existing_study(cfg, storage)
    if study is not None:
        check_data(cfg, study, keys)


def check_study_data(cfg: SweepConfig, study: optuna.Study) -> None:
    """Raise :class:`StudyError` if the sweep file's data, weights or settings no longer give
    the features the study's trials were scored on (reads the images; extracts nothing)."""
    from tlsweep.features import expected_keys
    from tlsweep.study import check_data

    check_data(cfg, study, expected_keys(cfg))


def _finish(
    cfg: SweepConfig,
    study: optuna.Study,
    tracker: Tracker,
    summary: StudySummary,
    evaluate: bool,
    done: bool | None = None,
    extracted: list | None = None,
    finetune_progress: Callable[[int, int, int, int], None] | None = None,
) -> None:
    done = summary.finished >= cfg.search.n_trials if done is None else done
    if summary.best:
        b = summary.best[0]
        tracker.log_best(b["number"], b["value"], cfg.search.metric, b["params"])
    if done and evaluate:
        from tlsweep import winner

        w = winner.evaluate_and_log(cfg, study, tracker, extracted)
        summary.test = w.test
        summary.test_note = None if w.test else "no test split (no test/ folder, or test_split: 0)"
        if cfg.finetune is not None:
            try:
                ft = finetune_winner(cfg, w, tracker, finetune_progress, study)
            except BaseException:  # Ctrl-C or a failure: the checkpoints stay, a rerun resumes
                with contextlib.suppress(Exception):
                    tracker.close_parent(False)
                raise
            summary.finetune = ft
            if ft.accepted and ft.test is not None:
                summary.test = ft.test
    refresh_trials_table(tracker, study, cfg.backbones[0].label)  # every trial, one table
    tracker.close_parent(done)


def finetune_winner(
    cfg: SweepConfig,
    w: Winner,
    tracker: Tracker | None,
    progress: Any = None,
    study: optuna.Study | None = None,
) -> FinetuneResult:
    """Run (or resume, or read back) the fine-tuning stage and put its outcome on the parent
    run, and with the study (for ``tlsweep status``)."""
    from tlsweep.study import FINETUNE_ATTR
    from tlsweep.winner import run_finetune

    ft = run_finetune(cfg, w, tracker, progress)
    if study is not None:
        study.set_user_attr(
            FINETUNE_ATTR,
            {"trial": w.number, "settings": _finetune_settings(cfg), "result": ft.as_dict()},
        )
    if tracker is not None and tracker.parent_run_id:
        metrics = {
            f"finetune_baseline_{ft.metric}": ft.baseline,
            f"finetune_best_{ft.metric}": ft.best,
        }
        if ft.test is not None:
            metrics["finetune_test_accuracy"] = ft.test["accuracy"]
            metrics["finetune_test_loss"] = ft.test["loss"]
        tracker.log_parent_metrics(metrics)
        tracker.set_parent_tag("winner_model", "finetuned" if ft.accepted else "frozen")
    return ft


def _finetune_settings(cfg: SweepConfig) -> str:
    import json
    from dataclasses import asdict

    return json.dumps(asdict(cfg.finetune) if cfg.finetune else None, sort_keys=True, default=str)


def recorded_finetune(
    cfg: SweepConfig, study: optuna.Study, summary: StudySummary
) -> FinetuneResult | None:
    """The fine-tuning outcome recorded with the study, if it is of the current best trial
    with the sweep file's current ``finetune:`` settings (else None: it would be stale)."""
    from tlsweep.study import FINETUNE_ATTR

    rec = study.user_attrs.get(FINETUNE_ATTR)
    if cfg.finetune is None or not rec or not summary.best:
        return None
    if rec.get("trial") != summary.best[0]["number"] or rec.get("settings") != (
        _finetune_settings(cfg)
    ):
        return None
    from tlsweep.winner import FinetuneResult

    return FinetuneResult(**rec["result"])


def export_winner(
    cfg: SweepConfig,
    study: optuna.Study,
    output: Any,
    tracker: Tracker | None,
    progress: Any = None,
    register: str | None = None,
) -> tuple[Winner, FinetuneResult | None, Registration | None]:
    """Export the winner: the fine-tuned model if it beat the frozen one on validation.

    Returns (the frozen winner, the fine-tuning result or None, the registration or None).
    """
    import keras

    from tlsweep import winner
    from tlsweep import winner as export
    from tlsweep.audit import scored_entries

    if cfg.finetune is None:
        w, reg = export.export(cfg, study, output, tracker, register, scored_entries(cfg, study))
        return w, None, reg
    export.check_output(output)
    w = winner.evaluate_and_log(cfg, study, tracker, scored_entries(cfg, study))
    ft = finetune_winner(cfg, w, tracker, progress, study)
    info = {"model": "finetuned" if ft.accepted else "frozen", "finetune": ft.as_dict()}
    if ft.accepted:
        model = keras.models.load_model(ft.model_path, safe_mode=True, compile=False)
        info["test"] = ft.test
        info[f"validation_{cfg.search.metric}"] = ft.best
    else:
        model = export.build_export_model(w)
    reg = export.save_model(cfg, w, model, output, tracker, info, register=register)
    return w, ft, reg


# --- before any work -------------------------------------------------------------------------
def preflight(
    cfg: SweepConfig, *, storage: bool = True, tracking: bool = True, cache: bool = False
) -> None:
    """Before any work: every store the command writes to can be reached and written.

    A database or tracking server that is down or refuses the login, a folder that cannot be
    written: one :class:`~tlsweep.errors.TlsweepError` line within seconds, and nothing created
    (no database file, no MLflow experiment, no cache entry).
    """
    from tlsweep.config import check_can_write

    if cache:
        check_can_write(cfg.cache_dir, "cache_dir", "dir")
    if storage:
        url = cfg.storage
        if url.startswith("sqlite:///"):
            check_can_write(url[len("sqlite:///") :].partition("?")[0], "storage")
        elif url.startswith("journal:"):
            check_can_write(url[len("journal:") :], "storage")
        else:
            from tlsweep.study import check_database

            check_database(url, "storage")
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking and uri:
        _check_tracking(uri)


def _check_tracking(uri: str) -> None:
    from urllib.parse import urlsplit

    from tlsweep.config import TRACKING_DATABASES, check_can_write

    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        from tlsweep.tracking import check_server

        check_server(uri)
    elif scheme.startswith("sqlite"):
        check_can_write(uri.partition(":///")[2].partition("?")[0] or uri, "tracking_uri")
    elif scheme.partition("+")[0] in TRACKING_DATABASES:
        from tlsweep.study import check_database

        check_database(uri, "tracking_uri")
    elif scheme == "file" or (not scheme and not uri.startswith(("file:", "databricks", "uc"))):
        check_can_write(urlsplit(uri).path if scheme else uri, "tracking_uri", "dir")


def init_sweep(
    data_dir: Path, out: Path, *, force: bool = False, measure: int = 32
) -> tuple[Any, Any, Any, str]:
    """``tlsweep init``: survey ``data_dir``, plan a first sweep, time it here on ``measure``
    images (0: not at all), write it to ``out``; returns (survey, plan, timing, text)."""
    import re

    from tlsweep.backbones import cached_backbones
    from tlsweep.config import (
        BackboneConfig,
        Timing,
        check_output,
        plan,
        render,
        trial_budget,
        write_new,
    )
    from tlsweep.features import extraction_timing
    from tlsweep.head import trial_seconds
    from tlsweep.images import survey

    check_output(out, force=force)  # before any work: nothing to lose
    s = survey(data_dir)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_dir.resolve().name).strip("_.") or "photos"
    p = plan(s, cached_backbones(), study=name)
    timing = None
    if measure:
        sample = s.image_paths[:: max(1, len(s.image_paths) // measure)][:measure]
        per_image, width = 0.0, 0
        for b in p.backbones:
            # the cached file itself (Keras may have read another KERAS_HOME when imported);
            # without one, random weights: they cost the same
            weights = str(b["file"]) if b["file"] else "none"
            bb = BackboneConfig(b["name"], weights, b["input_size"], "avg", b["args"])
            seconds, w = extraction_timing(sample, bb)
            per_image, width = per_image + seconds, max(width, w)
        n = s.split_counts
        trial = trial_seconds(n["train"], n["validation"], width, len(s.class_names), p.epochs)
        trial *= p.cv_folds or 1
        p.n_trials = trial_budget(trial)
        timing = Timing(len(sample), per_image * len(s.image_paths), trial, trial * p.n_trials)
    text = render(s, p, timing, out)
    write_new(out, text, force=force)
    return s, p, timing, text


def refresh_trials_table(tracker: Any, study: Any, backbone: str | None = None) -> None:
    """Every trial of ``study`` as one table on its parent run (``backbone``: the label of its
    only backbone, when the trials do not draw one): the study's rows, MLflow's table."""
    from tlsweep.study import trials_table
    from tlsweep.tracking import log_trials_table

    try:  # a side table: a storage or MLflow hiccup here must not hide the command's outcome
        log_trials_table(tracker, trials_table(study, backbone))
    except Exception as e:  # noqa: BLE001 - storage, pandas and MLflow errors alike
        why = str(e).strip().partition("\n")[0] or type(e).__name__
        log.warning("could not refresh the table of trials on the study's run: %s", why)


# --- tlsweep audit: the features extracted as run does, the winner's head to score labels ---
def audit_sweep(
    cfg: SweepConfig,
    backbone: str | None = None,
    progress: Callable[[Any], Any] | None = None,
) -> Any:
    """``tlsweep audit``: extract what is missing (as ``run``), then audit the data on one
    backbone's cached features (the first, or ``backbone`` by label or name): an
    :class:`AuditReport`. Labels are scored with the study's winner's head
    parameters when the study has a winner on that backbone, a default head otherwise."""
    from tlsweep.audit import audit_entry, default_params
    from tlsweep.errors import ConfigError
    from tlsweep.features import FeatureCache, extract_all
    from tlsweep.images import file_digests, find_images

    labels = [bb.label for bb in cfg.backbones]
    chosen = labels[0]
    if backbone is not None:
        named = [bb.label for bb in cfg.backbones if backbone in (bb.label, bb.name)]
        if not named:
            raise ConfigError(
                f"--backbone: got '{backbone}'; the sweep file's backbones are "
                f"{', '.join(labels)}; pass one of them"
            )
        chosen = named[0]
    preflight(cfg, storage=False, tracking=False, cache=True)
    entries = extract_all(cfg, progress)
    entry = next(e for bb, e, _ in entries if bb.label == chosen)
    images = find_images(cfg.data)
    # the stat index extract_all has just brought up to date: nothing is hashed again
    digests = file_digests(images, index=FeatureCache(cfg.cache_dir).stat_index(images.root))
    params = _winner_params(cfg, chosen) or default_params(cfg.search.seed)
    report = audit_entry(images, digests, entry, params)
    _log_audit(cfg, report)
    return report


def _log_audit(cfg: SweepConfig, report: Any) -> None:
    """The audit on the study's parent run when the study has one in the tracking store (an
    audit before any run creates nothing there): the copies and the likely label errors, each
    as an MLflow table and a grid of images."""
    from tlsweep.audit import log_audit_on_parent
    from tlsweep.tracking import Tracker, find_study_experiment, resolve_uri, tracking_errors

    try:
        _, parent, _ = find_study_experiment(resolve_uri(cfg.tracking_uri), cfg.study)
        if parent is None:
            return
        log_audit_on_parent(Tracker(cfg.tracking_uri, cfg.study, parent_run_id=parent), report)
        log.info("the audit is on the study's run %s (audit/)", parent)
    except (*tracking_errors(), OSError, ValueError) as e:  # the report stands without it
        log.warning("could not put the audit on the study's run: %s", e)


def _winner_params(cfg: SweepConfig, label: str) -> Any:
    """The HeadParams of the study's best trial if it exists and is on backbone ``label``."""
    from tlsweep.head import HeadParams
    from tlsweep.study import existing_study, open_storage, storage_errors, suggest

    try:
        study = existing_study(cfg, open_storage(cfg, must_exist=True))
        best = study.best_trial if study is not None else None
    except (TlsweepError, ValueError, *storage_errors()) as e:
        log.info("no study's winner to score the labels with (%s): default head", e)
        return None  # no storage, no study, no finished trial yet, or a server that is down
    if best is None:
        return None
    import optuna

    try:
        full = suggest(optuna.trial.FixedTrial(dict(best.params)), cfg)
    except (ValueError, KeyError) as e:  # the search space changed since
        log.info("the study's winner does not fit the sweep file (%s): default head", e)
        return None
    if full.get("backbone", label) != label:
        return None
    log.info("scoring labels with the head of the study's best trial %d", best.number)
    return HeadParams.from_dict({**full, "seed": cfg.search.seed})
