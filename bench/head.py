"""Benchmark head training: tlsweep's ``train_head`` vs. plain Keras ``Model.fit``, same features.

The classic head (Dense 256 relu -> Dropout 0.5 -> Dense 1 sigmoid; Adam 1e-4, batch 64,
30 epochs, binary cross-entropy) on MobileNetV2(alpha=0.35) features at 160 px of the full
cats_vs_dogs train (2000) / validation (1000) splits, once average-pooled (1280 features) and once
flattened (5x5x1280 = 32000 features). The features come from tlsweep's cache
(``FeatureCache(--cache-dir).ensure(...)``), so a second bench run reuses them.

Measured in one process, interleaved per repeat so machine noise hits every competitor alike:

  (t1) tlsweep ``train_head`` the first time its compiled functions are used (includes tracing;
       what the first trial of a study pays). For the second pooling the compiled functions
       would already exist, so they are dropped first (``tlsweep.head._graph._FUNCS.clear()``) to
       show the tracing cost again;
  (tw) tlsweep ``train_head`` warm (a second call: what every later trial pays);
  (tm) the same, warm, on tensors over the cache file's memory map (``as_tensor`` of
       ``Entry.split``'s slices, no copy: what a study's trials use) instead of in-memory
       copies;
  (k)  ``keras.Model.fit(x, y, batch_size=64, epochs=30, validation_data=(xv, yv), verbose=0)``
       on the same numpy arrays, with a freshly built and compiled model every time
       (Adam(1e-4), 'binary_crossentropy', metrics=['accuracy']); only ``fit`` is timed;
  (mm) a plain ``tf.matmul`` of [64, features] x [features, 256] in a compiled loop: the rate
       this machine attains on the head's main operation.

Achieved GFLOP/s counts, per epoch, 4 x features x units per training sample (forward and
weight gradient of the first layer) plus 2 x features x units per validation sample.

Usage (from the repository root)::

    /work/venv/bin/python bench/head.py --repeats 2 --json /tmp/bench_head.json

Targets: speed-up fit / tlsweep-warm >= 3 (avg) and >= 1.5 (flatten); final val accuracy of the
two within one point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALPHA, SIZE, add_data_args, mobilenet_v2, setup  # noqa: E402

UNITS, DROPOUT, LR, BATCH, EPOCHS = 256, 0.5, 1e-4, 64, 30
TARGETS = {"avg": 3.0, "flatten": 1.5}
ACC_TOLERANCE = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--poolings", default="avg,flatten", help="comma-separated: avg, flatten")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per training (default 30)")
    p.add_argument(
        "--matmul-seconds",
        type=float,
        default=3.0,
        help="about how long to time the plain matmul per repeat",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here as JSON")
    return p.parse_args(argv)


# --- features through tlsweep's cache ----------------------------------------------------------
def load_features(data: Path, weights: Path, cache_dir: Path, pooling: str):
    """(x_train, y_train, x_val, y_val) as in-memory numpy arrays, via FeatureCache.ensure."""
    import numpy as np

    from tlsweep.config._backbones import resolve_backbone
    from tlsweep.config._schema import DataConfig
    from tlsweep.features._cache import FeatureCache
    from tlsweep.images._find import find_images

    bb = resolve_backbone(mobilenet_v2(weights, pooling))
    images = find_images(DataConfig(dir=data))
    t0 = time.perf_counter()
    entry, cached = FeatureCache(cache_dir).ensure(bb, images)
    dt = time.perf_counter() - t0
    print(
        f"[{pooling}] features: {'cache hit' if cached else 'extracted'} {entry.path.name} "
        f"in {dt:.1f}s",
        flush=True,
    )
    xt, yt = entry.split("train")
    xv, yv = entry.split("validation")
    return (
        np.array(xt, np.float32),
        np.asarray(yt),
        np.array(xv, np.float32),
        np.asarray(yv),
        {"entry": entry.path.name, "cached": cached, "seconds": dt, "split": entry.split},
    )


# --- the competitors -----------------------------------------------------------------------------
def run_tlsweep(tensors, epochs: int, seed: int):
    from tlsweep.head._train import HeadParams, train_head

    xt, yt, xv, yv = tensors
    hp = HeadParams(
        units=UNITS, dropout=DROPOUT, learning_rate=LR, batch_size=BATCH, epochs=epochs, seed=seed
    )
    t0 = time.perf_counter()
    head = train_head(xt, yt, xv, yv, 2, hp)
    dt = time.perf_counter() - t0
    return dt, head.history[-1].val_accuracy


def build_keras(n_features: int):
    import keras

    model = keras.Sequential(
        [
            keras.Input((n_features,)),
            keras.layers.Dense(UNITS, activation="relu"),
            keras.layers.Dropout(DROPOUT),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(LR), loss="binary_crossentropy", metrics=["accuracy"]
    )
    return model


def run_keras(arrays, epochs: int, seed: int):
    import keras

    xt, yt, xv, yv = arrays
    keras.utils.set_random_seed(seed)
    model = build_keras(xt.shape[1])
    t0 = time.perf_counter()
    hist = model.fit(xt, yt, batch_size=BATCH, epochs=epochs, validation_data=(xv, yv), verbose=0)
    dt = time.perf_counter() - t0
    return dt, float(hist.history["val_accuracy"][-1])


def matmul_rate(n_features: int, seconds: float) -> float:
    """GFLOP/s of [64, F] x [F, 256] matmuls in a compiled loop (result accumulated, so kept)."""
    import tensorflow as tf

    x = tf.random.stateless_uniform((BATCH, n_features), seed=(1, 2))
    w = tf.random.stateless_uniform((n_features, UNITS), seed=(3, 4))

    @tf.function
    def loop(x, w, n):
        acc = tf.zeros((BATCH, UNITS))
        for _ in tf.range(n):
            acc += tf.matmul(x, w)
        return acc

    loop(x, w, tf.constant(2)).numpy()
    flop = 2.0 * BATCH * n_features * UNITS
    n = 8
    while True:  # grow n until one timed call takes about `seconds`
        t0 = time.perf_counter()
        loop(x, w, tf.constant(n)).numpy()
        dt = time.perf_counter() - t0
        if dt >= seconds * 0.5 or n >= 1 << 22:
            return n * flop / dt / 1e9
        n = int(n * min(16.0, max(2.0, seconds / max(dt, 1e-4))))


def head_flop(n_features: int, n_train: int, n_val: int, epochs: int) -> float:
    return epochs * (4.0 * n_features * UNITS * n_train + 2.0 * n_features * UNITS * n_val)


# --- driver --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, weights = setup(args)
    poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]
    for p in poolings:
        if p not in TARGETS:
            sys.exit(f"--poolings: unknown pooling {p!r}; use avg and/or flatten")

    import keras
    import tensorflow as tf

    from tlsweep.head import _graph as head_graph

    feats, tensors, mapped, info = {}, {}, {}, {}
    for p in poolings:
        xt, yt, xv, yv, meta = load_features(data, weights, args.cache_dir.resolve(), p)
        feats[p] = (xt, yt, xv, yv)
        t0 = time.perf_counter()
        tensors[p] = (
            head_graph.as_tensor(xt),
            tf.constant(yt, tf.int64),
            head_graph.as_tensor(xv),
            tf.constant(yv, tf.int64),
        )
        meta["as_tensor_seconds"] = time.perf_counter() - t0
        (mxt, _), (mxv, _) = meta["split"]("train"), meta["split"]("validation")
        del meta["split"]
        mapped[p] = (
            head_graph.as_tensor(mxt),
            tensors[p][1],
            head_graph.as_tensor(mxv),
            tensors[p][3],
        )
        meta.update(n_train=len(yt), n_val=len(yv), n_features=int(xt.shape[1]))
        info[p] = meta
        print(f"[{p}] train {xt.shape}, validation {xv.shape}", flush=True)

    res = {
        p: {
            "tlsweep_first": [],
            "tlsweep_warm": [],
            "tlsweep_mapped": [],
            "keras_fit": [],
            "matmul_gflops": [],
            "acc_tlsweep_first": [],
            "acc_tlsweep_warm": [],
            "acc_tlsweep_mapped": [],
            "acc_keras": [],
        }
        for p in poolings
    }
    for r in range(args.repeats):
        for p in poolings:
            d = res[p]
            seed = r
            if r == 0:  # cold: the compiled functions do not exist yet
                head_graph._FUNCS.clear()
                dt, acc = run_tlsweep(tensors[p], args.epochs, seed)
                d["tlsweep_first"].append(dt)
                d["acc_tlsweep_first"].append(acc)
                print(
                    f"[{r + 1}/{args.repeats}] {p:7} tlsweep first call  {dt:7.2f}s  "
                    f"val_acc {acc:.4f}",
                    flush=True,
                )
            dt, acc = run_tlsweep(tensors[p], args.epochs, seed)
            d["tlsweep_warm"].append(dt)
            d["acc_tlsweep_warm"].append(acc)
            print(
                f"[{r + 1}/{args.repeats}] {p:7} tlsweep warm        {dt:7.2f}s  val_acc {acc:.4f}",
                flush=True,
            )
            dt, acc = run_tlsweep(mapped[p], args.epochs, seed)
            d["tlsweep_mapped"].append(dt)
            d["acc_tlsweep_mapped"].append(acc)
            print(
                f"[{r + 1}/{args.repeats}] {p:7} tlsweep warm mapped {dt:7.2f}s  val_acc {acc:.4f}",
                flush=True,
            )
            dt, acc = run_keras(feats[p], args.epochs, seed)
            d["keras_fit"].append(dt)
            d["acc_keras"].append(acc)
            print(
                f"[{r + 1}/{args.repeats}] {p:7} keras Model.fit     {dt:7.2f}s  val_acc {acc:.4f}",
                flush=True,
            )
            g = matmul_rate(info[p]["n_features"], args.matmul_seconds)
            d["matmul_gflops"].append(g)
            print(
                f"[{r + 1}/{args.repeats}] {p:7} tf.matmul [64,{info[p]['n_features']}]x"
                f"[{info[p]['n_features']},{UNITS}]  {g:7.1f} GFLOP/s",
                flush=True,
            )

    summary = {}
    for p in poolings:
        d, m = res[p], info[p]
        flop = head_flop(m["n_features"], m["n_train"], m["n_val"], args.epochs)
        med = {k: statistics.median(v) for k, v in d.items() if v}
        speedup = med["keras_fit"] / med["tlsweep_warm"]
        speedup_first = med["keras_fit"] / med["tlsweep_first"]
        acc_t = statistics.mean(d["acc_tlsweep_warm"])
        acc_k = statistics.mean(d["acc_keras"])
        summary[p] = {
            "median_seconds": {
                k: med[k] for k in ("tlsweep_first", "tlsweep_warm", "tlsweep_mapped", "keras_fit")
            },
            "speedup_fit_over_tlsweep_warm": speedup,
            "speedup_fit_over_tlsweep_first": speedup_first,
            "per_repeat_speedup": [
                k / t for k, t in zip(d["keras_fit"], d["tlsweep_warm"], strict=True)
            ],
            "val_accuracy": {"tlsweep": acc_t, "keras": acc_k, "diff": acc_t - acc_k},
            "gflop_per_training": flop / 1e9,
            "gflops": {
                "tlsweep_first": flop / med["tlsweep_first"] / 1e9,
                "tlsweep_warm": flop / med["tlsweep_warm"] / 1e9,
                "tlsweep_mapped": flop / med["tlsweep_mapped"] / 1e9,
                "keras_fit": flop / med["keras_fit"] / 1e9,
                "matmul": med["matmul_gflops"],
            },
            "target_speedup": TARGETS[p],
            "speedup_ok": speedup >= TARGETS[p],
            "accuracy_ok": abs(acc_t - acc_k) <= ACC_TOLERANCE,
        }

    print()
    print(
        f"MobileNetV2(alpha={ALPHA}) {SIZE}px features, cats_vs_dogs; head Dense {UNITS} relu "
        f"-> Dropout {DROPOUT} -> Dense 1; Adam {LR:g}, batch {BATCH}, {args.epochs} epochs; "
        f"{args.repeats} repeat(s) (medians); {os.cpu_count()} CPU(s), TF {tf.__version__}, "
        f"Keras {keras.__version__}"
    )
    hdr = (
        f"{'pooling':8}{'features':>9}  {'competitor':26}{'seconds':>9}{'GFLOP/s':>9}"
        f"{'% matmul':>10}{'val_acc':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for p in poolings:
        s, m = summary[p], info[p]
        mm = s["gflops"]["matmul"]
        rows = [
            (
                "tlsweep train_head, first",
                s["median_seconds"]["tlsweep_first"],
                s["gflops"]["tlsweep_first"],
                statistics.mean(res[p]["acc_tlsweep_first"]),
            ),
            (
                "tlsweep train_head, warm",
                s["median_seconds"]["tlsweep_warm"],
                s["gflops"]["tlsweep_warm"],
                s["val_accuracy"]["tlsweep"],
            ),
            (
                "tlsweep train_head, mapped",
                s["median_seconds"]["tlsweep_mapped"],
                s["gflops"]["tlsweep_mapped"],
                statistics.mean(res[p]["acc_tlsweep_mapped"]),
            ),
            (
                "keras Model.fit",
                s["median_seconds"]["keras_fit"],
                s["gflops"]["keras_fit"],
                s["val_accuracy"]["keras"],
            ),
        ]
        for name, sec, g, acc in rows:
            print(
                f"{p:8}{m['n_features']:>9}  {name:26}{sec:9.2f}{g:9.1f}{100 * g / mm:9.0f}%"
                f"{acc:9.4f}"
            )
        print(
            f"{p:8}{m['n_features']:>9}  {'tf.matmul 64xFx256 loop':26}{'':9}{mm:9.1f}{100:9.0f}%"
        )
        ok = "ok" if s["speedup_ok"] else "BELOW TARGET"
        acc_ok = "ok" if s["accuracy_ok"] else "MORE THAN ONE POINT APART"
        print(
            f"{'':19}speed-up fit / tlsweep warm {s['speedup_fit_over_tlsweep_warm']:.2f}x "
            f"(target >= {TARGETS[p]}: {ok}); fit / tlsweep first "
            f"{s['speedup_fit_over_tlsweep_first']:.2f}x; val_acc diff "
            f"{100 * s['val_accuracy']['diff']:+.1f} points ({acc_ok})"
        )
        print()

    if args.json:
        out = {
            "model": f"MobileNetV2(alpha={ALPHA})",
            "input_size": SIZE,
            "data": str(data),
            "weights": str(weights),
            "cache_dir": str(args.cache_dir.resolve()),
            "head": {
                "units": UNITS,
                "dropout": DROPOUT,
                "learning_rate": LR,
                "batch_size": BATCH,
                "epochs": args.epochs,
            },
            "repeats": args.repeats,
            "features": info,
            "runs": res,
            "summary": summary,
            "targets": {"speedup": TARGETS, "val_accuracy_tolerance": ACC_TOLERANCE},
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "loadavg_at_end": os.getloadavg(),
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
