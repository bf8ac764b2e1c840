"""Benchmark a first run's store creation: built in place (as MLflow/Optuna do) vs. atomically.

Per repeat, in fresh folders, interleaved so machine noise hits both alike, with MLflow, Optuna
and SQLAlchemy imported beforehand (a first run imports them anyway):

  (in place)  ``SqlAlchemyStore(sqlite:///mlflow.db, ./mlruns)`` (what ``MlflowClient`` builds on
              a first call) and ``RDBStorage(sqlite:///optuna.db)``, each on a missing file;
  (atomic)    :func:`~tlsweep.tracking.prepare_mlflow`, `storage.prepare_optuna`
              (build in a temporary file, link into place) followed by the same open;
  (check)     the ``prepare`` call on the existing store: what every later run pays.

Usage (from the repository root)::

    /work/main/.venv/bin/python bench/stores.py --repeats 5 --json /tmp/bench_stores.json

Target: the atomic first creation within 10 % (or 0.2 s) of the in-place one; the check of an
existing store under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


def _mlflow_open(url: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(url, "./mlruns").engine.dispose()
    SqlAlchemyStore._engine_map.pop(url, None)


def _optuna_open(url: str) -> None:
    from optuna.storages import RDBStorage

    RDBStorage(url).engine.dispose()


def main() -> int:
    from tlsweep import tracking
    from tlsweep.study import _storage as storage

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import optuna  # noqa: F401

    opens = {"mlflow": _mlflow_open, "optuna": _optuna_open}
    prepare = {"mlflow": tracking.prepare_mlflow, "optuna": storage.prepare_optuna}
    times: dict[str, list[float]] = {
        f"{k} {w}": [] for k in opens for w in ("in place", "atomic", "check")
    }
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            for kind in opens:
                url = f"sqlite:///{root}/{i}-{kind}-in-place.db"
                t0 = time.perf_counter()
                opens[kind](url)
                times[f"{kind} in place"].append(time.perf_counter() - t0)
                url = f"sqlite:///{root}/{i}-{kind}-atomic.db"
                t0 = time.perf_counter()
                prepare[kind](url)
                opens[kind](url)
                times[f"{kind} atomic"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                prepare[kind](url)
                times[f"{kind} check"].append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        k: {"median_s": statistics.median(v), "all_s": v} for k, v in times.items()
    }
    print(f"{'':24} {'median s':>9}  all")
    for k, v in result.items():
        print(f"{k:24} {v['median_s']:9.3f}  {' '.join(f'{x:.3f}' for x in v['all_s'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
