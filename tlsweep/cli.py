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


# --- commands ----------------------------------------------------------------------------------
def cmd_extract(args: argparse.Namespace) -> int:
    from tlsweep.features import extract_all

    cfg = _load(args)
    for bb, entry, cached in extract_all(cfg, _bar_factory(args.quiet)):
        sizes = entry.split_sizes()
        state = "cache hit, no forward pass" if cached else "extracted"
        print(
            f"{bb.label}: {state}: {entry.manifest['shape'][0]} images "
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
                f"{m['name']}  {m['shape'][0]} images x {m['shape'][1]} features  "
                f"{size_mb:.1f} MB  {len(m['skipped'])} skipped  {m['data_dir']}  {m['created']}"
            )
        return 0
    removed = cache.clear(args.match)
    print(f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {cache.dir}")
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


_EXTRA_COMMANDS: list[Any] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except TlsweepError as e:
        print(f"tlsweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
