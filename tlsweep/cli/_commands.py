"""The ``tlsweep`` commands of the study: ``extract``, ``backbones``, ``cache``, ``run``,
``status`` and ``ui``.

Each turns its parsed flags into a :class:`~tlsweep.config.SweepConfig` (:func:`load`) and calls
the library; what it shows comes from :mod:`tlsweep.cli._display`. Ctrl-C, SIGTERM and SIGHUP
are noted here (:data:`exit_code`) and answered by :func:`tlsweep.cli.main`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tlsweep.config import redact_url
from tlsweep.errors import TlsweepError

from ._display import (
    bar_factory,
    finetune_bar,
    print_summary,
    print_ui_pages,
    short_params,
    views_cost,
)

log = logging.getLogger("tlsweep")
exit_code = {"interrupted": 130}  # Ctrl-C; the SIGTERM / SIGHUP handler sets 143 / 129


def load(args: argparse.Namespace, **extra: Any) -> Any:
    """The command's sweep file with its flags applied (a :class:`~tlsweep.config.SweepConfig`)."""
    from tlsweep.config import load_sweep

    return load_sweep(
        args.sweep,
        data_dir=getattr(args, "data", None),
        cache_dir=getattr(args, "cache_dir", None),
        study=getattr(args, "study", None),
        storage=getattr(args, "storage", None),
        tracking_uri=getattr(args, "tracking_uri", None),
        n_trials=getattr(args, "n_trials", None),
        verify=getattr(args, "verify", None),
        **extra,
    )


def _stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop the command at a point where the
    running trial and its runs are closed and a half-written cache entry is removed, its
    finished shards kept for the next extraction (:mod:`tlsweep.interrupts`)."""
    import signal

    from tlsweep.interrupts import clear, interrupt

    clear()

    def _terminate(signum: int, frame: Any) -> None:
        # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, as a shell says it
        exit_code["interrupted"] = 128 + signum
        interrupt()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)


def cmd_extract(args: argparse.Namespace) -> int:
    from tlsweep.features import extract_all
    from tlsweep.sweep import preflight

    _stop_on_signals()
    cfg = load(args)
    preflight(cfg, storage=False, tracking=False, cache=True)
    for bb, entry, cached in extract_all(cfg, bar_factory(args.quiet)):
        sizes = entry.split_sizes()
        state = "cache hit, no forward pass" if cached else "extracted"
        print(
            f"{bb.label}: {state}: {len(entry.manifest['files'])} images "
            f"(train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}), "
            f"{entry.manifest['shape'][1]} features{views_cost(entry)} -> {entry.path}"
        )
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from tlsweep.backbones import list_backbones

    print(f"{'backbone':<20} {'size':>5} {'min':>4} {'avg/max':>8} {'flatten':>8}  preprocess")
    for s in list_backbones():
        flat = s.feature_shape(s.default_size, "flatten")[0]
        print(
            f"{s.name:<20} {s.default_size:>5} {s.min_size:>4} {s.channels:>8} {flat:>8}  "
            f"{s.module}.preprocess_input"
        )
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from tlsweep.config import DEFAULT_CACHE_DIR, check_can_write
    from tlsweep.features import FINETUNE_DIR, IMAGES_DIR, FeatureCache
    from tlsweep.winner import clear_side, folder_bytes, side_folders

    cache_dir = args.cache_dir
    if cache_dir is None and args.sweep:
        cache_dir = str(load(args, check_data_dir=False).cache_dir)
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise TlsweepError(f"--cache-dir: got '{cache_dir}'; it is a file; expected a folder")
    if args.action == "clear" and os.path.isdir(cache_dir):
        check_can_write(cache_dir, "--cache-dir", "dir")
    cache = FeatureCache(cache_dir)
    side = [k for k, on in ((FINETUNE_DIR, args.finetune), (IMAGES_DIR, args.images)) if on]
    if args.action == "list":
        entries = cache.entries()
        if not entries:
            print(f"no cache entries in {cache.dir}")
        for e in entries:
            m = e.manifest
            size_mb = (e.path / "features.npy").stat().st_size / 1e6
            print(
                f"{m['name']}  {len(m['files'])} images x {m['shape'][1]} features"
                + (f" x {m['views']['count']} views" if m.get("views") else "")
                + "  "
                f"{size_mb:.1f} MB  {len(m['skipped'])} skipped  {m['data_dir']}  {m['created']}"
            )
        titles = {FINETUNE_DIR: "fine-tuning stages", IMAGES_DIR: "decoded-image caches"}
        for kind, items in side_folders(cache.dir).items():
            if items:
                total = sum(folder_bytes(p) for p, _ in items) / 1e6
                print(f"{titles[kind]} ({kind}/, cleared with --{kind}): {total:.1f} MB")
            for p, used in items:
                mb = folder_bytes(p) / 1e6
                print(f"  {p.name}  {mb:.1f} MB" + ("  (in use)" if used else ""))
        return 0
    if args.all or not side:
        removed = cache.clear(args.match)
        n = len(removed)
        print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {cache.dir}")
    if side or args.all:
        gone = clear_side(cache.dir, [FINETUNE_DIR, IMAGES_DIR] if args.all else side, args.match)
        stages = sum(g.startswith(FINETUNE_DIR) for g in gone)
        print(f"removed {stages} fine-tuning stage(s), {len(gone) - stages} decoded-image cache(s)")
    return 0


# `run --workers N`: the --storage / --tracking-uri given to the parent, passed to its workers
_URL_ENV = {"storage": "TLSWEEP_WORKER_STORAGE", "tracking_uri": "TLSWEEP_WORKER_TRACKING_URI"}


def cmd_run(args: argparse.Namespace) -> int:
    from tlsweep.sweep import run_sweep

    _stop_on_signals()
    if args.worker_index is not None:
        from tlsweep.study import die_with_parent

        die_with_parent()  # a worker of `--workers N` never outlives its parent, however it died
    if args.worker_index is not None:  # the URLs its parent was given (see below)
        for flag, env in _URL_ENV.items():
            setattr(args, flag, os.environ.pop(env, None) or getattr(args, flag))
    cfg = load(args)
    n = cfg.search.n_trials
    if args.worker_index is not None:
        # A worker of `--workers N`: its parent has reported the cache and the skipped files.
        for name in (
            "tlsweep.features._cache",
            "tlsweep.features._extract",  # its assembly's "cache hit" lines
            "tlsweep.features._entries",
            "tlsweep.features._shards",
        ):
            logging.getLogger(name).setLevel(logging.ERROR)
    if args.extract_first:  # `--workers N`: the missing features first
        from tlsweep.study import wait_for_go

        if not wait_for_go(cfg):
            return 0  # the parent stopped before the trials

    def on_trial(o: Any) -> None:
        value = f"{cfg.search.metric}={o.value:.4f}" if o.value is not None else "no value"
        best = f"best={o.best_value:.4f} (#{o.best_number})" if o.best_value is not None else ""
        err = f"  {redact_url(o.error)[:120]}" if o.error else ""  # redacted, then cut
        print(
            f"[{o.finished:>{len(str(n))}}/{n}] trial {o.number:<4} {o.state:<8} {value}  {best}  "
            f"{o.seconds:5.1f}s  {short_params(o.params, cfg)}{err}",
            flush=True,
        )

    argv = ["run", args.sweep, "--workers", "1", "-q"]
    for flag in ("data", "cache_dir", "study", "n_trials"):
        v = getattr(args, flag)
        if v is not None:
            argv.append(f"--{flag.replace('_', '-')}={v}")  # a value may start with -
    # URLs may hold a password: to the workers through their environment, which only this
    # user can read, not their command line, which `ps` shows everyone
    worker_env = {e: getattr(args, f) for f, e in _URL_ENV.items() if getattr(args, f)}
    summary = run_sweep(
        cfg,
        on_trial=on_trial,
        progress=bar_factory(args.quiet),
        workers=args.workers,
        worker_index=args.worker_index,
        worker_argv=argv,
        worker_env=worker_env,
        finetune_progress=finetune_bar(args.quiet),
    )
    if args.worker_index is None:
        print()
        print_summary(summary, cfg)
    return 0 if summary.finished >= n or cfg.search.timeout else 1


def cmd_status(args: argparse.Namespace) -> int:
    from tlsweep.study import open_storage, open_study, summarize
    from tlsweep.sweep import preflight, recorded_finetune

    cfg = load(args, check_data_dir=False)
    if not cfg.storage.startswith(("sqlite:///", "journal:")):
        preflight(cfg, tracking=False)  # a database server: reachable, login accepted
    study = open_study(cfg, open_storage(cfg, must_exist=True), create=False)
    summary = summarize(cfg, study)
    summary.finetune = recorded_finetune(cfg, study, summary)
    print_summary(summary, cfg)
    if cfg.data.dir.is_dir():  # status also works where the images are not
        from tlsweep.sweep import check_study_data

        try:
            check_study_data(cfg, study)
        except TlsweepError as e:
            log.warning("%s", e)
    return 0


class _Stop(Exception):
    """A signal asked ``tlsweep ui`` to stop its server."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def cmd_ui(args: argparse.Namespace) -> int:
    import signal

    from tlsweep import tracking
    from tlsweep import tracking as ui

    if not 1 <= args.port <= 65535:
        raise TlsweepError(f"--port: got {args.port}; expected a port number from 1 to 65535")
    if not args.start_timeout > 0:
        raise TlsweepError(f"--start-timeout: got {args.start_timeout}; expected seconds > 0")
    cfg = load(args, check_data_dir=False)
    uri = tracking.resolve_uri(cfg.tracking_uri)
    try:
        experiment_id, parent, studies = tracking.find_study_experiment(uri, cfg.study)
    except tracking.TrackingStoreUnavailable as e:
        print(f"tlsweep: error: {e}", file=sys.stderr)
        return 1
    if experiment_id is None:
        which = f"--study {cfg.study}" if args.study else f"{args.sweep}: study: {cfg.study}"
        there = (
            f"studies there: {', '.join(studies)}; pick one with --study NAME"
            if studies
            else "run 'tlsweep run' first (in this folder, if the store is a relative path)"
        )
        raise TlsweepError(
            f"{which}: no such study in the tracking store {redact_url(uri)}; {there}"
        )
    order = (cfg.search.metric, cfg.search.direction)
    if uri.startswith(("http://", "https://")):
        print(f"study {cfg.study} on the tracking server {redact_url(uri)}; open:")
        print_ui_pages(redact_url(uri), experiment_id, parent, order)
        return 0
    server = ui.UiServer(uri, args.host, args.port)
    defer = [True]  # while the server starts or stops, a signal is noted, not raised
    pending: list[int] = []

    def _on_signal(signum: int, frame: Any) -> None:
        pending.append(signum)
        if not defer[0]:
            raise _Stop(signum)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _on_signal) for s in stops}
    try:
        try:
            ui.check_port_free(args.host, args.port)
            server.start()
            defer[0] = False
            if pending:
                raise _Stop(pending[0])
            server.wait_ready(args.start_timeout)
        except ui.ServerError as e:
            print(f"tlsweep: error: {e}", file=sys.stderr)
            return 1
        print(f"MLflow UI: study {cfg.study}, its runs on {redact_url(uri)} (Ctrl-C to stop):")
        print_ui_pages(server.url, experiment_id, parent, order)
        rc = server.wait()
        print(f"tlsweep: error: the MLflow server exited with code {rc}", file=sys.stderr)
        return 1
    except (_Stop, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, _Stop) else signal.SIGINT
        print(f"tlsweep: stopping the MLflow UI ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        defer[0] = True  # a second Ctrl-C must not cut the clean-up short
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
