"""Benchmark one extraction shared by 1 or 2 local workers (issue 14, item 3).

``tlsweep run --workers N`` starts its N worker processes on the missing entries first
(:func:`tlsweep.study._launch.extract_in_workers`: on one machine one of them extracts an entry with
every core while the others wait), then lets them run the trials. This bench runs that first
part, with N = 1 and N = 2, on every image of the data folder (MobileNetV2 a0.35, 160 px,
average pooling), each time into a fresh cache folder, interleaved per repeat so that machine
noise hits both alike. It reports the wall time until the entry is published, the core-seconds
of the worker processes (user + system), the ratio 2 / 1 of both, and checks that the two
entries' features are bit-identical.

The page cache is warmed first (every file read once), so the disk is not measured.

Usage (from the repository root)::

    /work/main/.venv/bin/python bench/shards.py --repeats 2 --json /tmp/bench_shards.json

Target: the wall time with 2 workers is not above the wall time with 1 (ratio <= 1.0).

``--before DIR`` compares instead the whole ``tlsweep run --workers 2`` (2 trials of one epoch,
fresh cache) between the code at DIR (put first on PYTHONPATH: a checkout of the code before
shards, where the parent extracted alone and then started the workers) and this code (the
workers extract together, then run the trials): wall time and core-seconds of all processes.

``--postgres URL`` checks instead the whole ``tlsweep run --workers 3`` on a PostgreSQL storage
(MLflow in a SQLite file): it samples every process of the run (the parent, the 3 workers, which
extract then run the trials) twice a second and reports each one's peak VmRSS, then extracts
the same entry in one ``tlsweep extract`` process into another cache folder and checks that the
features are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_data_args, mobilenet_v2, setup  # noqa: E402


def _sweep(folder: Path, data: Path, weights: Path) -> Path:
    bb = mobilenet_v2(weights)
    doc = {
        "study": "bench-shards",
        "data": {"dir": str(data)},
        "backbones": [
            {
                "name": bb.name,
                "weights": bb.weights,
                "input_size": bb.input_size,
                "pooling": bb.pooling,
                "args": dict(bb.args),
            }
        ],
        "cache_dir": str(folder / "cache"),
        "storage": f"sqlite:///{folder / 'optuna.db'}",
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _one(data: Path, weights: Path, workers: int) -> dict:
    from tlsweep.features._cache import FeatureCache
    from tlsweep.study._launch import extract_in_workers, stop_held

    folder = Path(tempfile.mkdtemp(prefix=f"bench-shards-{workers}-"))
    sweep = _sweep(folder, data, weights)
    cache = FeatureCache(folder / "cache")
    cpu, t = _children_cpu(), time.perf_counter()
    argv = ["run", str(sweep), "--workers", "1", "-q"]
    held = extract_in_workers(workers, argv, {}, lambda: bool(cache.entries()))
    wall = time.perf_counter() - t
    stop_held(held)  # no trials: they stop (their CPU time is counted once they have)
    cpu = _children_cpu() - cpu
    (entry,) = FeatureCache(folder / "cache").entries()
    return {
        "workers": workers,
        "wall_s": round(wall, 2),
        "core_s": round(cpu, 2),
        "images": len(entry.manifest["files"]),
        "shards": entry.manifest["timings"]["shards"],
        "took_part": len(entry.manifest["timings"]["workers"]),
        "entry": str(entry.path),
    }


def _tree(root: int) -> dict[int, str]:
    """The processes under ``root`` (pid -> command line)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            out[pid] = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
        except OSError:
            continue
        todo += [c for c, p in parents.items() if p == pid]
    return out


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def postgres(data: Path, weights: Path, url: str, workers: int = 3) -> int:
    import subprocess

    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="bench-shards-pg-"))
    sweep = _sweep(folder, data, weights)
    doc = yaml.safe_load(sweep.read_text())
    doc["study"] = f"bench-shards-{os.getpid()}"
    doc["search"] = {
        "n_trials": 6,
        "sampler": "random",
        "space": {"units": 64, "learning_rate": 1e-3, "batch_size": 64, "epochs": 5},
    }
    sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "tlsweep", "run", str(sweep), "--workers", str(workers)]
    t = time.perf_counter()
    p = subprocess.Popen([*cmd, "--storage", url, "-q"], env=env)
    peak: dict[int, tuple[str, float]] = {}
    while p.poll() is None:
        for pid, line in _tree(p.pid).items():
            rss = _rss_mb(pid)
            if rss is not None and rss > peak.get(pid, ("", 0.0))[1]:
                role = "worker" if "--worker-index" in line else "parent"  # or its stderr filter
                peak[pid] = (role, rss)
        time.sleep(0.5)
    wall = time.perf_counter() - t
    print(f"run --workers {workers} on PostgreSQL: exit {p.returncode}, {wall:.1f} s")
    for pid, (role, rss) in sorted(peak.items(), key=lambda x: (x[1][0], x[0])):
        print(f"  {role:8} pid {pid}: peak VmRSS {rss:.0f} MB")
    (entry,) = [x for x in (folder / "cache").iterdir() if x.is_dir()]
    alone = folder / "alone"
    doc["cache_dir"] = str(alone)
    sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
    subprocess.run(
        [sys.executable, "-m", "tlsweep", "extract", str(sweep), "-q"], env=env, check=True
    )
    (single,) = [x for x in alone.iterdir() if x.is_dir()]
    a, b = np.load(entry / "features.npy"), np.load(single / "features.npy")
    manifest = json.loads((entry / "manifest.json").read_text())
    identical = bool(np.array_equal(a, b)) and entry.name == single.name
    print(
        f"entry {entry.name}: {manifest['timings']['shards']} shards by "
        f"{len(manifest['timings']['workers'])} workers; bit-identical to one worker: {identical}"
    )
    shutil.rmtree(folder, ignore_errors=True)
    return 0 if identical and p.returncode == 0 else 1


def before_after(data: Path, weights: Path, before: Path, repeats: int) -> int:
    import subprocess

    runs = []
    for r in range(repeats):
        for label in ("before", "now") if r % 2 == 0 else ("now", "before"):
            folder = Path(tempfile.mkdtemp(prefix=f"bench-shards-{label}-"))
            sweep = _sweep(folder, data, weights)
            doc = yaml.safe_load(sweep.read_text())
            doc["search"] = {
                "n_trials": 2,
                "sampler": "random",
                "space": {"units": 8, "learning_rate": 1e-3, "batch_size": 64, "epochs": 1},
            }
            sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
            code = str(before) if label == "before" else str(REPO)
            env = {**os.environ, "PYTHONPATH": code, "TF_CPP_MIN_LOG_LEVEL": "2"}
            cpu, t = _children_cpu(), time.perf_counter()
            cmd = [sys.executable, "-m", "tlsweep", "run", str(sweep), "--workers", "2", "-q"]
            # cwd: not the checkout, which `python -m` would put first on sys.path
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=folder)
            wall, cpu = time.perf_counter() - t, _children_cpu() - cpu
            runs.append({"code": label, "wall_s": round(wall, 1), "core_s": round(cpu, 1)})
            print(f"repeat {r}: {label}: {wall:.1f} s wall, {cpu:.1f} core-s", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    for label in ("before", "now"):
        mine = [x for x in runs if x["code"] == label]
        print(
            f"{label}: median {statistics.median(x['wall_s'] for x in mine):.1f} s wall, "
            f"{statistics.median(x['core_s'] for x in mine):.1f} core-s"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(p, cache=False)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--postgres", metavar="URL", help="check run --workers 3 on this storage")
    p.add_argument("--before", type=Path, help="compare run --workers 2 with the code at DIR")
    args = p.parse_args()
    data, weights = setup(args)
    if args.postgres:
        return postgres(data, weights, args.postgres)
    if args.before:
        return before_after(data, weights, args.before.resolve(), args.repeats)
    import numpy as np

    from tlsweep.config._schema import DataConfig
    from tlsweep.images._find import find_images

    images = find_images(DataConfig(dir=data))
    for f in images.files:  # warm the page cache
        Path(images.abspath(f)).read_bytes()
    print(f"{len(images.files)} images, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    runs: list[dict] = []
    for r in range(args.repeats):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        for n in order:
            res = _one(data, weights, n)
            res["repeat"] = r
            runs.append(res)
            print(
                f"repeat {r}: {n} worker(s): {res['wall_s']:.1f} s wall, {res['core_s']:.1f} "
                f"core-s, {res['shards']} shards by {res['took_part']} process(es)",
                flush=True,
            )
    one = [x for x in runs if x["workers"] == 1]
    two = [x for x in runs if x["workers"] == 2]
    a = np.load(Path(one[0]["entry"]) / "features.npy")
    b = np.load(Path(two[0]["entry"]) / "features.npy")
    identical = bool(np.array_equal(a, b))
    summary = {
        "wall_1": statistics.median(x["wall_s"] for x in one),
        "wall_2": statistics.median(x["wall_s"] for x in two),
        "core_1": statistics.median(x["core_s"] for x in one),
        "core_2": statistics.median(x["core_s"] for x in two),
        "bit_identical": identical,
        "load_after": os.getloadavg()[0],
    }
    summary["wall_ratio_2_over_1"] = round(summary["wall_2"] / summary["wall_1"], 3)
    summary["core_ratio_2_over_1"] = round(summary["core_2"] / summary["core_1"], 3)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    for x in runs:
        shutil.rmtree(Path(x["entry"]).parents[1], ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
