"""The ``tlsweep`` command line: parses flags, maps errors to exit codes; ``main() -> int``.

The command line is four modules and the only place tlsweep prints: this one (the parser, the
logging set-up, :func:`main`), :mod:`tlsweep.cli._commands` (the study's commands),
:mod:`tlsweep.cli._winner` (``best``, ``export``, ``predict``) and :mod:`tlsweep.cli._display`
(progress bars and summaries). It holds no logic and no defaults of its own: a command turns
flags into a :class:`~tlsweep.config.SweepConfig` via :func:`~tlsweep.config._sweepfile.load_sweep`
and calls the library. A :class:`~tlsweep.errors.TlsweepError` becomes one line on stderr and its
exit code (2); Ctrl-C exits with 130 after the library has closed its trial and runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tlsweep.config import MAX_WORKERS, redact_url
from tlsweep.errors import TlsweepError

from ._audit import cmd_audit
from ._commands import cmd_backbones, cmd_cache, cmd_extract, cmd_run, cmd_status, cmd_ui, exit_code
from ._help import order_commands
from ._init import register_init
from ._winner import cmd_best, cmd_export, cmd_predict


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = redact_url(record.getMessage())  # no URL's password on the console
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


# The study a command works on and where it lives, declared once for every command taking them
_WHERE = {
    "study": ("--study", "NAME", "study name (overrides study)"),
    "storage": ("--storage", "URL", "Optuna storage URL (overrides storage)"),
    "tracking_uri": ("--tracking-uri", "URI", "MLflow tracking URI (overrides tracking_uri)"),
}


def _add_where(p: argparse.ArgumentParser, *names: str) -> None:
    """``--study``, ``--storage`` and/or ``--tracking-uri`` (``names``: their dests), each
    with the same metavar and help in every command."""
    for name in names:
        flag, metavar, text = _WHERE[name]
        p.add_argument(flag, metavar=metavar, help=text)


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
    c.add_argument(
        "--finetune",
        action="store_true",
        help="clear the fine-tuning stages' checkpoints (not the feature entries, unless --all)",
    )
    c.add_argument(
        "--images",
        action="store_true",
        help="clear the decoded-image caches of fine-tuning (not the entries, unless --all)",
    )
    c.add_argument(
        "--all",
        action="store_true",
        help="clear the feature entries, fine-tuning stages and decoded images; what a running "
        "process holds is always left alone",
    )
    c.set_defaults(func=cmd_cache)

    for register in _EXTRA_COMMANDS:
        register(sub)
    order_commands(p, sub)
    return p


def _register_run(sub: Any) -> None:
    from tlsweep.config import DEFAULT_PREDICT_BATCH

    r = sub.add_parser("run", help="extract (or reuse) features and run or resume the study")
    _add_common(r)
    _add_verify(r)
    r.add_argument(
        "--n-trials", type=_int_at_least(1), metavar="N", help="finished trials to reach"
    )
    _add_where(r, "study", "storage", "tracking_uri")
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
    _add_where(st, "study", "storage")
    st.set_defaults(func=cmd_status)

    bst = sub.add_parser("best", help="retrain the best head and score it once on the test split")
    _add_common(bst)
    _add_where(bst, "study", "storage", "tracking_uri")
    bst.set_defaults(func=cmd_best)

    ex = sub.add_parser("export", help="write the winner as one Keras model taking raw images")
    _add_common(ex)
    ex.add_argument("--output", "-o", required=True, metavar="FILE.keras", type=_text("a path"))
    _add_where(ex, "study", "storage", "tracking_uri")
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
    _add_where(u, "study", "tracking_uri")
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


_EXTRA_COMMANDS: list[Any] = [_register_run, register_init]


def _register_audit(sub: Any) -> None:
    a = sub.add_parser(
        "audit",
        help="find exact and near duplicates across splits and likely label errors "
        "(extracting missing features first)",
    )
    _add_common(a)
    _add_verify(a)
    a.add_argument(
        "--backbone",
        metavar="NAME",
        type=_text("a backbone of the sweep file"),
        help="audit on this backbone's features, by label or name (default: the first)",
    )
    a.add_argument(
        "--json",
        metavar="FILE",
        type=_text("a file path"),
        help="write the full report (paths relative to the data folder) to FILE",
    )
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_audit)


_EXTRA_COMMANDS.append(_register_audit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        # no command: the help, on stderr, then the usage error argparse would give (exit 2)
        parser.print_help(sys.stderr)
        print("tlsweep: error: no COMMAND given; pick one of those above", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    restore = None
    if not args.verbose:
        from . import _native_stderr as native_stderr

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
        return exit_code["interrupted"]
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
        fix = "fix it"
        if e.errno in _FULL:
            fix = "free some space (or point the command at another disk)"
        print(
            f"tlsweep: error: {e.strerror}{where}; {fix} and run the command again: what was "
            "finished is kept",
            file=sys.stderr,
        )
        return 1


_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota


def _one_line(msg: str) -> str:
    return redact_url(" ".join(msg.split("\n")).strip())


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
