"""Benchmark scale: extraction, cache hit, time per trial and memory on N generated photos.

For each ``--n`` it generates N distinct photos from the shared cats-vs-dogs ones (seeded
crops, flips, sizes and JPEG qualities) into a temporary folder (layout A, 90 % train, 10 %
validation; nothing is stored in the repository), writes a sweep file on MobileNetV2 a0.35 at
160 px (avg pooling, the shared weights) and measures, each phase in a fresh process:

* **extraction**: ``tlsweep extract`` on an empty cache (wall time, images/s, peak RSS);
* **cache hit**: ``tlsweep extract`` again (wall time, peak RSS) next to ``python -c "import
  tlsweep.cli"`` (the start-up it adds to), and inside one process the phases of the hit:
  listing the folder, the key through the stat index, the key by re-reading every byte
  (``--verify``: what every command paid before the index), the entry lookup;
* **trials**: ``train_head`` at fixed head parameters on the cached features loaded as a study
  loads them (``objective.load_features``): seconds per trial and peak RSS.

Usage (from the repository root)::

    /work/main/.venv/bin/python bench/scale.py --n 10000 --n 40000 --json /tmp/bench_scale.json

Targets (issue 14): the cache hit adds under 1 s to start-up at 40 000 photos, and grows with
the number of files, not their bytes; every column grows at most linearly in N.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_data_args, sweep_text  # noqa: E402

sys.path.insert(0, str(REPO))  # this checkout's tlsweep, whatever the venv installed

VALIDATION_EVERY = 10  # every 10th photo goes to validation/
HIT_TARGET_S = 1.0
TRIAL = {"units": 256, "dropout": 0.3, "learning_rate": 1e-3, "batch_size": 64, "epochs": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, cache=False)
    p.add_argument(
        "--n", type=int, action="append", help="photos to generate (repeatable; default 10000)"
    )
    p.add_argument("--trials", type=int, default=3, help="trials timed per N (default 3)")
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate (default: tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated photos and cache")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here as JSON")
    p.add_argument("--phase", choices=("hit", "trials"), help=argparse.SUPPRESS)
    p.add_argument("--sweep", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- generating photos -------------------------------------------------------------------------
def _sources(data: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for split in sorted(p for p in data.iterdir() if p.is_dir()):
        for cls in sorted(p for p in split.iterdir() if p.is_dir()):
            out.setdefault(cls.name, []).extend(str(f) for f in sorted(cls.iterdir()))
    return out


def _make(job: tuple[int, int, str, str, str]) -> int:
    """Photo ``i``: a random crop of a source photo, maybe flipped, resized, JPEG-encoded."""
    import numpy as np
    from PIL import Image

    i, seed, src, dst_dir, cls = job
    rng = np.random.default_rng([seed, i])
    side = int(rng.integers(200, 500))
    with Image.open(src) as im:
        im.draft("RGB", (side, side))  # decode at a reduced scale when the JPEG allows it
        im = im.convert("RGB")
        w, h = im.size
        frac = rng.uniform(0.6, 1.0)
        cw, ch = max(16, int(w * frac)), max(16, int(h * frac))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = side / max(cw, ch)
        im = im.resize((max(16, int(cw * scale)), max(16, int(ch * scale))), Image.BILINEAR)
        out = Path(dst_dir) / f"{cls}.{i}.jpg"
        im.save(out, "JPEG", quality=int(rng.integers(70, 96)))
    return out.stat().st_size


def generate(data: Path, dst: Path, n: int, seed: int) -> dict:
    """N distinct photos under ``dst`` (layout A), in parallel on every core."""
    import numpy as np

    sources = _sources(data)
    classes = sorted(sources)
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        cls = classes[i % len(classes)]
        split = "validation" if (i // len(classes)) % VALIDATION_EVERY == 0 else "train"
        folder = dst / split / cls
        src = sources[cls][int(rng.integers(len(sources[cls])))]
        jobs.append((i, seed, src, str(folder), cls))
    for s in ("train", "validation"):
        for c in classes:
            (dst / s / c).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # spawn, never fork: a forked child of a process with threads (TensorFlow) may crash
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(len(os.sched_getaffinity(0))) as pool:
        sizes = pool.map(_make, jobs, chunksize=64)
    return {"seconds": time.perf_counter() - t0, "bytes": int(sum(sizes))}


# --- one phase in a fresh process --------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its wall time, its own peak RSS (MB, from wait4) and its stdout."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # this child's peak, not the max over children
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{stderr[-3000:]}")
    return {
        "seconds": wall,
        "core_s": usage.ru_utime + usage.ru_stime,  # CPU time: robust on a shared machine
        "stdout": stdout,
        "max_rss_mb": usage.ru_maxrss / 1024.0,
    }


def phase_hit(sweep: Path) -> dict:
    """The phases of a cache hit, timed inside this process (imports excluded)."""
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.features._cache import FeatureCache
    from tlsweep.features._entries import cache_key, check_usable, key_parts
    from tlsweep.images._digests import content_digest
    from tlsweep.images._find import find_images

    t, c = [time.perf_counter()], [time.process_time()]

    def lap() -> None:
        t.append(time.perf_counter())
        c.append(time.process_time())

    cfg = load_sweep(sweep)
    lap()
    images = find_images(cfg.data)
    lap()
    cache = FeatureCache(cfg.cache_dir)
    digest = cache.images_digest(images)
    lap()
    (bb,) = cfg.backbones
    entry = cache.lookup(bb, cache_key(key_parts(bb, digest)))
    assert entry is not None, "no cache entry: the extraction phase did not run"
    check_usable(entry)
    lap()
    full = content_digest(images)  # every byte read, no index: what a hit cost before
    lap()
    assert full == digest
    out: dict[str, float] = {"files": len(images.files)}
    names = ("load_sweep", "find_images", "digest_with_index", "lookup")
    for i, name in enumerate([*names, "digest_reading_every_byte"]):
        out[f"{name}_s"] = t[i + 1] - t[i]
        out[f"{name}_core_s"] = c[i + 1] - c[i]
    out["hit_total_s"] = t[4] - t[0]
    out["hit_total_core_s"] = c[4] - c[0]
    return out


def phase_trials(sweep: Path, trials: int) -> dict:
    """Seconds per trial at fixed head parameters, features loaded as a study loads them."""
    import resource

    import tensorflow as tf  # noqa: F401 - imported before the clock starts

    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.features._cache import FeatureCache
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.images._find import find_images
    from tlsweep.study._objective import load_features

    cfg = load_sweep(sweep)
    (bb,) = cfg.backbones
    entry, cached = FeatureCache(cfg.cache_dir).ensure(bb, find_images(cfg.data))
    assert cached
    t0 = time.perf_counter()
    (fd,) = load_features([(bb, entry)]).values()
    t_load = time.perf_counter() - t0
    times, accs = [], []
    for i in range(trials):
        t = time.perf_counter()
        head = train_head(
            fd.x_train,
            fd.y_train,
            fd.x_val,
            fd.y_val,
            fd.n_classes,
            HeadParams(**TRIAL, seed=i),
        )
        times.append(time.perf_counter() - t)
        accs.append(head.history[-1].val_accuracy)
    return {
        "load_features_s": t_load,
        "trial_s": times,
        "val_accuracy": accs,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


# --- the table ---------------------------------------------------------------------------------
def measure(args: argparse.Namespace, n: int, work: Path) -> dict:
    data, cache, tmp = work / "data", work / "cache", work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"N={n}: generating photos in {data} ...", flush=True)
    gen = generate(args.data, data, n, args.seed)
    print(
        f"  generated {n} photos, {gen['bytes'] / 1e6:.0f} MB, in {gen['seconds']:.0f}s",
        flush=True,
    )
    sweep = tmp / "sweep.yaml"
    sweep.write_text(sweep_text("bench_scale", data, args.weights, cache, tmp))
    py = sys.executable
    # The stat index trusts only files changed more than RACY_NS before the hashing: wait so
    # that the extraction's hashing indexes them all, as it would on a folder not just written.
    from tlsweep.images._digests import RACY_NS

    time.sleep(RACY_NS / 1e9)
    ext = _run([py, "-m", "tlsweep", "extract", str(sweep), "-q"], tmp)
    assert "extracted" in ext["stdout"], ext["stdout"]
    print(
        f"  extraction: {ext['seconds']:.1f}s ({n / ext['seconds']:.0f} images/s), "
        f"peak RSS {ext['max_rss_mb']:.0f} MB",
        flush=True,
    )
    startup = min(
        (_run([py, "-c", "import tlsweep.cli"], tmp) for _ in range(3)), key=lambda r: r["seconds"]
    )
    hits = [_run([py, "-m", "tlsweep", "extract", str(sweep), "-q"], tmp) for _ in range(3)]
    assert all("cache hit" in h["stdout"] for h in hits), hits[0]["stdout"]
    hit = min(hits, key=lambda r: r["seconds"])
    inside = json.loads(
        _run([py, __file__, "--phase", "hit", "--sweep", str(sweep)], tmp)["stdout"]
    )
    print(
        f"  cache hit: `tlsweep extract` {hit['seconds']:.2f}s (start-up `import tlsweep.cli` "
        f"{startup['seconds']:.2f}s), peak RSS {hit['max_rss_mb']:.0f} MB; inside: list "
        f"{inside['find_images_s']:.2f}s + key {inside['digest_with_index_s']:.2f}s + lookup "
        f"{inside['lookup_s']:.2f}s = {inside['hit_total_s']:.2f}s, "
        f"{inside['hit_total_core_s']:.2f} core-s (key reading every byte: "
        f"{inside['digest_reading_every_byte_s']:.2f}s); CLI hit {hit['core_s']:.2f} core-s, "
        f"start-up {startup['core_s']:.2f} core-s",
        flush=True,
    )
    tr = _run(
        [py, __file__, "--phase", "trials", "--sweep", str(sweep), "--trials", str(args.trials)],
        tmp,
    )
    trials = json.loads(tr["stdout"])
    per_trial = min(trials["trial_s"][1:] or trials["trial_s"])
    print(
        f"  trials ({TRIAL}): {', '.join(f'{t:.2f}' for t in trials['trial_s'])} s "
        f"(load_features {trials['load_features_s']:.2f}s), peak RSS {tr['max_rss_mb']:.0f} MB",
        flush=True,
    )
    return {
        "n": n,
        "generated": gen,
        "extract_s": ext["seconds"],
        "extract_rss_mb": ext["max_rss_mb"],
        "startup_s": startup["seconds"],
        "hit_cli_s": hit["seconds"],
        "hit_cli_all_s": [h["seconds"] for h in hits],
        "hit_added_s": hit["seconds"] - startup["seconds"],
        "hit_cli_core_s": hit["core_s"],
        "startup_core_s": startup["core_s"],
        "hit_rss_mb": hit["max_rss_mb"],
        "hit_inside": inside,
        "trial_s": per_trial,
        "trials": trials,
        "trials_rss_mb": tr["max_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "hit":
        print(json.dumps(phase_hit(args.sweep)))
        return 0
    if args.phase == "trials":
        print(json.dumps(phase_trials(args.sweep, args.trials)))
        return 0
    args.data, args.weights = args.data.resolve(), args.weights.resolve()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no such data folder; pass --data")
    if not args.weights.is_file():
        sys.exit(f"{args.weights}: no such weights file; pass --weights")
    rows = []
    for n in args.n or [10000]:
        work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-", dir=args.workdir))
        try:
            rows.append(measure(args, n, work))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{'N':>7} {'MB':>6} {'extract s':>10} {'img/s':>6} {'hit s':>6} {'start s':>8} "
        f"{'hit-start':>9} {'key idx s':>9} {'key all s':>9} {'trial s':>8} "
        f"{'RSS ext':>8} {'RSS hit':>8} {'RSS trial':>9}"
    )
    for r in rows:
        i = r["hit_inside"]
        print(
            f"{r['n']:>7} {r['generated']['bytes'] / 1e6:>6.0f} {r['extract_s']:>10.1f} "
            f"{r['n'] / r['extract_s']:>6.0f} {r['hit_cli_s']:>6.2f} {r['startup_s']:>8.2f} "
            f"{r['hit_added_s']:>9.2f} {i['digest_with_index_s']:>9.2f} "
            f"{i['digest_reading_every_byte_s']:>9.2f} {r['trial_s']:>8.2f} "
            f"{r['extract_rss_mb']:>8.0f} {r['hit_rss_mb']:>8.0f} {r['trials_rss_mb']:>9.0f}"
        )
    ok = all(r["hit_added_s"] < HIT_TARGET_S for r in rows if r["n"] <= 40000)
    print(f"cache hit adds under {HIT_TARGET_S:.0f} s up to 40 000 photos: {'ok' if ok else 'NO'}")
    if args.json:
        out = {
            "rows": rows,
            "trial_params": TRIAL,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
