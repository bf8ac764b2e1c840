"""The ``tlsweep`` commands of the winner: ``best``, ``export`` and ``predict``.

``best`` and ``export`` open the finished study and its MLflow parent run, rebuild the winner
(:mod:`tlsweep.winner`) and print its test score; ``predict`` checks every input before
TensorFlow is imported, then classifies images with an exported model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tlsweep.errors import ServiceError, TlsweepError
from tlsweep.files import atomic_write

from ._commands import _stop_on_signals, load
from ._display import finetune_bar, print_finetune, print_test

log = logging.getLogger("tlsweep")


def _study_and_tracker(args: argparse.Namespace, cfg: Any = None) -> tuple[Any, Any, Any]:
    from tlsweep.study import open_storage, open_study
    from tlsweep.sweep import attach_parent, preflight
    from tlsweep.tracking import Tracker

    cfg = cfg or load(args)
    if cfg.storage.startswith(("sqlite:///", "journal:")):
        preflight(cfg, storage=False)
    else:
        preflight(cfg)
    study = open_study(cfg, open_storage(cfg, must_exist=True), create=False)
    tracker = Tracker(cfg.tracking_uri, cfg.study)
    attach_parent(cfg, study, tracker, reopen=False)  # a `run` may still work in it
    return cfg, study, tracker


def cmd_best(args: argparse.Namespace) -> int:
    from tlsweep.audit import scored_entries
    from tlsweep.sweep import finetune_winner
    from tlsweep.winner import evaluate_and_log

    _stop_on_signals()  # Ctrl-C, SIGTERM, SIGHUP: the parent run is left as it was found
    cfg, study, tracker = _study_and_tracker(args)
    try:
        w = evaluate_and_log(cfg, study, tracker, scored_entries(cfg, study))
        print_test(w, cfg)
        if cfg.finetune is not None:
            print_finetune(
                finetune_winner(cfg, w, tracker, finetune_bar(getattr(args, "quiet", False)), study)
            )
    finally:
        from tlsweep.sweep import refresh_trials_table

        try:
            refresh_trials_table(tracker, study, cfg.backbones[0].label)
        finally:
            tracker.release_parent()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tlsweep.config import check_can_write
    from tlsweep.sweep import export_winner

    _stop_on_signals()  # and no temporary model file is left behind
    if not args.output.endswith(".keras"):
        raise TlsweepError(f"--output: got '{args.output}'; the file name must end in .keras")
    if args.register is not None:
        from tlsweep.config import model_name

        args.register = model_name("", "--register", args.register)
    cfg = load(args)
    check_can_write(args.output, "--output")  # before minutes of retraining, not after
    cfg, study, tracker = _study_and_tracker(args, cfg)
    try:
        w, ft, reg = export_winner(
            cfg,
            study,
            args.output,
            tracker,
            finetune_bar(getattr(args, "quiet", False)),
            args.register,
        )
    finally:
        tracker.release_parent()
    print_test(w, cfg)
    print_finetune(ft)
    print(
        f"exported {args.output} (raw RGB images of any size -> probabilities of "
        f"{', '.join(w.entry.class_names)})"
    )
    if reg is not None:
        if reg.promoted:
            was = f" (was {reg.previous:.4f})" if reg.previous is not None else ""
            state = f"now models:/{reg.name}@champion{was}"
        else:
            state = f"models:/{reg.name}@champion stays ({reg.previous:.4f} or better)"
            if reg.previous is None:
                state = f"models:/{reg.name}@champion was scored on another metric: it stays"
        print(
            f"registered {reg.name} version {reg.version} "
            f"(validation {cfg.search.metric} {w.value:.4f}): {state}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import zipfile

    from tlsweep.config import check_can_write

    _stop_on_signals()  # no half-written --csv file either
    # every check before TensorFlow is imported and before a single image is read
    if not os.path.isfile(args.model):
        what = "a folder" if os.path.isdir(args.model) else "no such file"
        raise TlsweepError(
            f"MODEL: got '{args.model}': {what}; expected a .keras file from 'tlsweep export'"
        )
    if not os.access(args.model, os.R_OK):
        raise ServiceError(f"MODEL: {args.model}: permission denied (cannot read it)")
    if not zipfile.is_zipfile(args.model):
        raise TlsweepError(
            f"MODEL: got '{args.model}': not a whole .keras model file (not a zip archive: "
            "cut short, or not a model); expected a file from 'tlsweep export' (export it again)"
        )
    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        raise TlsweepError(
            f"PATH: got '{missing[0]}': no such file or folder"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; expected image files or folders"
        )
    if args.csv:
        check_can_write(args.csv, "--csv")

    from tlsweep.winner import find_files, predict

    if not find_files(args.paths)[0]:
        from tlsweep.images import IMAGE_EXTENSIONS

        raise TlsweepError(
            f"PATH: got {' '.join(args.paths)[:200]!r}: no image file in it; expected files or "
            f"folders of images ({', '.join(IMAGE_EXTENSIONS)})"
        )

    rows, bad, names = predict(args.model, args.paths, args.batch_size)
    if args.csv:
        out = os.path.abspath(args.csv)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with atomic_write(Path(out), "w", newline="", encoding="utf-8") as f:  # whole or not
            w = csv.writer(f)
            w.writerow(["file", "class", "probability"])
            for r in rows:
                w.writerow([r["file"], r["class"], f"{r['probability']:.6f}"])
    elif rows:
        width = max([len(r["file"]) for r in rows] + [4])
        print(f"{'file':<{width}}  {'class':<16} probability")
        for r in rows:
            print(f"{r['file']:<{width}}  {r['class']:<16} {r['probability']:.4f}")
    for f, reason in bad:
        log.warning("skipped %s: %s", f, reason)
    print(f"{len(rows)} image(s) predicted, {len(bad)} skipped", file=sys.stderr)
    return 0 if rows or not bad else 1
