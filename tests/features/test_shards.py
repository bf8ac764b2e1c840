"""One extraction shared by every worker: shards claimed, taken over, written, assembled.

The fast tests run on the TinyConvNet stand-in (seeded random convolutions) with shards of one
batch of 8 images, so a few dozen real photos make several shards; the same checks on the real
MobileNetV2 are marked slow.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CATS_DOGS, MNV2_WEIGHTS, need_shared, run_cli, small_copy, write_sweep

from tlsweep.config._sweepfile import load_sweep
from tlsweep.features import _cache as F
from tlsweep.features import _entries as E
from tlsweep.features import _extract as X
from tlsweep.features import _shards as S
from tlsweep.features._cache import FeatureCache
from tlsweep.images._find import find_images

BATCH, SHARD_BATCHES = 8, 1  # shards of 8 images: the 49 files below make 7 shards
TINY = {"name": "TinyConvNet", "weights": "none", "input_size": 64, "pooling": "avg"}
MNV2 = {
    "name": "MobileNetV2",
    "weights": str(MNV2_WEIGHTS),
    "input_size": 96,
    "pooling": "avg",
    "args": {"alpha": 0.35},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layout A, 12 + 6 + 6 real photos per class, and one corrupt file: a skipped image moves
    the images of every later batch of its shard, so a shard's batches must never depend on
    who extracts it."""
    need_shared()
    d = tmp_path_factory.mktemp("shard_data")
    small_copy(CATS_DOGS / "train", d / "train", 12, None)
    small_copy(CATS_DOGS / "validation", d / "validation", 6, None)
    small_copy(CATS_DOGS / "test", d / "test", 6, None)
    (d / "train" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return d


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(X, "EXTRACT_BATCH", BATCH)
    monkeypatch.setattr(X, "SHARD_BATCHES", SHARD_BATCHES)
    monkeypatch.setattr(F, "WAIT_POLL", 0.05)


def _sweep(d: Path, data: Path, backbone: dict, cache: Path) -> Path:
    return write_sweep(d / "sweep.yaml", data, backbones=[backbone], cache_dir=cache)


# --- claims ------------------------------------------------------------------------------------
def _shards(tmp_path: Path) -> S.Shards:
    s = S.Shards(tmp_path, "E")
    s.dir.mkdir()
    return s


def _no_lock():  # noqa: ANN202 - a stand-in for the entry lock
    import contextlib

    return contextlib.nullcontext()


def test_of_many_simultaneous_claimers_exactly_one_wins(tmp_path: Path) -> None:
    shards = _shards(tmp_path)
    start = threading.Barrier(16)
    got: list[S.Claim | None] = []

    def claim() -> None:
        start.wait()
        got.append(shards.claim((0, 8), _no_lock))

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in got if c is not None]
    assert len(got) == 16 and len(winners) == 1
    assert shards.live_owner((0, 8)) == f"{socket.gethostname()}:{os.getpid()}"
    assert not shards.claimable((0, 8))
    assert shards.claimable((8, 16))  # another shard is free
    winners[0].release()
    assert shards.claimable((0, 8)) and not list(shards.dir.iterdir())  # no file left


_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tlsweep.features._shards import Claim
    assert Claim.create(Path(sys.argv[1])) is not None
    print("claimed", flush=True)
    time.sleep(600)
    """
)


def test_a_claim_of_a_killed_process_is_taken_over_a_live_one_is_not(tmp_path: Path) -> None:
    shards = _shards(tmp_path)
    path = shards.dir / "000000000-000000008.claim"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert shards.live_owner((0, 8)) == f"{socket.gethostname()}:{holder.pid}"
        assert shards.claim((0, 8), _no_lock) is None  # alive: its claim stands
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert path.exists()  # a kill -9 leaves the claim file behind, but not its lock
    assert shards.live_owner((0, 8)) is None
    claim = shards.claim((0, 8), _no_lock)
    assert claim is not None and path.read_text() == f"{socket.gethostname()}:{os.getpid()}"
    claim.release()


def test_a_claim_from_another_machine_is_taken_over_once_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(S, "CLAIM_STALE_AFTER", 60.0)
    shards = _shards(tmp_path)
    path = shards.dir / "000000000-000000008.claim"
    path.write_text("otherhost:123")  # no lock this machine can see: only its time stamp counts
    assert shards.live_owner((0, 8)) == "otherhost:123"
    assert shards.claim((0, 8), _no_lock) is None
    old = time.time() - 61
    os.utime(path, (old, old))
    assert shards.live_owner((0, 8)) is None
    claim = shards.claim((0, 8), _no_lock)
    assert claim is not None and path.read_text().startswith(socket.gethostname())
    claim.release()
    # a claim of this machine without its lock: its process is gone, taken over at once
    path.write_text(f"{socket.gethostname()}:999999")
    assert shards.live_owner((0, 8)) is None


def test_clear_keeps_a_shard_folder_being_extracted_and_removes_an_abandoned_one(
    tmp_path: Path,
) -> None:
    live, dead = S.Shards(tmp_path, "Live"), S.Shards(tmp_path, "Dead")
    live.dir.mkdir()
    dead.dir.mkdir()
    claim = live.claim((0, 8), _no_lock)
    (dead.dir / "000000000-000000008.claim").write_text(f"{socket.gethostname()}:999999")
    np.savez(dead.dir / "000000008-000000016.npz", features=np.zeros((8, 2)))
    assert FeatureCache(tmp_path).clear() == []  # shard folders are not entries
    assert live.dir.is_dir() and not dead.dir.exists()
    claim.release()


# --- assembly and bit-identical results ----------------------------------------------------------
def test_the_entry_is_published_only_when_every_shard_is_written(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    cfg = load_sweep(_sweep(tmp_path, data, TINY, tmp_path / "cache"))
    (bb,) = cfg.backbones
    images = find_images(cfg.data)
    reference, _ = FeatureCache(tmp_path / "alone").ensure(bb, images)
    n = len(images.files)
    spans = X.shard_spans(n)
    assert len(spans) == 7 and reference.manifest["timings"]["shards"] == 7

    cache = FeatureCache(tmp_path / "cache")
    key = E.cache_key(E.key_parts(bb, cache.images_digest(images)))
    shards = S.Shards(cache.dir, E.entry_name(bb, key))
    shards.dir.mkdir(parents=True)
    held = shards.claim(spans[3], _no_lock)  # another worker is busy with the fourth shard
    got: list = []
    worker = threading.Thread(target=lambda: got.append(cache.ensure(bb, images)))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while sum(shards.is_done(s) for s in spans) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [shards.is_done(s) for s in spans] == [True] * 3 + [False] + [True] * 3
        time.sleep(0.5)  # the worker waits for the held shard: nothing is published
        assert worker.is_alive() and cache.lookup(bb, key) is None
        assert not any(
            p.name.startswith(shards.dir.name[: -len(".shards")] + ".tmp-")
            for p in cache.dir.iterdir()
        )
    finally:
        held.release()  # the other worker gave up: this one takes the shard and finishes
        worker.join(timeout=120)
    ((entry, cached),) = got
    assert not cached and entry.path.name == shards.dir.name[: -len(".shards")]
    assert not shards.dir.exists()  # assembled and cleaned up
    assert np.array_equal(entry.features(), reference.features())
    assert entry.manifest["files"] == reference.manifest["files"]
    assert [s["path"] for s in entry.manifest["skipped"]] == ["train/cats/broken.jpg"]


def test_a_shard_with_no_usable_image_is_written_and_its_files_skipped(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    bad = Path(shutil.copytree(data, tmp_path / "data"))
    for i in range(BATCH):  # the first shard: train/cats/0-broken-*.jpg, first in file order
        (bad / "train" / "cats" / f"0-broken-{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cfg = load_sweep(_sweep(tmp_path, bad, TINY, tmp_path / "cache"))
    ((_, entry, cached),) = F.extract_all(cfg)
    assert not cached
    skipped = sorted(s["path"] for s in entry.manifest["skipped"])
    assert skipped[:BATCH] == [f"train/cats/0-broken-{i}.jpg" for i in range(BATCH)]
    assert np.abs(entry.features()[:BATCH]).sum() == 0  # no image: rows left zero, unused


# Several `tlsweep extract` processes on one cache, with shards of 8 images; each waits for the
# others to be started (TensorFlow imported) and writes its shards slowly, so all take part.
# With a 4th argument, a process takes it as its machine's name: processes of several machines
# on one shared cache folder (each machine extracts; on one machine, one process does).
_EXTRACT = textwrap.dedent(
    """
    import socket, sys, time
    from pathlib import Path
    import tensorflow  # noqa: F401 - the slow part of a start, before the barrier
    from tlsweep.features import _extract as X
    from tlsweep.features import _shards as S
    from tlsweep.cli import main
    X.EXTRACT_BATCH, X.SHARD_BATCHES = {batch}, {shard_batches}
    sweep, ready, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 4:
        socket.gethostname = lambda: sys.argv[4]
    (ready / str(time.time_ns())).touch()
    while len(list(ready.iterdir())) < n:
        time.sleep(0.05)
    write = S.Shards.write
    def slow_write(self, *a, **k):
        write(self, *a, **k)
        print("wrote a shard", flush=True)
        time.sleep({pause})
    S.Shards.write = slow_write
    sys.exit(main(["extract", sweep, "-q"]))
    """
)


def _extract_together(
    d: Path, sweep: Path, n: int, pause: float = 0.5, machines: bool = True
) -> list:
    ready = d / f"ready-{n}"
    ready.mkdir()
    code = _EXTRACT.format(batch=BATCH, shard_batches=SHARD_BATCHES, pause=pause)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(sweep), str(ready), str(n)]
            + ([f"machine-{i}"] if machines else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e[-1500:] for _, e in outs]
    return outs


@pytest.mark.parametrize(
    ("backbone", "n"),
    [
        pytest.param(TINY, 2, id="tiny-2"),
        pytest.param(TINY, 3, id="tiny-3", marks=pytest.mark.slow),
        pytest.param(MNV2, 2, id="mnv2-2", marks=pytest.mark.slow),
        pytest.param(MNV2, 3, id="mnv2-3", marks=pytest.mark.slow),
    ],
)
def test_several_machines_give_the_bytes_of_one(
    tmp_path: Path, data: Path, backbone: dict, n: int, small_shards: None
) -> None:
    cfg = load_sweep(_sweep(tmp_path, data, backbone, tmp_path / "alone"))
    ((bb, one, _),) = F.extract_all(cfg)  # one worker, in this process: every shard in order
    assert one.manifest["timings"]["workers"] == [f"{socket.gethostname()}:{os.getpid()}"]
    d = tmp_path / "together"
    d.mkdir()
    outs = _extract_together(d, _sweep(d, data, backbone, d / "cache"), n)
    (name,) = [p.name for p in (d / "cache").iterdir() if p.is_dir()]  # nothing else left
    entry = E.read_entry(d / "cache" / name)
    assert entry is not None and name == one.path.name
    workers = entry.manifest["timings"]["workers"]
    assert len(workers) == n, (workers, [o for o, _ in outs])  # every machine took shards
    assert sorted(w.partition(":")[0] for w in workers) == [f"machine-{i}" for i in range(n)]
    assert sum("extracted:" in o for o, _ in outs) == 1  # one of them published it
    assert np.array_equal(entry.features(), one.features())
    for k in ("files", "skipped", "shape", "key"):
        assert entry.manifest[k] == one.manifest[k]


@pytest.mark.slow  # three processes (~15 s); the default run has the takeover test below
def test_on_one_machine_one_process_extracts_and_the_others_wait(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    """Local processes do not split an entry (each would pay its own start and split the
    cores the forward passes use already): one extracts every shard, the others wait for it
    and use its entry."""
    cfg = load_sweep(_sweep(tmp_path, data, TINY, tmp_path / "alone"))
    ((_, one, _),) = F.extract_all(cfg)
    d = tmp_path / "together"
    d.mkdir()
    outs = _extract_together(d, _sweep(d, data, TINY, d / "cache"), 3, pause=0.2, machines=False)
    (name,) = [p.name for p in (d / "cache").iterdir() if p.is_dir()]
    entry = E.read_entry(d / "cache" / name)
    assert entry is not None and entry.manifest["timings"]["shards"] == 7
    assert len(entry.manifest["timings"]["workers"]) == 1, [o for o, _ in outs]
    assert np.array_equal(entry.features(), one.features())


def test_a_local_extractor_that_dies_is_taken_over_by_a_waiting_process(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    sweep = _sweep(tmp_path, data, TINY, tmp_path / "cache")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def start(name: str, pause: float) -> subprocess.Popen:
        ready = tmp_path / f"ready-{name}"
        ready.mkdir()
        code = _EXTRACT.format(batch=BATCH, shard_batches=SHARD_BATCHES, pause=pause)
        return subprocess.Popen(
            [sys.executable, "-c", code, str(sweep), str(ready), "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    first = start("first", 300)
    second = None
    try:
        assert first.stdout.readline().strip() == "wrote a shard"  # then it sleeps: killed asleep
        folder = next((tmp_path / "cache").glob("*.shards"))
        second = start("second", 0)
        deadline = time.monotonic() + 120
        while not list((tmp_path / "ready-second").iterdir()):  # started: TF imported
            assert second.poll() is None and time.monotonic() < deadline, second.stderr.read()
            time.sleep(0.05)
        time.sleep(1.0)  # free shards all the while, but this machine's extractor is alive
        assert second.poll() is None
        assert len(list(folder.glob("*.npz"))) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    _, err = second.communicate(timeout=300)  # it takes over the dead one's claim
    assert second.returncode == 0, err[-2000:]
    (entry,) = FeatureCache(tmp_path / "cache").entries()
    assert entry.manifest["timings"]["workers"] == sorted(
        [f"{socket.gethostname()}:{first.pid}", f"{socket.gethostname()}:{second.pid}"]
    )
    cfg = load_sweep(sweep)
    alone, _ = FeatureCache(tmp_path / "alone").ensure(cfg.backbones[0], find_images(cfg.data))
    assert np.array_equal(entry.features(), alone.features())


def test_augmented_views_through_shards_give_the_rows_of_one_stream(
    tmp_path: Path, data: Path, small_shards: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views of the augmented splits (train, then validation and test with tta) land in their
    rows whatever the shards: 7 shards of 8 give the bytes of one shard of every file."""
    tiny = {**TINY, "augment": {"views": 3, "tta": True}}
    cfg = load_sweep(_sweep(tmp_path, data, tiny, tmp_path / "small"))
    ((_, small, _),) = F.extract_all(cfg)
    assert small.manifest["timings"]["shards"] == 7
    monkeypatch.setattr(X, "SHARD_BATCHES", 1000)
    cfg = load_sweep(_sweep(tmp_path, data, tiny, tmp_path / "whole"))
    ((_, whole, _),) = F.extract_all(cfg)
    assert whole.manifest["timings"]["shards"] == 1
    assert small.manifest["views"] == whole.manifest["views"]
    assert whole.manifest["shape"][0] == 49 + 2 * 49  # every split augmented (tta)
    assert np.array_equal(small.features(), whole.features())
    x, _ = small.views("train")
    assert x.shape[0] == 3 and not np.array_equal(x[0], x[1])  # views differ from the image


def test_a_worker_killed_mid_shard_leaves_no_entry_and_a_rerun_reuses_its_shards(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    sweep = _sweep(tmp_path, data, TINY, tmp_path / "cache")
    ready = tmp_path / "ready"
    ready.mkdir()
    code = _EXTRACT.format(batch=BATCH, shard_batches=SHARD_BATCHES, pause=30)
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(sweep), str(ready), "1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    try:
        assert p.stdout.readline().strip() == "wrote a shard"  # then it sleeps: kill it there
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    cache = tmp_path / "cache"
    (folder,) = [x for x in cache.iterdir() if x.is_dir()]
    assert folder.name.endswith(".shards")  # no entry, no temporary entry folder
    assert len(list(folder.glob("*.npz"))) == 1
    assert list(folder.glob("*.claim"))  # the shards it was working on, claimed when killed
    cfg = load_sweep(sweep)
    ((bb, entry, cached),) = F.extract_all(cfg)
    assert not cached
    assert sorted(x.name for x in cache.iterdir() if x.is_dir()) == [entry.path.name]
    workers = entry.manifest["timings"]["workers"]
    assert workers == sorted(
        [f"{socket.gethostname()}:{p.pid}", f"{socket.gethostname()}:{os.getpid()}"]
    )
    alone, _ = FeatureCache(tmp_path / "alone").ensure(bb, find_images(cfg.data))
    assert np.array_equal(entry.features(), alone.features())


def _digest(cfg: object) -> str:
    from tlsweep.images._digests import content_digest

    return content_digest(find_images(cfg.data))  # type: ignore[attr-defined]


def test_ctrl_c_keeps_the_written_shards_and_a_rerun_reuses_them(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    """A real SIGINT mid-extraction: exit 130, the finished shards stay (as after kill -9)."""
    sweep = _sweep(tmp_path, data, TINY, tmp_path / "cache")
    ready = tmp_path / "ready"
    ready.mkdir()
    code = _EXTRACT.format(batch=BATCH, shard_batches=SHARD_BATCHES, pause=30)
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(sweep), str(ready), "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    try:
        assert p.stdout.readline().strip() == "wrote a shard"  # then it sleeps: Ctrl-C there
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 130, err[-2000:]
    cache = tmp_path / "cache"
    (folder,) = [x for x in cache.iterdir() if x.is_dir()]
    assert folder.name.endswith(".shards") and len(list(folder.glob("*.npz"))) == 1
    ((_, entry, cached),) = F.extract_all(load_sweep(sweep))
    assert not cached and f"{socket.gethostname()}:{p.pid}" in entry.manifest["timings"]["workers"]


def test_cache_clear_during_an_extraction_breaks_nothing(
    tmp_path: Path, data: Path, small_shards: None
) -> None:
    """`cache clear` in another process, again and again while `extract` runs: the extraction
    finishes, extracts each shard once, and its entry is published."""
    sweep = _sweep(tmp_path, data, TINY, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache")
    ready = tmp_path / "ready"
    ready.mkdir()
    code = _EXTRACT.format(batch=BATCH, shard_batches=SHARD_BATCHES, pause=0.3)
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(sweep), str(ready), "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    removed: list[str] = []
    clears = 0
    cfg = load_sweep(sweep)
    entry_name = E.entry_name(
        cfg.backbones[0], E.cache_key(E.key_parts(cfg.backbones[0], _digest(cfg)))
    )
    try:
        while p.poll() is None and cache.dir.is_dir() is False:
            time.sleep(0.05)
        while p.poll() is None:
            removed += cache.clear()  # this process: another one than the extraction
            clears += 1
            time.sleep(0.01)
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err[-2000:]
    n_shards = len(X.shard_spans(len(find_images(cfg.data).files)))
    assert out.count("wrote a shard") == n_shards and clears > n_shards, (out, clears)
    assert "extracted" in out and "Traceback" not in err, out
    # only the complete entry may have gone (after its publication), never a folder being written
    assert removed in ([], [entry_name]), removed
    assert not [x for x in cache.dir.iterdir() if ".tmp-" in x.name or x.suffix == ".shards"]


@pytest.mark.slow
def test_run_with_workers_extracts_in_the_workers(tmp_path: Path, data: Path) -> None:
    search = {
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "space": {"units": 8, "learning_rate": 1e-2, "batch_size": 16, "epochs": 1},
    }
    sweep = write_sweep(tmp_path / "sweep.yaml", data, backbones=[TINY], search=search)
    r = run_cli("run", str(sweep), "--workers", "2", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    (entry,) = FeatureCache(tmp_path / "cache").entries()
    workers = entry.manifest["timings"]["workers"]
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".shards")]
    # 49 files at the default shard size: one shard, which one worker extracted
    assert entry.manifest["timings"]["shards"] == 1 and len(workers) == 1
