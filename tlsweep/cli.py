"""The ``tlsweep`` command line: parses flags, shows progress, maps errors to exit codes.

It holds no logic and no defaults of its own: it turns flags into a
:class:`~tlsweep.config.SweepConfig` via :func:`~tlsweep.config.load_sweep` and calls the
library. A :class:`~tlsweep.errors.TlsweepError` becomes one line on stderr and its exit code (2);
Ctrl-C exits with 130 after the library has closed its trial and runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tlsweep.config import MAX_WORKERS, redact_url
from tlsweep.errors import ServiceError, TlsweepError

log = logging.getLogger("tlsweep")
_exit_code = {"interrupted": 130}  # Ctrl-C; the SIGTERM / SIGHUP handler sets 143 / 129


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import warnings

    warnings.filterwarnings("ignore", message=".*is experimental.*")
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("tlsweep").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("absl", "tensorflow", "optuna", "mlflow", "alembic", "urllib3", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _load(args: argparse.Namespace, **extra: Any) -> Any:
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


def _bar_factory(disable: bool = False) -> Any:
    from tqdm import tqdm

    def factory(bb: Any) -> Any:
        bar: dict[str, Any] = {}

        def progress(done: int, total: int) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(
                    total=total,
                    desc=f"extract {bb.name} {bb.input_size}px {bb.pooling}"
                    + (f" x{bb.augment.views} views" if bb.augment else ""),
                    unit="img",
                    disable=disable,
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            b = bar["bar"]
            b.update(done - b.n)
            if done >= total:
                b.close()

        return progress

    return factory


def _finetune_bar(disable: bool = False) -> Any:
    """A progress bar per fine-tuning epoch: images/s and the epoch's ETA."""
    from tqdm import tqdm

    bars: dict[int, Any] = {}

    def progress(epoch: int, epochs: int, done: int, total: int) -> None:
        if epoch not in bars:
            bars[epoch] = tqdm(
                total=total,
                desc=f"fine-tune epoch {epoch}/{epochs}",
                unit="img",
                disable=disable,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        b = bars[epoch]
        b.update(done - b.n)
        if done >= total:
            b.close()

    return progress


def _print_finetune(ft: Any) -> None:
    if ft is None:
        return
    kept = (
        "kept: it replaces the frozen winner"
        if ft.accepted
        else "not kept: the frozen winner stays"
    )
    test = f", test accuracy {ft.test['accuracy']:.4f}" if ft.test else ""
    print(
        f"\nfine-tuning: {ft.epochs_run} epoch(s), best validation {ft.metric} {ft.best:.4f} "
        f"(epoch {ft.best_epoch}) vs frozen {ft.baseline:.4f} on the same images{test}, "
        f"{ft.seconds:.0f}s; {kept}"
    )


# --- commands ----------------------------------------------------------------------------------
def _stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop the command at a point where the
    running trial and its runs are closed and a half-written cache entry is removed
    (:mod:`tlsweep.interrupts`)."""
    import signal

    from tlsweep.interrupts import clear, interrupt

    clear()

    def _terminate(signum: int, frame: Any) -> None:
        # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, as a shell says it
        _exit_code["interrupted"] = 128 + signum
        interrupt()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)


def cmd_extract(args: argparse.Namespace) -> int:
    from tlsweep.features import extract_all
    from tlsweep.sweep import preflight

    _stop_on_signals()
    cfg = _load(args)
    preflight(cfg, storage=False, tracking=False, cache=True)
    for bb, entry, cached in extract_all(cfg, _bar_factory(args.quiet)):
        sizes = entry.split_sizes()
        state = "cache hit, no forward pass" if cached else "extracted"
        print(
            f"{bb.label}: {state}: {len(entry.manifest['files'])} images "
            f"(train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}), "
            f"{entry.manifest['shape'][1]} features{_views_cost(entry)} -> {entry.path}"
        )
    return 0


def _views_cost(entry: Any) -> str:
    """``, 4 views of train: 5600 forward passes (2.80x)``: what augmented views cost."""
    views = entry.manifest.get("views")
    if not views:
        return ""
    passes = views["base"] + (views["count"] - 1) * views["rows"]
    return (
        f", {views['count']} views of {'/'.join(views['splits'])}: {passes} forward passes "
        f"({passes / max(views['base'], 1):.2f}x one view)"
    )


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
    from tlsweep.features import FeatureCache

    cache_dir = args.cache_dir
    if cache_dir is None and args.sweep:
        cache_dir = str(_load(args, check_data_dir=False).cache_dir)
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise TlsweepError(f"--cache-dir: got '{cache_dir}'; it is a file; expected a folder")
    if args.action == "clear" and os.path.isdir(cache_dir):
        check_can_write(cache_dir, "--cache-dir", "dir")
    cache = FeatureCache(cache_dir)
    if args.action == "list":
        entries = cache.entries()
        if not entries:
            print(f"no cache entries in {cache.dir}")
            return 0
        for e in entries:
            m = e.manifest
            size_mb = (e.path / "features.npy").stat().st_size / 1e6
            print(
                f"{m['name']}  {len(m['files'])} images x {m['shape'][1]} features"
                + (f" x {m['views']['count']} views" if m.get("views") else "")
                + "  "
                f"{size_mb:.1f} MB  {len(m['skipped'])} skipped  {m['data_dir']}  {m['created']}"
            )
        return 0
    removed = cache.clear(args.match)
    print(
        f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {cache.dir}"
    )
    return 0


# --- parser ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one error line, ``tlsweep: error: ...``, like every other tlsweep error."""

    def error(self, message: str) -> Any:  # argparse's NoReturn
        cmd = self.prog.partition(" ")[2]
        hint = f"see tlsweep {cmd} --help" if cmd else "see tlsweep --help"
        self.exit(2, f"tlsweep: error: {cmd + ': ' if cmd else ''}{message}; {hint}\n")


def _int_at_least(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            rng = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer {rng}")
        return value

    return parse


def _text(what: str) -> Any:
    """A string flag that may not be empty (an empty --data would mean the working directory)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"got an empty string; expected {what}")
        return text

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="the sweep file (YAML)")
    p.add_argument(
        "--data", metavar="DIR", type=_text("a folder"), help="image folder (overrides data.dir)"
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=_text("a folder"),
        help="feature cache folder (overrides cache_dir)",
    )


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        action="store_true",
        default=None,
        help="re-read every image for the cache key instead of trusting the stat index "
        "(overrides data.verify)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tlsweep",
        description="Transfer-learning sweeps: cache backbone features once, search the head "
        "with Optuna, track every trial in MLflow.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("extract", help="extract and cache every backbone's features")
    _add_common(e)
    _add_verify(e)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_extract)

    b = sub.add_parser("backbones", help="list the available keras.applications backbones")
    b.set_defaults(func=cmd_backbones)

    c = sub.add_parser("cache", help="list or clear feature cache entries")
    c.add_argument("action", choices=("list", "clear"))
    c.add_argument("sweep", nargs="?", help="take cache_dir from this sweep file")
    c.add_argument("--cache-dir", metavar="DIR", type=_text("a folder"), help="the cache folder")
    c.add_argument(
        "--match",
        type=_text("part of an entry name"),
        help="clear only entries whose name contains this",
    )
    c.set_defaults(func=cmd_cache)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


def _fmt(v: Any) -> str:
    if v is None:  # e.g. the best of a backbone with no finished trial yet
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short_params(params: dict[str, Any], cfg: Any) -> str:
    fixed = {n for n, p in cfg.search.space.items() if p.kind == "fixed"}
    items = [(k, v) for k, v in params.items() if k not in fixed]
    if len(cfg.backbones) == 1:
        items = [(k, v) for k, v in items if k != "backbone"]
    return " ".join(f"{k}={_fmt(v)}" for k, v in items)


def _with_ci(test: dict[str, Any]) -> str:
    """``accuracy 0.9420 (95% CI 0.927-0.956)``, and the same for the objective's metric."""
    ci = test.get("ci", {})
    parts = []
    for name in ci or ["accuracy"]:
        part = f"{name.replace('_', ' ')} {test[name]:.4f}"
        if name in ci:
            lo, hi = ci[name]
            part += f" (95% CI {lo:.3f}-{hi:.3f})"
        parts.append(part)
    return ", ".join(parts)


def _print_summary(summary: Any, cfg: Any) -> None:
    c = summary.counts
    print(
        f"study {summary.study}: {summary.finished}/{summary.n_trials} finished "
        f"({c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned), "
        f"{c.get('FAIL', 0)} failed, {c.get('RUNNING', 0)} running, {c.get('WAITING', 0)} queued"
    )
    if len(summary.per_backbone) > 1 or summary.per_backbone:
        w = max(48, *(len(b["backbone"]) for b in summary.per_backbone))  # fused labels are long
        print(f"\n{'backbone':<{w}} {'trials':>6} {'best':>8} {'median':>8} {'s/trial':>8}")
        for b in summary.per_backbone:
            print(
                f"{b['backbone']:<{w}} {b['trials']:>6} {_fmt(b['best']):>8} "
                f"{_fmt(b['median']):>8} {_fmt(b['seconds_per_trial']):>8}"
            )
    _print_finetune(summary.finetune)
    if summary.test is not None:
        t = summary.test
        b = summary.best[0]
        tuned = " fine-tuned" if summary.finetune is not None and summary.finetune.accepted else ""
        print(
            f"\nwinner (trial {b['number']}{tuned}): validation {summary.metric} {b['value']:.4f} "
            f"(the best of {summary.finished} trials, so optimistic); on the held-out test "
            f"split: {_with_ci(t)}, loss {t['loss']:.4f} ({t['n']} images)"
        )
        if "tta_accuracy" in t:
            print(
                "  (the test score is the plain image's, which the exported model computes; with "
                f"test-time augmentation over {t['tta_views']} cached views: test accuracy "
                f"{t['tta_accuracy']:.4f})"
            )
    elif summary.test_note:
        print(f"\nwinner: {summary.test_note}; no test score reported")
    if summary.best:
        print(f"\nbest trials ({summary.metric}, {summary.direction}):")
        print(f"{'trial':>5} {summary.metric:>12} {'seconds':>8}  parameters")
        for b in summary.best:
            print(
                f"{b['number']:>5} {b['value']:>12.4f} {_fmt(b['seconds']):>8}  "
                f"{_short_params(b['params'], cfg)}"
            )


# `run --workers N`: the --storage / --tracking-uri given to the parent, passed to its workers
_URL_ENV = {"storage": "TLSWEEP_WORKER_STORAGE", "tracking_uri": "TLSWEEP_WORKER_TRACKING_URI"}


def cmd_run(args: argparse.Namespace) -> int:
    from tlsweep.sweep import run_sweep

    _stop_on_signals()
    if args.worker_index is not None:
        from tlsweep.workers import die_with_parent

        die_with_parent()  # a worker of `--workers N` never outlives its parent, however it died
    if args.worker_index is not None:  # the URLs its parent was given (see below)
        for flag, env in _URL_ENV.items():
            setattr(args, flag, os.environ.pop(env, None) or getattr(args, flag))
    cfg = _load(args)
    n = cfg.search.n_trials
    if args.worker_index is not None:
        # A worker of `--workers N`: its parent has reported the cache and the skipped files.
        for name in ("tlsweep.features", "tlsweep.assemble", "tlsweep.entries", "tlsweep.shards"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if args.extract_first:  # `--workers N`: take shards of the missing features first
        from tlsweep.sweep import wait_for_go

        if not wait_for_go(cfg):
            return 0  # the parent stopped before the trials

    def on_trial(o: Any) -> None:
        value = f"{cfg.search.metric}={o.value:.4f}" if o.value is not None else "no value"
        best = f"best={o.best_value:.4f} (#{o.best_number})" if o.best_value is not None else ""
        err = f"  {o.error[:120]}" if o.error else ""
        print(
            f"[{o.finished:>{len(str(n))}}/{n}] trial {o.number:<4} {o.state:<8} {value}  {best}  "
            f"{o.seconds:5.1f}s  {_short_params(o.params, cfg)}{err}",
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
        progress=_bar_factory(args.quiet),
        workers=args.workers,
        worker_index=args.worker_index,
        worker_argv=argv,
        worker_env=worker_env,
        finetune_progress=_finetune_bar(args.quiet),
    )
    if args.worker_index is None:
        print()
        _print_summary(summary, cfg)
    return 0 if summary.finished >= n or cfg.search.timeout else 1


def cmd_status(args: argparse.Namespace) -> int:
    from tlsweep.search import open_study, summarize
    from tlsweep.sweep import preflight, recorded_finetune
    from tlsweep.workers import open_storage

    cfg = _load(args, check_data_dir=False)
    if not cfg.storage.startswith(("sqlite:///", "journal:")):
        preflight(cfg, tracking=False)  # a database server: reachable, login accepted
    study = open_study(cfg, open_storage(cfg, must_exist=True), create=False)
    summary = summarize(cfg, study)
    summary.finetune = recorded_finetune(cfg, study, summary)
    _print_summary(summary, cfg)
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


def _print_ui_pages(server_url: str, experiment_id: str, parent: str | None) -> None:
    from tlsweep.tracking import runs_page_url

    print(runs_page_url(server_url, experiment_id))
    if parent:
        print("the study's own run, with the winner's test metrics:")
        print(runs_page_url(server_url, experiment_id, parent))
    sys.stdout.flush()


def cmd_ui(args: argparse.Namespace) -> int:
    import signal

    from tlsweep import tracking, ui

    if not 1 <= args.port <= 65535:
        raise TlsweepError(f"--port: got {args.port}; expected a port number from 1 to 65535")
    if not args.start_timeout > 0:
        raise TlsweepError(f"--start-timeout: got {args.start_timeout}; expected seconds > 0")
    cfg = _load(args, check_data_dir=False)
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
    if uri.startswith(("http://", "https://")):
        print(f"study {cfg.study} on the tracking server {redact_url(uri)}; open:")
        _print_ui_pages(redact_url(uri), experiment_id, parent)
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
        _print_ui_pages(server.url, experiment_id, parent)
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


def _study_and_tracker(args: argparse.Namespace, cfg: Any = None) -> tuple[Any, Any, Any]:
    from tlsweep.search import open_study
    from tlsweep.sweep import attach_parent, preflight
    from tlsweep.tracking import Tracker
    from tlsweep.workers import open_storage

    cfg = cfg or _load(args)
    if cfg.storage.startswith(("sqlite:///", "journal:")):
        preflight(cfg, storage=False)
    else:
        preflight(cfg)
    study = open_study(cfg, open_storage(cfg, must_exist=True), create=False)
    tracker = Tracker(cfg.tracking_uri, cfg.study)
    attach_parent(cfg, study, tracker)
    return cfg, study, tracker


def _print_test(w: Any, cfg: Any) -> None:
    print(f"winner: trial {w.number}, validation {cfg.search.metric} {w.value:.4f}")
    if w.test is None:
        print("no test split (no test/ folder, or test_split: 0): no test score reported")
        return
    t = w.test
    print(f"test {_with_ci(t)}, loss {t['loss']:.4f} on {t['n']} held-out images")
    if w.backbone.augment is not None:
        single = w.validation_single_view
        print(
            "the test score is the plain image's, which the exported model computes (no "
            "test-time augmentation)"
            + (f"; its validation {cfg.search.metric} {single:.4f}" if single is not None else "")
        )
    if "tta_accuracy" in t:
        print(
            f"with test-time augmentation (mean of {t['tta_views']} cached views; not in the "
            f"exported model): test accuracy {t['tta_accuracy']:.4f}"
        )
    names = t["class_names"]
    print(f"{'class':<20} {'precision':>9} {'recall':>7}")
    for n, p, r in zip(names, t["precision"], t["recall"], strict=True):
        print(f"{n:<20} {p:>9.4f} {r:>7.4f}")
    print("confusion matrix (rows true, columns predicted):")
    for n, row in zip(names, t["confusion_matrix"], strict=True):
        print(f"  {n:<18} " + " ".join(f"{v:>6}" for v in row))


def cmd_best(args: argparse.Namespace) -> int:
    from tlsweep.sweep import finetune_winner
    from tlsweep.winner import evaluate_and_log

    cfg, study, tracker = _study_and_tracker(args)
    try:
        w = evaluate_and_log(cfg, study, tracker)
        _print_test(w, cfg)
        if cfg.finetune is not None:
            _print_finetune(
                finetune_winner(
                    cfg, w, tracker, _finetune_bar(getattr(args, "quiet", False)), study
                )
            )
    finally:
        tracker.close_parent(True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tlsweep.config import check_can_write
    from tlsweep.sweep import export_winner

    if not args.output.endswith(".keras"):
        raise TlsweepError(f"--output: got '{args.output}'; the file name must end in .keras")
    if args.register is not None:
        from tlsweep.config import model_name

        args.register = model_name("", "--register", args.register)
    cfg = _load(args)
    check_can_write(args.output, "--output")  # before minutes of retraining, not after
    cfg, study, tracker = _study_and_tracker(args, cfg)
    try:
        w, ft, reg = export_winner(
            cfg,
            study,
            args.output,
            tracker,
            _finetune_bar(getattr(args, "quiet", False)),
            args.register,
        )
    finally:
        tracker.close_parent(True)
    _print_test(w, cfg)
    _print_finetune(ft)
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
            f"MODEL: got '{args.model}': not a .keras model file (not a zip archive); "
            "expected a file from 'tlsweep export'"
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
        from tlsweep.data import IMAGE_EXTENSIONS

        raise TlsweepError(
            f"PATH: got {' '.join(args.paths)[:200]!r}: no image file in it; expected files or "
            f"folders of images ({', '.join(IMAGE_EXTENSIONS)})"
        )

    rows, bad, names = predict(args.model, args.paths, args.batch_size)
    if args.csv:
        out = os.path.abspath(args.csv)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp-{os.getpid()}"
        try:  # written whole or not at all
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["file", "class", "probability"])
                for r in rows:
                    w.writerow([r["file"], r["class"], f"{r['probability']:.6f}"])
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    elif rows:
        width = max([len(r["file"]) for r in rows] + [4])
        print(f"{'file':<{width}}  {'class':<16} probability")
        for r in rows:
            print(f"{r['file']:<{width}}  {r['class']:<16} {r['probability']:.4f}")
    for f, reason in bad:
        log.warning("skipped %s: %s", f, reason)
    print(f"{len(rows)} image(s) predicted, {len(bad)} skipped", file=sys.stderr)
    return 0 if rows or not bad else 1


def _register_run(sub: Any) -> None:
    from tlsweep.config import DEFAULT_PREDICT_BATCH

    r = sub.add_parser("run", help="extract (or reuse) features and run or resume the study")
    _add_common(r)
    _add_verify(r)
    r.add_argument(
        "--n-trials", type=_int_at_least(1), metavar="N", help="finished trials to reach"
    )
    r.add_argument("--study", metavar="NAME", help="study name (overrides study)")
    r.add_argument("--storage", metavar="URL", help="Optuna storage URL (overrides storage)")
    r.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI")
    r.add_argument(
        "--workers",
        type=_int_at_least(1, MAX_WORKERS),
        default=1,
        metavar="N",
        help="worker processes on this machine (default 1)",
    )
    r.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--extract-first", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="show the study: finished, pruned, failed, running, best")
    _add_common(st)
    st.add_argument("--study", metavar="NAME")
    st.add_argument("--storage", metavar="URL")
    st.set_defaults(func=cmd_status)

    bst = sub.add_parser("best", help="retrain the best head and score it once on the test split")
    _add_common(bst)
    bst.add_argument("--study", metavar="NAME")
    bst.add_argument("--storage", metavar="URL")
    bst.add_argument("--tracking-uri", metavar="URI")
    bst.set_defaults(func=cmd_best)

    ex = sub.add_parser("export", help="write the winner as one Keras model taking raw images")
    _add_common(ex)
    ex.add_argument("--output", "-o", required=True, metavar="FILE.keras", type=_text("a path"))
    ex.add_argument("--study", metavar="NAME")
    ex.add_argument("--storage", metavar="URL")
    ex.add_argument("--tracking-uri", metavar="URI")
    ex.add_argument(
        "--register",
        metavar="NAME",
        help="register the model as a new version of NAME in the MLflow model registry; "
        "alias champion moves to it when its validation score is better (overrides register:)",
    )
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="classify image files and folders with an exported model")
    pr.add_argument("model", help="an exported .keras file")
    pr.add_argument("paths", nargs="+", help="image files or folders")
    pr.add_argument(
        "--csv",
        metavar="FILE",
        type=_text("a file path"),
        help="write file,class,probability rows to FILE",
    )
    pr.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=DEFAULT_PREDICT_BATCH,
        metavar="N",
        help="images per forward pass (default %(default)s)",
    )
    pr.set_defaults(func=cmd_predict)

    from tlsweep.config import DEFAULT_UI_HOST, DEFAULT_UI_PORT, DEFAULT_UI_START_TIMEOUT

    u = sub.add_parser(
        "ui", help="start the MLflow UI on the sweep's tracking store; print the study's runs page"
    )
    u.add_argument("sweep")
    u.add_argument("--study", metavar="NAME", help="the study to show (overrides study)")
    u.add_argument("--tracking-uri", metavar="URI")
    u.add_argument(
        "--host", default=DEFAULT_UI_HOST, help=f"bind address (default {DEFAULT_UI_HOST})"
    )
    u.add_argument(
        "--port", type=int, default=DEFAULT_UI_PORT, help=f"port (default {DEFAULT_UI_PORT})"
    )
    u.add_argument(
        "--start-timeout",
        type=float,
        default=DEFAULT_UI_START_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the server to answer (default {DEFAULT_UI_START_TIMEOUT:g})",
    )
    u.set_defaults(func=cmd_ui)


_EXTRA_COMMANDS: list[Any] = [_register_run]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore = None
    if not args.verbose:
        from tlsweep import native_stderr

        restore = native_stderr.install()  # TensorFlow's start-up lines about CUDA and oneDNN
    try:
        return _main(args)
    finally:
        if restore is not None:
            restore()


def _main(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except TlsweepError as e:
        print(f"tlsweep: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tlsweep: interrupted", file=sys.stderr)
        return _exit_code["interrupted"]
    except BrokenPipeError:
        if not _stdout_broken():
            raise
        # e.g. `tlsweep backbones | head`: the reader has gone, as a shell would say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if not _is_environment_failure(e):
            raise
        # a full disk, a permission or a read-only filesystem met after the checks: the input
        # was fine; what was finished is kept (trials and cache entries are written atomically)
        where = f" ({e.filename})" if e.filename else ""
        print(f"tlsweep: error: {e.strerror}{where}; fix it and run again", file=sys.stderr)
        return 1


def _one_line(msg: str) -> str:
    return " ".join(msg.split("\n")).strip()


def _is_environment_failure(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _stdout_broken() -> bool:
    """Whether standard output is a pipe whose reader has gone (not some other broken pipe)."""
    import select

    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
