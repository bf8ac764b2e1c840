"""Benchmark memory: resident memory of one process running many head trials, like a study.

Features: MobileNetV2(alpha=0.35), 160 px, average-pooled (1280 per image), of cats_vs_dogs,
through tlsweep's feature cache (``--cache-dir``, reused across runs).

Two modes:

* ``--mode study`` (default): the real thing. A sweep file is written to a temporary folder and
  ``tlsweep.sweep.run_sweep`` runs it in this process: ``StudyRunner`` asks Optuna (SQLite
  storage in the temporary folder) for each trial's parameters, trains with ``train_head`` and
  logs a nested MLflow run per trial (tracking to ``sqlite:///`` in the temporary folder). So the
  figure covers TensorFlow, Optuna and MLflow together.
* ``--mode head``: ``train_head`` alone, parameters drawn with numpy (same ranges).

Sampled per trial from the default search space (``tlsweep.config.DEFAULT_SPACE``: units,
dropout, learning rate, batch size); ``--epochs`` epochs (default 3). The random sampler is the
default because it spreads trials over the most distinct shapes (the hard case for per-shape
caches); ``--sampler tpe`` is what a default study uses. No pruner, so every trial trains all
its epochs.

RSS comes from /proc/self/status (VmRSS), after ``gc.collect()``; malloc's in-use and free-heap
bytes (glibc ``mallinfo2``) tell a leak (in-use grows) from fragmentation (free heap grows).

Usage (from the repository root)::

    /work/venv/bin/python bench/memory.py --trials 200 --json /tmp/bench_memory.json

Target: RSS after the last trial minus RSS after trial 10 <= 100 MB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALPHA, SIZE, add_data_args, mobilenet_v2  # noqa: E402

FIRST = 10
TARGET_MB = 100.0


def _draw(rng: Any, r: dict[str, Any]) -> float:
    """A number from a search-space range ``{low, high[, log]}``, as a random sampler draws it."""
    import numpy as np

    if r.get("log"):
        return float(np.exp(rng.uniform(np.log(r["low"]), np.log(r["high"]))))
    return float(rng.uniform(r["low"], r["high"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument(
        "--mode",
        choices=("study", "head"),
        default="study",
        help="study: run_sweep with Optuna + MLflow (default); head: train_head alone",
    )
    p.add_argument("--trials", type=int, default=200, help="trials to run (default 200)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument(
        "--sampler",
        choices=("random", "tpe"),
        default="random",
        help="Optuna sampler in study mode (default random)",
    )
    p.add_argument("--every", type=int, default=10, help="record RSS every N trials")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (study mode)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here as JSON")
    return p.parse_args(argv)


# --- measuring -----------------------------------------------------------------------------------
def rss_mb() -> float:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_mb() -> dict[str, float]:
    """glibc heap: bytes in use (including mmapped blocks) and free inside the heap, in MB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use": (m.uordblks + m.hblkhd) / 2**20, "free_in_heap": m.fordblks / 2**20}


def traces() -> dict[str, int]:
    """How often each of tlsweep's compiled head functions has been traced."""
    from tlsweep import head

    out = {}
    for key, fn in head._FUNCS.items():
        with_count = getattr(fn, "experimental_get_tracing_count", None)
        out["/".join(map(str, key))] = with_count() if with_count else -1
    return out


class Recorder:
    def __init__(self, every: int):
        self.every = every
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def __call__(self, done: int, force: bool = False) -> None:
        if not force and done != FIRST and done % self.every:
            return
        row = {
            "trials": done,
            "rss_mb": rss_mb(),
            "seconds": time.perf_counter() - self.t0,
            "malloc_mb": malloc_mb(),
            "python_objects": len(gc.get_objects()),
            "traces": sum(traces().values()),
        }
        self.rows.append(row)
        mi = row["malloc_mb"]
        heap = (
            f"  malloc in use {mi['in_use']:7.1f} MB, free in heap {mi['free_in_heap']:6.1f} MB"
            if mi
            else ""
        )
        print(
            f"after {done:4d} trials: RSS {row['rss_mb']:7.1f} MB{heap}  "
            f"objects {row['python_objects']}  traces {row['traces']}  "
            f"({row['seconds']:.0f}s)",
            flush=True,
        )

    def at(self, done: int) -> dict | None:
        return next((r for r in self.rows if r["trials"] == done), None)


# --- features ------------------------------------------------------------------------------------
def backbone(weights: Path):
    from tlsweep.config import resolve_backbone

    return resolve_backbone(mobilenet_v2(weights))


# --- the two modes -------------------------------------------------------------------------------
SWEEP = """\
study: bench_memory
data:
  dir: {data}
backbones:
  - name: MobileNetV2
    weights: {weights}
    input_size: {size}
    pooling: avg
    args: {{alpha: {alpha}}}
cache_dir: {cache_dir}
storage: sqlite:///{tmp}/optuna.db
tracking_uri: sqlite:///{tmp}/mlflow.db
search:
  n_trials: {trials}
  sampler: {sampler}
  pruner: none
  seed: 1337
  space:  # the default space (units, dropout, learning_rate, batch_size), fewer epochs
    epochs: {epochs}
"""


def run_study(args: argparse.Namespace, rec: Recorder, tmp: Path) -> dict:
    from tlsweep.config import load_sweep
    from tlsweep.sweep import run_sweep

    sweep = tmp / "sweep.yaml"
    sweep.write_text(
        SWEEP.format(
            data=args.data,
            weights=args.weights,
            size=SIZE,
            alpha=ALPHA,
            cache_dir=args.cache_dir.resolve(),
            tmp=tmp,
            trials=args.trials,
            sampler=args.sampler,
            epochs=args.epochs,
        )
    )
    cfg = load_sweep(sweep)
    states: dict[str, int] = {}

    def on_trial(o) -> None:  # noqa: ANN001
        states[o.state] = states.get(o.state, 0) + 1
        rec(o.finished)

    summary = run_sweep(cfg, on_trial=on_trial, evaluate_winner=False)
    return {
        "states": states,
        "finished": summary.finished,
        "best": summary.best[0] if summary.best else None,
        "storage": cfg.storage,
        "tracking_uri": cfg.tracking_uri,
    }


def run_head(args: argparse.Namespace, rec: Recorder) -> dict:
    import numpy as np

    from tlsweep.config import DEFAULT_SPACE, DataConfig
    from tlsweep.data import find_images
    from tlsweep.features import FeatureCache
    from tlsweep.head import HeadParams, as_tensor, train_head

    entry, _ = FeatureCache(args.cache_dir.resolve()).ensure(
        backbone(args.weights), find_images(DataConfig(dir=args.data))
    )
    xt, yt = entry.split("train")
    xv, yv = entry.split("validation")
    xt, xv = as_tensor(xt), as_tensor(xv)  # once, as load_features does for a study
    rng = np.random.default_rng(1337)
    accs = []
    for i in range(args.trials):
        hp = HeadParams(
            units=int(round(_draw(rng, DEFAULT_SPACE["units"]))),
            dropout=_draw(rng, DEFAULT_SPACE["dropout"]),
            learning_rate=_draw(rng, DEFAULT_SPACE["learning_rate"]),
            batch_size=int(rng.choice(DEFAULT_SPACE["batch_size"]["choices"])),
            epochs=args.epochs,
            seed=i,
        )
        accs.append(train_head(xt, yt, xv, yv, len(entry.class_names), hp).history[-1].val_accuracy)
        rec(i + 1)
    return {"finished": len(accs), "best_val_accuracy": max(accs) if accs else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING)
    args.data, args.weights = args.data.resolve(), args.weights.resolve()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no such data folder; pass --data")
    if not args.weights.is_file():
        sys.exit(f"{args.weights}: no such weights file; pass --weights")
    if args.trials <= FIRST:
        sys.exit(f"--trials: give more than {FIRST}")

    print(f"start: RSS {rss_mb():.1f} MB (Python only)", flush=True)
    import tensorflow as tf

    # Make sure the features exist before timing anything (extraction is a one-off).
    from tlsweep.config import DataConfig
    from tlsweep.data import find_images
    from tlsweep.features import FeatureCache

    entry, cached = FeatureCache(args.cache_dir.resolve()).ensure(
        backbone(args.weights), find_images(DataConfig(dir=args.data))
    )
    print(
        f"features: {'cache hit' if cached else 'extracted'} {entry.path.name}; "
        f"RSS {rss_mb():.1f} MB",
        flush=True,
    )

    rec = Recorder(args.every)
    tmpdir = tempfile.mkdtemp(prefix="bench-memory-")
    t0 = time.perf_counter()
    try:
        if args.mode == "study":
            extra = run_study(args, rec, Path(tmpdir))
        else:
            extra = run_head(args, rec)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    last = rec.rows[-1]["trials"] if rec.rows else 0
    if not rec.rows or rec.rows[-1]["trials"] != args.trials:
        rec(args.trials, force=True)
        last = args.trials
    first, end = rec.at(FIRST), rec.at(last)
    growth = end["rss_mb"] - first["rss_mb"]
    per_trial_kb = 1024 * growth / max(last - FIRST, 1)
    ok = growth <= TARGET_MB

    print()
    what = (
        f"run_sweep -> StudyRunner (Optuna SQLite + MLflow sqlite, {args.sampler} sampler)"
        if args.mode == "study"
        else "train_head alone"
    )
    print(
        f"{what}; MobileNetV2(alpha={ALPHA}) {SIZE}px avg features; {args.trials} trials x "
        f"{args.epochs} epochs in {wall:.0f}s; TF {tf.__version__}"
    )
    print(
        f"{'':28}{'RSS MB':>9}{'malloc in use':>15}{'free in heap':>14}{'objects':>10}{'traces':>8}"
    )
    for label, r in ((f"after {FIRST} trials", first), (f"after {last} trials", end)):
        mi = r["malloc_mb"]
        print(
            f"{label:28}{r['rss_mb']:9.1f}{mi.get('in_use', float('nan')):15.1f}"
            f"{mi.get('free_in_heap', float('nan')):14.1f}{r['python_objects']:10d}"
            f"{r['traces']:8d}"
        )
    print(
        f"{'difference':28}{growth:9.1f}   ({per_trial_kb:.0f} KB per trial; target <= "
        f"{TARGET_MB:.0f} MB: {'ok' if ok else 'ABOVE TARGET'})"
    )
    print(f"compiled head functions and their trace counts: {traces()}")

    if args.json:
        out = {
            "mode": args.mode,
            "sampler": args.sampler if args.mode == "study" else None,
            "trials": args.trials,
            "epochs": args.epochs,
            "features": entry.path.name,
            "wall_seconds": wall,
            "rows": rec.rows,
            "rss_after_first_mb": first["rss_mb"],
            "rss_after_last_mb": end["rss_mb"],
            "growth_mb": growth,
            "growth_kb_per_trial": per_trial_kb,
            "target_mb": TARGET_MB,
            "ok": ok,
            "traces": traces(),
            "run": extra,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
