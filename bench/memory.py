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

Sampled per trial from the default search space (``tlsweep.config._params.DEFAULT_SPACE``: units,
dropout, learning rate, batch size); ``--epochs`` epochs (default 3). The random sampler is the
default because it spreads trials over the most distinct shapes (the hard case for per-shape
caches); ``--sampler tpe`` is what a default study uses. No pruner, so every trial trains all
its epochs.

RSS comes from /proc/self/status (VmRSS), after ``gc.collect()``; malloc's in-use and free-heap
bytes (glibc ``mallinfo2``) tell a leak (in-use grows) from fragmentation (free heap grows).

Usage (from the repository root)::

    /work/venv/bin/python bench/memory.py --trials 200 --json /tmp/bench_memory.json

Target: RSS after the last trial minus RSS after trial 10 <= 100 MB.

``--workers 1,3`` measures instead what features cost each of several processes training at
once on one cache entry, as the workers of a study do: a synthetic entry of ``--rows`` x 1280
float32 features (90 % train, 10 % validation; 100 000 rows = 512 MB) is written to a temporary
folder, then for each worker count that many processes start together; each imports
TensorFlow, loads the features with ``tlsweep.study._objective.load_features`` (what a study's
worker does) and trains ``--trials`` heads at fixed parameters. Each reports, against its own
baseline before loading the features: VmRSS, RssAnon (its private memory), RssFile (mapped
file pages, shared through the page cache by every process mapping them) and Pss (its fair
share of what it maps). ``--pythonpath DIR`` runs the workers on another checkout (e.g. one
from before features were mapped) for a before/after comparison::

    python bench/memory.py --workers 1,3 --rows 100000 --trials 3
    python bench/memory.py --workers 1,3 --rows 100000 --trials 3 --pythonpath /tmp/older-checkout

Target (issue 14): each worker's private memory (RssAnon) grows by a few hundred MB at most
over its baseline, whatever the size of the features.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALPHA, SIZE, add_data_args, mobilenet_v2, sweep_text  # noqa: E402

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
    p.add_argument(
        "--workers",
        default=None,
        metavar="N,N",
        help="instead: per-worker memory of N processes training at once (e.g. 1,3)",
    )
    p.add_argument(
        "--rows", type=int, default=100_000, help="rows of the synthetic entry (--workers)"
    )
    p.add_argument(
        "--pythonpath",
        type=Path,
        default=None,
        help="the checkout the workers import tlsweep from (--workers; default: this one)",
    )
    p.add_argument("--phase", choices=("worker",), help=argparse.SUPPRESS)
    p.add_argument("--entry", type=Path, help=argparse.SUPPRESS)
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
    from tlsweep.head import _graph as head_graph

    out = {}
    for key, fn in head_graph._FUNCS.items():
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
    from tlsweep.config._backbones import resolve_backbone

    return resolve_backbone(mobilenet_v2(weights))


# --- the two modes -------------------------------------------------------------------------------
SEARCH = """\
search:
  n_trials: {trials}
  sampler: {sampler}
  pruner: none
  seed: 1337
  space:  # the default space (units, dropout, learning_rate, batch_size), fewer epochs
    epochs: {epochs}
"""


def run_study(args: argparse.Namespace, rec: Recorder, tmp: Path) -> dict:
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.sweep import run_sweep

    sweep = tmp / "sweep.yaml"
    sweep.write_text(
        sweep_text(
            "bench_memory",
            args.data,
            args.weights,
            args.cache_dir.resolve(),
            tmp,
            SEARCH.format(trials=args.trials, sampler=args.sampler, epochs=args.epochs),
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

    from tlsweep.config._params import DEFAULT_SPACE
    from tlsweep.config._schema import DataConfig
    from tlsweep.features._cache import FeatureCache
    from tlsweep.head._graph import as_tensor
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.images._find import find_images

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


# --- several workers on one entry -----------------------------------------------------------------
WORKER_HEAD = {"units": 256, "dropout": 0.3, "learning_rate": 1e-3, "batch_size": 256, "epochs": 2}
FEATURES = 1280


def memory_mb() -> dict[str, float]:
    """This process's VmRSS, RssAnon, RssFile, VmHWM (/proc/self/status) and Pss (smaps_rollup)."""
    gc.collect()
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(line.split()[1]) / 1024.0
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def write_entry(folder: Path, rows: int) -> Path:
    """A synthetic cache entry: features.npy (random, float32) and the manifest fields that
    ``Entry.split`` reads; train rows first, then validation, as tlsweep writes them."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    feats = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURES)
    )
    for a in range(0, rows, 8192):
        b = min(rows, a + 8192)
        feats[a:b] = rng.standard_normal((b - a, FEATURES), dtype=np.float32)
    feats.flush()
    del feats
    n_val = rows // 10
    labels = rng.integers(0, 2, rows).tolist()
    files = [
        {
            "path": f"x/{i}.jpg",
            "label": labels[i],
            "split": "train" if i < rows - n_val else "validation",
            "row": i,
        }
        for i in range(rows)
    ]
    (folder / "manifest.json").write_text(
        json.dumps({"files": files, "class_names": ["a", "b"], "data_dir": "synthetic"})
    )
    return folder


def run_worker(entry_dir: Path, trials: int) -> dict:
    """One worker: baseline, features loaded as a study loads them, then trials."""
    import tensorflow as tf  # noqa: F401 - part of the baseline

    from tlsweep.config._schema import BackboneConfig
    from tlsweep.features._entries import Entry
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.study._objective import load_features

    manifest = json.loads((entry_dir / "manifest.json").read_text())
    entry = Entry(path=entry_dir, manifest=manifest)
    bb = BackboneConfig(name="MobileNetV2")
    import numpy as np

    # the baseline: one tiny trial, so TensorFlow's kernels and the compiled head exist
    warm = np.zeros((8, FEATURES), np.float32)
    train_head(
        warm,
        np.arange(8) % 2,
        warm,
        np.arange(8) % 2,
        2,
        HeadParams(**{**WORKER_HEAD, "epochs": 1}),
    )
    rows = {"baseline": memory_mb()}
    t0 = time.perf_counter()
    (fd,) = load_features([(bb, entry)]).values()
    rows["loaded"] = memory_mb()
    load_s = time.perf_counter() - t0
    times = []
    for i in range(trials):
        t = time.perf_counter()
        train_head(fd.x_train, fd.y_train, fd.x_val, fd.y_val, 2, HeadParams(**WORKER_HEAD, seed=i))
        times.append(time.perf_counter() - t)
    rows["trained"] = memory_mb()
    return {"memory": rows, "load_s": load_s, "trial_s": times}


def run_workers(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    code = (args.pythonpath or Path(__file__).resolve().parent.parent).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-workers-"))
    results: dict[int, list[dict]] = {}
    try:
        t0 = time.perf_counter()
        entry = write_entry(tmp / "entry", args.rows)
        size_mb = (entry / "features.npy").stat().st_size / 2**20
        print(
            f"synthetic entry: {args.rows} x {FEATURES} float32 = {size_mb:.0f} MB "
            f"({time.perf_counter() - t0:.0f}s); workers import tlsweep from {code}",
            flush=True,
        )
        env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "2"}
        for n in counts:
            cmd = [
                sys.executable,
                __file__,
                "--phase",
                "worker",
                "--entry",
                str(entry),
                "--trials",
                str(args.trials),
            ]
            procs = [
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(n)
            ]
            outs = [p.communicate() for p in procs]
            for p, (_, err) in zip(procs, outs, strict=True):
                if p.returncode != 0:
                    sys.exit(f"a worker failed ({p.returncode}):\n{err.decode()[-3000:]}")
            results[n] = [json.loads(out) for out, _ in outs]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(
        f"{args.rows} x {FEATURES} features ({size_mb:.0f} MB), {args.trials} trials of "
        f"{WORKER_HEAD} per worker; MB, growth over each worker's baseline after its trials"
    )
    hdr = (
        f"{'workers':>7} {'worker':>6} {'VmRSS':>8} {'RssAnon':>8} {'RssFile':>8} {'Pss':>8}"
        f" {'peak VmHWM':>10} {'load s':>7} {'trial s':>8}"
    )
    print(hdr)
    worst_anon = 0.0
    for n, ws in results.items():
        for i, w in enumerate(ws):
            b, e = w["memory"]["baseline"], w["memory"]["trained"]
            grow = {k: e.get(k, float("nan")) - b.get(k, float("nan")) for k in e}
            worst_anon = max(worst_anon, grow["RssAnon"])
            print(
                f"{n:>7} {i:>6} {grow['VmRSS']:>8.0f} {grow['RssAnon']:>8.0f} "
                f"{grow['RssFile']:>8.0f} {grow.get('Pss', float('nan')):>8.0f} "
                f"{e['VmHWM'] - b['VmRSS']:>10.0f} {w['load_s']:>7.2f} "
                f"{statistics.median(w['trial_s']):>8.2f}"
            )
    print(f"largest private (RssAnon) growth of a worker: {worst_anon:.0f} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rows": args.rows, "code": str(code), "workers": results}, indent=1)
        )
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "worker":
        print(json.dumps(run_worker(args.entry, args.trials)))
        return 0
    if args.workers:
        return run_workers(args)
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
    from tlsweep.config._schema import DataConfig
    from tlsweep.features._cache import FeatureCache
    from tlsweep.images._find import find_images

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
