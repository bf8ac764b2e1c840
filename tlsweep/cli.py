"""The ``tlsweep`` command line: parses flags, shows progress, maps errors to exit codes.

It holds no logic and no defaults of its own: it turns flags into a
:class:`~tlsweep.config.SweepConfig` via :func:`~tlsweep.config.load_sweep` and calls the
library. A :class:`~tlsweep.errors.TlsweepError` becomes one line on stderr and exit code 2;
Ctrl-C exits with 130 after the library has closed its trial and runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tlsweep.errors import TlsweepError

log = logging.getLogger("tlsweep")
_exit_code = {"interrupted": 130}  # Ctrl-C; a SIGTERM handler sets 143


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
                    desc=f"extract {bb.name} {bb.input_size}px {bb.pooling}",
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
def cmd_extract(args: argparse.Namespace) -> int:
    from tlsweep.features import extract_all

    cfg = _load(args)
    for bb, entry, cached in extract_all(cfg, _bar_factory(args.quiet)):
        sizes = entry.split_sizes()
        state = "cache hit, no forward pass" if cached else "extracted"
        print(
            f"{bb.label}: {state}: {len(entry.manifest['files'])} images "
            f"(train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']}), "
            f"{entry.manifest['shape'][1]} features -> {entry.path}"
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
    from tlsweep.config import DEFAULT_CACHE_DIR
    from tlsweep.features import FeatureCache

    cache_dir = args.cache_dir
    if cache_dir is None and args.sweep:
        cache_dir = str(_load(args).cache_dir)
    cache = FeatureCache(cache_dir or DEFAULT_CACHE_DIR)
    if args.action == "list":
        entries = cache.entries()
        if not entries:
            print(f"no cache entries in {cache.dir}")
            return 0
        for e in entries:
            m = e.manifest
            size_mb = (e.path / "features.npy").stat().st_size / 1e6
            print(
                f"{m['name']}  {len(m['files'])} images x {m['shape'][1]} features  "
                f"{size_mb:.1f} MB  {len(m['skipped'])} skipped  {m['data_dir']}  {m['created']}"
            )
        return 0
    removed = cache.clear(args.match)
    print(
        f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {cache.dir}"
    )
    return 0


# --- parser ------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="the sweep file (YAML)")
    p.add_argument("--data", metavar="DIR", help="image folder (overrides data.dir)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache folder (overrides cache_dir)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tlsweep",
        description="Transfer-learning sweeps: cache backbone features once, search the head "
        "with Optuna, track every trial in MLflow.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("extract", help="extract and cache every backbone's features")
    _add_common(e)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_extract)

    b = sub.add_parser("backbones", help="list the available keras.applications backbones")
    b.set_defaults(func=cmd_backbones)

    c = sub.add_parser("cache", help="list or clear feature cache entries")
    c.add_argument("action", choices=("list", "clear"))
    c.add_argument("sweep", nargs="?", help="take cache_dir from this sweep file")
    c.add_argument("--cache-dir", metavar="DIR", help="the cache folder")
    c.add_argument("--match", help="clear only entries whose name contains this")
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
        tuned = " fine-tuned" if summary.finetune is not None and summary.finetune.accepted else ""
        print(
            f"\nwinner (trial {summary.best[0]['number']}{tuned}) on the held-out test split: "
            f"accuracy {t['accuracy']:.4f}, loss {t['loss']:.4f} ({t['n']} images)"
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


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from tlsweep.sweep import run_sweep

    def _terminate(signum: int, frame: Any) -> None:
        _exit_code["interrupted"] = 128 + signum  # 143, what a shell expects of SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    if args.workers < 1:
        raise TlsweepError(f"--workers: got {args.workers}; expected an integer >= 1")
    cfg = _load(args)
    n = cfg.search.n_trials
    if args.worker_index is not None:
        # A worker of `--workers N`: its parent has reported the cache and the skipped files.
        logging.getLogger("tlsweep.features").setLevel(logging.ERROR)

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
    for flag in ("data", "cache_dir", "study", "storage", "tracking_uri", "n_trials"):
        v = getattr(args, flag)
        if v is not None:
            argv += [f"--{flag.replace('_', '-')}", str(v)]
    summary = run_sweep(
        cfg,
        on_trial=on_trial,
        progress=_bar_factory(args.quiet),
        workers=args.workers,
        worker_index=args.worker_index,
        worker_argv=argv,
        finetune_progress=_finetune_bar(args.quiet),
    )
    if args.worker_index is None:
        print()
        _print_summary(summary, cfg)
    return 0 if summary.finished >= n or cfg.search.timeout else 1


def cmd_status(args: argparse.Namespace) -> int:
    from tlsweep.search import open_study, summarize
    from tlsweep.workers import open_storage

    cfg = _load(args, check_data_dir=False)
    study = open_study(cfg, open_storage(cfg, must_exist=True), create=False)
    _print_summary(summarize(cfg, study), cfg)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    cfg = _load(args, check_data_dir=False)
    uri = cfg.tracking_uri
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        print(f"the tracking store is a server: open {uri} in a browser")
        return 0
    db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None
    if db is not None and not os.path.exists(db):
        log.warning(
            "%s does not exist: no run was logged to it; run 'tlsweep ui' in the folder where "
            "you ran 'tlsweep run', or set tracking_uri: in the sweep file",
            os.path.abspath(db),
        )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C to stop)", flush=True)
    return subprocess.call(cmd)


def _study_and_tracker(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from tlsweep.search import open_study
    from tlsweep.sweep import attach_parent
    from tlsweep.tracking import Tracker
    from tlsweep.workers import open_storage

    cfg = _load(args)
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
    print(f"test accuracy {t['accuracy']:.4f}, loss {t['loss']:.4f} on {t['n']} held-out images")
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
                finetune_winner(cfg, w, tracker, _finetune_bar(getattr(args, "quiet", False)))
            )
    finally:
        tracker.close_parent(True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tlsweep.sweep import export_winner

    cfg, study, tracker = _study_and_tracker(args)
    try:
        w, ft = export_winner(
            cfg, study, args.output, tracker, _finetune_bar(getattr(args, "quiet", False))
        )
    finally:
        tracker.close_parent(True)
    _print_test(w, cfg)
    _print_finetune(ft)
    print(
        f"exported {args.output} (raw RGB images of any size -> probabilities of "
        f"{', '.join(w.entry.class_names)})"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    from tlsweep.winner import predict

    rows, bad, names = predict(args.model, args.paths, args.batch_size)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
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


def _register_run(sub: Any) -> None:
    r = sub.add_parser("run", help="extract (or reuse) features and run or resume the study")
    _add_common(r)
    r.add_argument("--n-trials", type=int, metavar="N", help="finished trials to reach")
    r.add_argument("--study", metavar="NAME", help="study name (overrides study)")
    r.add_argument("--storage", metavar="URL", help="Optuna storage URL (overrides storage)")
    r.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI")
    r.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine (default 1)",
    )
    r.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
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
    ex.add_argument("--output", "-o", required=True, metavar="FILE.keras")
    ex.add_argument("--study", metavar="NAME")
    ex.add_argument("--storage", metavar="URL")
    ex.add_argument("--tracking-uri", metavar="URI")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="classify image files and folders with an exported model")
    pr.add_argument("model", help="an exported .keras file")
    pr.add_argument("paths", nargs="+", help="image files or folders")
    pr.add_argument("--csv", metavar="FILE", help="write file,class,probability rows to FILE")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.set_defaults(func=cmd_predict)

    u = sub.add_parser("ui", help="start the MLflow UI on the sweep's tracking store")
    u.add_argument("sweep")
    u.add_argument("--tracking-uri", metavar="URI")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=5000)
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
        print(f"tlsweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlsweep: interrupted", file=sys.stderr)
        return _exit_code["interrupted"]
    except BrokenPipeError:
        if not _stdout_broken():
            raise
        # e.g. `tlsweep backbones | head`: the reader has gone, as a shell would say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


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
