"""One sweep end to end: features (cached) -> study (Optuna) -> runs (MLflow) -> summary.

This is the only module that wires the steps together; each step lives in its own module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tlsweep.config import SweepConfig
from tlsweep.errors import StudyError
from tlsweep.search import StudySummary, summarize

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
        "storage": cfg.storage.split("@")[-1],
        **{f"space.{n}": p.to_json() for n, p in s.space.items()},
    }


def attach_parent(cfg: SweepConfig, study: Any, tracker: Any) -> str:
    """Find the study's parent MLflow run (resume) or create it, and remember it in the study."""
    from tlsweep.search import PARENT_ATTR

    rid = tracker.attach_parent(
        study.user_attrs.get(PARENT_ATTR), _parent_params(cfg), cfg.text, cfg.path.name
    )
    study.set_user_attr(PARENT_ATTR, rid)
    return rid


def run_sweep(
    cfg: SweepConfig,
    *,
    on_trial: Callable[[Any], None] | None = None,
    progress: Callable[[Any], Any] | None = None,
    workers: int = 1,
    worker_index: int | None = None,
    worker_argv: Sequence[str] | None = None,
    evaluate_winner: bool = True,
    finetune_progress: Callable[[int, int, int, int], None] | None = None,
) -> StudySummary:
    """Extract (or reuse) features, run the study to ``n_trials`` finished trials, summarize.

    With ``workers > 1`` this process prepares everything (features, study, parent run) and
    starts ``workers`` worker processes (``worker_argv``) on the same study, then waits.
    """
    from tlsweep.features import extract_all
    from tlsweep.search import load_features, open_study
    from tlsweep.tracking import Tracker
    from tlsweep.workers import StudyRunner, open_storage

    entries = extract_all(cfg, progress)
    tracker = Tracker(cfg.tracking_uri, cfg.study)
    if workers > 1:
        study = open_study(cfg, open_storage(cfg))
        attach_parent(cfg, study, tracker)
        _run_workers(workers, worker_argv or [])
        summary = summarize(cfg, study)
        _finish(
            cfg,
            study,
            tracker,
            summary,
            evaluate_winner,
            extracted=entries,
            finetune_progress=finetune_progress,
        )
        return summary
    features = load_features([(bb, e) for bb, e, _ in entries])
    runner = StudyRunner(cfg, features, tracker, on_trial, worker_index or 0)
    attach_parent(cfg, runner.study, tracker)
    done = False
    try:
        runner.run()
        done = runner.finished() >= cfg.search.n_trials
    finally:
        summary = summarize(cfg, runner.study)
        if worker_index is None:
            try:
                _finish(
                    cfg,
                    runner.study,
                    tracker,
                    summary,
                    evaluate_winner and done,
                    done,
                    extracted=entries,
                    finetune_progress=finetune_progress,
                )
            except Exception as e:  # noqa: BLE001 - the trials are safe; report and go on
                log.warning("could not evaluate the winner: %s", e)
                with contextlib.suppress(Exception):
                    tracker.close_parent(done)
    return summary


def _finish(
    cfg: SweepConfig,
    study: Any,
    tracker: Any,
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
                ft = finetune_winner(cfg, w, tracker, finetune_progress)
            except BaseException:  # Ctrl-C or a failure: the checkpoints stay, a rerun resumes
                with contextlib.suppress(Exception):
                    tracker.close_parent(False)
                raise
            summary.finetune = ft
            if ft.accepted and ft.test is not None:
                summary.test = ft.test
    tracker.close_parent(done)


def finetune_winner(cfg: SweepConfig, w: Any, tracker: Any, progress: Any = None) -> Any:
    """Run (or resume, or read back) the fine-tuning stage and put its outcome on the parent."""
    from tlsweep.finetune import run_finetune

    ft = run_finetune(cfg, w, tracker, progress)
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


def export_winner(
    cfg: SweepConfig, study: Any, output: Any, tracker: Any, progress: Any = None
) -> tuple[Any, Any]:
    """Export the winner: the fine-tuned model if it beat the frozen one on validation.

    Returns (the frozen winner, the fine-tuning result or None).
    """
    import keras

    from tlsweep import winner

    if cfg.finetune is None:
        return winner.export(cfg, study, output, tracker), None
    winner._check_output(output)
    w = winner.evaluate_and_log(cfg, study, tracker)
    ft = finetune_winner(cfg, w, tracker, progress)
    info = {"model": "finetuned" if ft.accepted else "frozen", "finetune": ft.as_dict()}
    if ft.accepted:
        model = keras.models.load_model(ft.model_path, safe_mode=True, compile=False)
        info["test"] = ft.test
        info[f"validation_{cfg.search.metric}"] = ft.best
    else:
        model = winner.build_export_model(w)
    winner.save_model(cfg, w, model, output, tracker, info)
    return w, ft


def _run_workers(n: int, argv: Sequence[str]) -> None:
    procs = []
    try:
        for i in range(n):
            cmd = [sys.executable, "-m", "tlsweep", *argv, "--worker-index", str(i)]
            procs.append(subprocess.Popen(cmd, env=os.environ.copy()))
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too (one process group); a SIGTERM only reached us:
        # pass it on, so each worker closes its trial and runs and stops.
        for p in procs:
            with contextlib.suppress(Exception):
                if p.poll() is None:
                    p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=60)
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        raise StudyError(f"{len(bad)} of {n} workers exited with an error (codes {bad}); see above")
