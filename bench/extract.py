"""Benchmark feature extraction: tlsweep cache miss vs. bare forward pass vs. classic recipe.

Measures, in one run and interleaved per repeat (so machine noise hits all three alike), for
MobileNetV2(alpha=0.35) at 160 px with average pooling on every image of the data folder:

  (a) tlsweep end to end on a cache miss in a fresh cache folder: listing the folder, hashing
      every file (the cache key), then ``FeatureCache.ensure`` (model build, header checks,
      decode + resize, forward passes, writing the .npy and the manifest).
  (b) the forward pass alone: every image decoded and resized into memory first (not timed), then
      only the forward passes through the same compiled ``tf.function``. Batch size and passes
      in flight (1, or 2 as tlsweep runs them) are calibrated first and the fastest is kept, so
      this is the machine's limit for this model; (a) cannot beat it.
  (c) the classic Keras recipe: ``ImageDataGenerator(rescale=1/255).flow_from_directory(...,
      batch_size=20, shuffle=False)`` and ``model.predict(batch, verbose=0)`` per batch, over the
      same images (one generator per split folder), timed end to end.

The page cache is warmed first (every file read once), so the disk is not measured.

Each repeat also measures the process's core-seconds (user + system CPU time) of (a) and (b),
and of what (a) does besides forward passes, each alone: listing and hashing the files,
decoding and resizing every image through tlsweep's pipeline, building and tracing the model.
Their sum over the cores is the fastest (a) could possibly be on this machine (perfect packing,
zero overhead), printed as a ceiling for a/b next to the target.

Usage (from the repository root)::

    /work/venv/bin/python bench/extract.py --repeats 3 --json /tmp/bench_extract.json

Targets: a/b >= 0.85 and a/c >= 2.0.

``--together`` measures instead several entries extracted at once (issue 14): 2 backbones
(MobileNetV2 a0.35 and MobileNet a0.25, the shared weights) x 2 input sizes (128 and 160 px),
average pooling, in one run:

  (T) tlsweep end to end on 4 missing entries in a fresh cache (``FeatureCache.ensure_many``:
      listing, hashing, each image decoded once and resized to both sizes, 4 forward passes);
  (D) one decoding of every image, resized to both sizes (tlsweep's pipeline, nothing else);
  (F) each entry's forward passes alone, on images decoded into memory beforehand (batch 32,
      two passes in flight, as tlsweep runs them);
  (S) the 4 entries extracted one after the other, each decoding every image (what tlsweep
      did before entries were extracted together).

Target: T < D + the sum of the four F (one decode shared by every entry, not one per entry).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALPHA, SIZE, add_data_args, mobilenet_v2, setup  # noqa: E402

SPLITS = ("train", "validation", "test")
CANDIDATE_BATCHES = (32, 64, 128, 256)
IN_FLIGHT = (1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, cache=False)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of a, b, c")
    p.add_argument(
        "--forward",
        default="auto",
        metavar="BATCHxIN_FLIGHT",
        help="batch size and passes in flight for (b), the bare forward pass, e.g. 64x1; "
        f"'auto' (default) times batches of {'/'.join(map(str, CANDIDATE_BATCHES))} with "
        f"{' or '.join(map(str, IN_FLIGHT))} in flight once and keeps the fastest",
    )
    p.add_argument(
        "--only",
        default="abc",
        help="which measurements to run, e.g. 'ab' while tuning (default: abc)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here as JSON")
    p.add_argument(
        "--together",
        action="store_true",
        help="instead: 2 backbones x 2 sizes extracted together vs. one decode + 4 forward passes",
    )
    return p.parse_args(argv)


def warm_page_cache(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            total += len(f.read())
    return total


def cpu_s() -> float:
    """Core-seconds this process has used so far (every thread, user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def other_work(bb, data: Path) -> dict[str, float]:
    """Core-seconds of each part of (a) that is not a forward pass, measured alone."""
    from tlsweep.config._schema import DataConfig
    from tlsweep.features import _extract as extraction
    from tlsweep.images._decode import image_batches
    from tlsweep.images._digests import content_digest
    from tlsweep.images._find import find_images

    out = {}
    c = cpu_s()
    images = find_images(DataConfig(dir=data))
    content_digest(images)
    out["list_hash"] = cpu_s() - c
    paths = [images.abspath(f) for f in images.files]
    c = cpu_s()
    for _ in image_batches(paths, SIZE, extraction.EXTRACT_BATCH, prefetch=False):
        pass
    out["decode"] = cpu_s() - c
    c = cpu_s()
    Forward(bb)
    out["build"] = cpu_s() - c
    return out


# --- (a) tlsweep end to end ---------------------------------------------------------------------
def run_tlsweep(bb, data: Path) -> tuple[float, int, dict]:
    from tlsweep.config._schema import DataConfig
    from tlsweep.features._cache import FeatureCache
    from tlsweep.images._digests import content_digest
    from tlsweep.images._find import find_images

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        cache = FeatureCache(Path(tmp) / "cache")
        t0 = time.perf_counter()
        images = find_images(DataConfig(dir=data))  # what `tlsweep extract` does on a miss
        entry, cached = cache.ensure(bb, images, content_digest(images))
        dt = time.perf_counter() - t0
        assert not cached, "expected a cache miss in a fresh cache dir"
        n = len(entry.manifest["files"])
        timings = dict(entry.manifest["timings"])
    return dt, n, timings


# --- (b) the forward pass alone -----------------------------------------------------------------
def decode_all(paths: list[str], batch: int):
    """Every image decoded and resized exactly like tlsweep does, as float32 batches in memory."""
    import tensorflow as tf

    from tlsweep.images._decode import decode_and_resize

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(
        lambda p: decode_and_resize(tf.io.read_file(p), SIZE),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(batch)
    return [tf.identity(x) for x in ds]  # materialised tensors, not re-decoded later


class Forward:
    """tlsweep's own extractor model, called through one compiled tf.function."""

    def __init__(self, bb):
        import tensorflow as tf

        from tlsweep.backbones import _build as bbs

        self.model = bbs.build_extractor(bb)
        spec = tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)
        self.fn = tf.function(
            lambda x: self.model(x, training=False), input_signature=[spec], autograph=False
        )
        self.fn.get_concrete_function()

    def calibrate(self, images, n=1024) -> dict[tuple[int, int], float]:
        """images/s of each (batch size, passes in flight) on the first ``n`` in-memory images."""
        import tensorflow as tf

        sample = tf.concat(images, axis=0)[:n]
        speed = {}
        for bs in CANDIDATE_BATCHES:
            chunks = [sample[i : i + bs] for i in range(0, int(sample.shape[0]), bs)]
            self.fn(chunks[0]).numpy()
            for in_flight in IN_FLIGHT:
                dt, k = self.run(chunks, in_flight)
                speed[(bs, in_flight)] = k / dt
        return speed

    def run(self, batches, in_flight: int) -> tuple[float, int]:
        from tlsweep.features._extract import _forward_all

        n = 0
        t0 = time.perf_counter()
        if in_flight == 1:
            for x in batches:
                n += self.fn(x).numpy().shape[0]
        else:
            for _, out in _forward_all(self.fn, ((None, x) for x in batches), in_flight):
                n += out.shape[0]
        return time.perf_counter() - t0, n


def rebatch(batches, size: int):
    import tensorflow as tf

    whole = tf.concat(batches, axis=0)
    return [whole[i : i + size] for i in range(0, int(whole.shape[0]), size)]


# --- (c) the classic recipe ---------------------------------------------------------------------
def classic_model(weights: Path):
    import keras

    return keras.applications.MobileNetV2(
        alpha=ALPHA,
        include_top=False,
        input_shape=(SIZE, SIZE, 3),
        weights=str(weights),
        pooling="avg",
    )


def run_classic(model, data: Path) -> tuple[float, int]:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    t0 = time.perf_counter()
    n = 0
    gen = ImageDataGenerator(rescale=1 / 255)
    for split in SPLITS:
        d = data / split
        if not d.is_dir():
            continue
        flow = gen.flow_from_directory(
            str(d), target_size=(SIZE, SIZE), batch_size=20, class_mode="binary", shuffle=False
        )
        for _ in range(len(flow)):
            x, _y = next(flow)
            model.predict(x, verbose=0)
            n += x.shape[0]
    return time.perf_counter() - t0, n


# --- --together: several entries from one decode -------------------------------------------------
TOGETHER_SIZES = (128, 160)
MOBILENET_V1 = "mobilenet_2_5_224_tf_no_top.h5"  # MobileNet alpha=0.25, next to the V2 weights


def together_backbones(weights: Path) -> list:
    from tlsweep.config._backbones import resolve_backbone
    from tlsweep.config._schema import BackboneConfig

    v1 = weights.parent / MOBILENET_V1
    if not v1.is_file():
        sys.exit(f"{v1}: no such weights file (MobileNet alpha=0.25, no top)")
    out = []
    for size in TOGETHER_SIZES:
        out.append(BackboneConfig("MobileNetV2", str(weights), size, "avg", args={"alpha": ALPHA}))
        out.append(BackboneConfig("MobileNet", str(v1), size, "avg", args={"alpha": 0.25}))
    return [resolve_backbone(b) for b in out]


def run_together(args: argparse.Namespace, data: Path, weights: Path) -> int:
    import tensorflow as tf

    from tlsweep.config._schema import DataConfig
    from tlsweep.features import _extract as extraction
    from tlsweep.features._cache import FeatureCache
    from tlsweep.features._extract import Job, _forward_all
    from tlsweep.images._decode import decode_and_resize, image_batches
    from tlsweep.images._find import find_images

    wanted = together_backbones(weights)
    images = find_images(DataConfig(dir=data))
    paths = [images.abspath(f) for f in images.files]
    n = len(paths)
    nbytes = warm_page_cache(paths)
    print(f"{n} images under {data} ({nbytes / 1e6:.0f} MB, page cache warmed)", flush=True)

    # (F) each entry's forward passes alone, on images decoded beforehand (not timed)
    forward: dict[str, float] = {}
    forward_cpu: dict[str, float] = {}
    build_cpu: dict[str, float] = {}  # what T pays besides D and F: one model build per entry
    for size in TOGETHER_SIZES:
        ds = tf.data.Dataset.from_tensor_slices(paths).map(
            lambda p, s=size: decode_and_resize(tf.io.read_file(p), s),
            num_parallel_calls=cores(),
            deterministic=True,
        )
        batches = [tf.identity(x) for x in ds.batch(extraction.EXTRACT_BATCH)]
        for bb in (b for b in wanted if b.input_size == size):
            job = Job(bb, {}, "", "", None)
            c = cpu_s()
            job.build(tf)
            build_cpu[bb.label] = cpu_s() - c
            for _ in _forward_all(job.forward, ((None, x) for x in batches[:2])):
                pass  # warm
            c, t0 = cpu_s(), time.perf_counter()
            for _ in _forward_all(job.forward, ((None, x) for x in batches)):
                pass
            forward[bb.label] = time.perf_counter() - t0
            forward_cpu[bb.label] = cpu_s() - c
            print(
                f"(F) {bb.label}: forward passes alone {forward[bb.label]:.2f}s "
                f"({forward_cpu[bb.label]:.1f} core-s)",
                flush=True,
            )
        del batches

    # (D) one decode of every image, resized to both sizes
    c, t0 = cpu_s(), time.perf_counter()
    for _ in image_batches(paths, list(TOGETHER_SIZES), extraction.EXTRACT_BATCH, prefetch=False):
        pass
    decode = time.perf_counter() - t0
    decode_cpu = cpu_s() - c
    print(
        f"(D) one decode, resized to {TOGETHER_SIZES}: {decode:.2f}s ({decode_cpu:.1f} core-s)",
        flush=True,
    )

    # (T) tlsweep, the 4 entries missing, end to end
    with tempfile.TemporaryDirectory(prefix="bench-extract-together-") as tmp:
        c = cpu_s()
        t0 = time.perf_counter()
        found = find_images(DataConfig(dir=data))
        done = FeatureCache(Path(tmp) / "cache").ensure_many(wanted, found)
        together = time.perf_counter() - t0
        together_cpu = cpu_s() - c
        assert not any(cached for _, cached in done)
    # (S) each entry alone, one decode each
    with tempfile.TemporaryDirectory(prefix="bench-extract-separate-") as tmp:
        c = cpu_s()
        t0 = time.perf_counter()
        found = find_images(DataConfig(dir=data))
        cache = FeatureCache(Path(tmp) / "cache")
        for bb in wanted:
            _, cached = cache.ensure(bb, found)
            assert not cached
        separate = time.perf_counter() - t0
        separate_cpu = cpu_s() - c
    print(
        f"(S) the 4 entries one after the other: {separate:.2f}s ({separate_cpu:.1f} core-s); "
        f"T / S = {together / separate:.2f} wall, {together_cpu / separate_cpu:.2f} core-s",
        flush=True,
    )
    budget = decode + sum(forward.values())
    budget_cpu = decode_cpu + sum(forward_cpu.values())
    print(
        f"(T) tlsweep, 4 entries together: {together:.2f}s ({together_cpu:.1f} core-s); "
        f"D + sum(F) = {decode:.2f} + {sum(forward.values()):.2f} = {budget:.2f}s "
        f"({budget_cpu:.1f} core-s)",
        flush=True,
    )
    ok = together < budget
    print(
        f"T / (D + sum F) = {together / budget:.2f} wall, {together_cpu / budget_cpu:.2f} "
        f"core-seconds (target < 1 wall: {'ok' if ok else 'NO'}); the 4 model builds, which "
        f"T pays and D + sum F do not: {sum(build_cpu.values()):.1f} core-s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "images": n,
                    "together_s": together,
                    "together_core_s": together_cpu,
                    "separate_s": separate,
                    "separate_core_s": separate_cpu,
                    "decode_s": decode,
                    "decode_core_s": decode_cpu,
                    "forward_s": forward,
                    "forward_core_s": forward_cpu,
                    "build_core_s": build_cpu,
                    "ok": ok,
                    "cpus": cores(),
                },
                indent=1,
            )
        )
    return 0 if ok else 1


# --- driver -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, weights = setup(args)
    if args.together:
        return run_together(args, data, weights)

    from tlsweep.config._backbones import resolve_backbone
    from tlsweep.config._schema import DataConfig
    from tlsweep.features import _extract as extraction
    from tlsweep.images._find import find_images

    bb = resolve_backbone(mobilenet_v2(weights))
    images = find_images(DataConfig(dir=data))
    paths = [images.abspath(f) for f in images.files]
    print(f"{len(paths)} images under {data}", flush=True)
    t = time.perf_counter()
    nbytes = warm_page_cache(paths)
    print(
        f"warmed the page cache: {nbytes / 1e6:.0f} MB in {time.perf_counter() - t:.1f}s",
        flush=True,
    )
    import tensorflow as tf

    fwd = batches = classic = None
    forward_cfg = None
    if "b" in args.only:
        t = time.perf_counter()
        batches = decode_all(paths, 256)
        print(
            f"(b) decoded {sum(int(b.shape[0]) for b in batches)} images into memory in "
            f"{time.perf_counter() - t:.1f}s (not timed)",
            flush=True,
        )
        fwd = Forward(bb)
        if args.forward == "auto":
            speed = fwd.calibrate(batches)
            forward_cfg = max(speed, key=speed.get)
            print(
                "(b) calibration, images/s by batch x passes in flight: "
                + ", ".join(f"{b}x{k}: {v:.0f}" for (b, k), v in speed.items())
                + f" -> using {forward_cfg[0]}x{forward_cfg[1]}",
                flush=True,
            )
        else:
            bs, _, k = args.forward.partition("x")
            forward_cfg = (int(bs), int(k or 1))
        batches = rebatch(batches, forward_cfg[0])
        fwd.fn(batches[-1]).numpy()
    if "c" in args.only:
        classic = classic_model(weights)
        classic.predict(tf.zeros((20, SIZE, SIZE, 3)), verbose=0)  # build predict_function once

    res: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    core_s: dict[str, list] = {"a": [], "b": [], "other": []}
    counts: dict[str, int] = {}
    a_timings = []
    for r in range(args.repeats):
        if "a" in args.only and "b" in args.only:
            core_s["other"].append(other_work(bb, data))
        if "a" in args.only:
            c = cpu_s()
            dt, n, tm = run_tlsweep(bb, data)
            core_s["a"].append((cpu_s() - c, dt))
            res["a"].append(n / dt)
            counts["a"] = n
            a_timings.append(tm)
            print(
                f"[{r + 1}/{args.repeats}] (a) tlsweep ensure: {n} images in {dt:.2f}s = "
                f"{n / dt:.1f} images/s (model build+trace {tm['build_s']}s, overlapped with "
                f"decoding; all done at {tm['extract_s']}s)",
                flush=True,
            )
        if "b" in args.only:
            c = cpu_s()
            dt, n = fwd.run(batches, forward_cfg[1])
            core_s["b"].append((cpu_s() - c, dt))
            res["b"].append(n / dt)
            counts["b"] = n
            print(
                f"[{r + 1}/{args.repeats}] (b) forward only:   {n} images in {dt:.2f}s = "
                f"{n / dt:.1f} images/s",
                flush=True,
            )
        if "c" in args.only:
            dt, n = run_classic(classic, data)
            res["c"].append(n / dt)
            counts["c"] = n
            print(
                f"[{r + 1}/{args.repeats}] (c) classic recipe: {n} images in {dt:.2f}s = "
                f"{n / dt:.1f} images/s",
                flush=True,
            )

    med = {k: statistics.median(v) for k, v in res.items() if v}
    # Ratios of the medians, and the median of each repeat's own ratio: a, b and c of one repeat
    # run back to back, so a slow spell of the shared machine hits all three of them alike.
    ratios, paired = {}, {}
    for den in "bc":
        if "a" in med and den in med:
            ratios[f"a/{den}"] = med["a"] / med[den]
            paired[f"a/{den}"] = [x / y for x, y in zip(res["a"], res[den], strict=True)]
    targets = {"a/b": 0.85, "a/c": 2.0}

    labels = {
        "a": "tlsweep FeatureCache.ensure (cache miss, end to end)",
        "b": f"forward pass only (in-memory, batch {forward_cfg[0] if forward_cfg else '-'}, "
        f"{forward_cfg[1] if forward_cfg else '-'} in flight)",
        "c": "classic ImageDataGenerator + model.predict (batch 20)",
    }
    print()
    print(
        f"MobileNetV2(alpha={ALPHA}) {SIZE}px avg pooling, {len(paths)} images, "
        f"{args.repeats} repeat(s), {os.cpu_count()} CPU(s), TF {tf.__version__}, "
        f"tlsweep batch {extraction.EXTRACT_BATCH} x {extraction.IN_FLIGHT} in flight"
    )
    print(f"{'':4}{'measurement':58}{'median img/s':>14}{'runs':>26}")
    for k in "abc":
        if k in med:
            runs = ", ".join(f"{v:.0f}" for v in res[k])
            print(f"({k}) {labels[k]:58}{med[k]:14.1f}{runs:>26}")
    for k, v in ratios.items():
        each = ", ".join(f"{x:.2f}" for x in paired[k])
        mp = statistics.median(paired[k])
        ok = "ok" if min(v, mp) >= targets[k] else "below target"
        print(
            f"    {k} of the medians {v:.2f}; per repeat {each} (median {mp:.2f}); "
            f"target >= {targets[k]}: {ok}"
        )

    ceiling = None
    if core_s["other"]:
        # Per repeat: the forward passes' core-seconds from (b), plus the rest measured alone.
        parts = {
            "forward": statistics.median(c for c, _ in core_s["b"]),
            **{
                k: statistics.median(o[k] for o in core_s["other"])
                for k in ("decode", "build", "list_hash")
            },
        }
        total = sum(parts.values())
        n = counts["a"]
        # As many cores as (b) kept busy, not os.cpu_count(): on a shared machine that is what
        # this process actually got, and (b) is the ratio's denominator.
        busy = statistics.median(c / w for c, w in core_s["b"])
        ceiling = {
            "core_s": parts,
            "cores_busy_in_b": busy,
            "images_per_s": n / (total / busy),
            "a_over_b": n / (total / busy) / med["b"],
        }
        a_cpu, a_wall = (statistics.median(x) for x in zip(*core_s["a"], strict=True))
        print(
            f"    (a) used {a_cpu:.1f} core-s in {a_wall:.1f}s ({a_cpu / a_wall:.2f} of "
            f"{cores()} cores busy); its parts measured alone: forward passes "
            f"{parts['forward']:.1f} + decoding {parts['decode']:.1f} + model build and trace "
            f"{parts['build']:.1f} + "
            f"listing and hashing {parts['list_hash']:.1f} = {total:.1f} core-s"
        )
        print(
            f"    ceiling for (a) on the {busy:.2f} cores (b) kept busy, perfectly packed with no "
            "overhead: "
            f"{ceiling['images_per_s']:.0f} images/s, a/b <= {ceiling['a_over_b']:.2f}"
        )

    if args.json:
        out = {
            "model": f"MobileNetV2(alpha={ALPHA})",
            "input_size": SIZE,
            "pooling": "avg",
            "images": len(paths),
            "data": str(data),
            "weights": str(weights),
            "repeats": args.repeats,
            "forward_b": {"batch": forward_cfg[0], "in_flight": forward_cfg[1]}
            if forward_cfg
            else None,
            "a": {"batch": extraction.EXTRACT_BATCH, "in_flight": extraction.IN_FLIGHT},
            "median_images_per_s": med,
            "runs_images_per_s": res,
            "images_counted": counts,
            "ratios": ratios,
            "ratios_per_repeat": paired,
            "targets": targets,
            "a_manifest_timings": a_timings,
            "core_seconds": core_s,
            "ceiling": ceiling,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
