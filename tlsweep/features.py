"""Feature extraction and the on-disk, content-addressed feature cache.

One cache entry per (backbone, weights identity, input size, pooling, preprocessing, constructor
arguments, image content and labels, library versions). An entry is a folder::

    <cache_dir>/<Backbone>-<size>-<pooling>-<key16>/
        manifest.json   # key, shapes, class names, files, skipped files, timings (written last)
        features.npy    # float32 [rows, dim], memory-mappable, never pickled

With augmented views (``augment:``), rows ``0 .. n`` are view 0 (the plain image) of every file
and views ``1 .. K - 1`` follow, one block each, holding the files of the augmented splits (the
training split, every split with ``tta``), which come first in the row order; the manifest's
``views`` says where (:meth:`Entry.views`).

It is written under a temporary name and renamed into place; an entry whose manifest is missing,
unreadable or does not match its key and arrays is never used. Extraction streams batches to a
memory-mapped ``.npy`` file, so a dataset larger than memory works. A per-entry file lock makes
concurrent workers extract each entry once: the others wait, and because the lock dies with its
process, a worker that died while extracting is taken over.

Computing a key imports no TensorFlow, and reads only the images whose stat changed: a stat
index per data folder (``<cache_dir>/stat-index-<hash of the folder's path>.json``) maps each
file's (size, mtime, ctime, inode, device) to its content digest (see
:func:`tlsweep.data.file_digests`), so a cache hit costs one ``stat`` per image, whatever
their size. ``verify`` (``--verify``, ``data.verify``) reads every image.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep import backbones as bbs
from tlsweep.config import BackboneConfig, SweepConfig
from tlsweep.data import (
    SPLITS,
    ImageSet,
    ViewsVariant,
    content_digest,
    decoded_chunks,
    file_digest,
    find_images,
    path_seeds,
    read_failure,
    variant_pixels,
    why_skipped,
)
from tlsweep.errors import DataError, TlsweepError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
STAT_INDEX_PREFIX = "stat-index-"  # a file in the cache folder per data folder
# Images per forward pass, two passes in flight (see _forward_all). Measured on 2 cores with
# MobileNetV2 a0.35 at 160 px: 32 with two in flight beats 64, 128 or 256 with one.
EXTRACT_BATCH = 32
IN_FLIGHT = 2
# Batches per decoded chunk when several entries are extracted together (see _extract).
MULTI_CHUNK_BATCHES = 8
VIEWS_CHUNK_BYTES = 256 << 20  # at most this much decoded image data per chunk with views
Progress = Callable[[int, int], None]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _weights_digest(path: Path) -> str:
    """The digest of a weights file, remembered per (path, size, mtime) within a process."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = file_digest(str(path))
    return _DIGESTS[memo]


def weights_identity(bb: BackboneConfig, fetch: bool = True) -> str | None:
    """What identifies the weights: the bytes of the file Keras loads for ``imagenet``, the
    seeded random init for ``none``, or the bytes of a weights file.

    The ImageNet file is the one Keras loads from ``$KERAS_HOME/models`` (found without
    importing TensorFlow, so a cache hit stays fast). When it is not there yet (first run,
    online), ``fetch`` builds the model once so Keras downloads it, and the identity is known
    from then on; without ``fetch`` the identity is unknown (None).
    """
    if bb.weights == "imagenet":
        path = bbs.imagenet_weights_path(bb)
        if not path.is_file():
            if not fetch:
                return None
            path = bbs.fetch_imagenet_weights(bb)
        return f"imagenet:{path.name}:{_weights_digest(path)}"
    if bb.weights == "none":
        return f"random-seed-{bbs.RANDOM_WEIGHTS_SEED}"
    return f"file:{_weights_digest(Path(bb.weights))}"


def key_parts(bb: BackboneConfig, images_digest: str, fetch: bool = True) -> dict[str, Any]:
    """Everything that changes the features, as a JSON-able dict (``weights`` is None when the
    ImageNet file is not downloaded yet and ``fetch`` is False). Augmented views add their
    settings (``augment``); an entry without them keeps the key it always had."""
    parts = {
        "format": CACHE_FORMAT,
        "backbone": bb.name,
        "args": {k: bb.args[k] for k in sorted(bb.args)},
        "weights": weights_identity(bb, fetch),
        "input_size": bb.input_size,
        "pooling": bb.pooling,
        "preprocessing": bbs.preprocessing_name(bb),
        "resize": "bilinear-squash",
        "images": images_digest,
        "versions": {p: _version(p) for p in ("keras", "tensorflow")},
    }
    if bb.augment is not None:
        parts["augment"] = bb.augment.key()
    return parts


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_name(bb: BackboneConfig, key: str) -> str:
    views = f"-views{bb.augment.views}" if bb.augment is not None else ""
    return f"{bb.name}-{bb.input_size}-{bb.pooling}{views}-{key[:16]}"


@dataclass
class Entry:
    """A complete, verified cache entry."""

    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    def features(self) -> np.ndarray:
        """All rows, memory-mapped read-only."""
        return np.load(self.path / "features.npy", mmap_mode="r", allow_pickle=False)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split, in file order; empty arrays if the split is empty.

        The features of a split stored in one block of rows (every entry extracted since rows
        are grouped by split) are a slice of the file's memory map, copy-on-write: writes would
        stay in this process and never reach the file. Writable, so that TensorFlow can read
        the mapped pages in place (:func:`tlsweep.head.as_tensor`); the page cache holding them
        is shared by every process on the machine. Other entries give an in-memory copy.
        """
        rows = [(f["row"], f["label"]) for f in self.manifest["files"] if f["split"] == name]
        feats = np.load(self.path / "features.npy", mmap_mode="c", allow_pickle=False)
        if not rows:
            return np.zeros((0, feats.shape[1]), np.float32), np.zeros((0,), np.int64)
        idx = np.array([r for r, _ in rows], dtype=np.int64)
        labels = np.array([lab for _, lab in rows], dtype=np.int64)
        if np.all(np.diff(idx) == 1):
            return feats[idx[0] : idx[-1] + 1], labels
        return np.asarray(feats[idx]), labels

    def split_sizes(self) -> dict[str, int]:
        out = {"train": 0, "validation": 0, "test": 0}
        for f in self.manifest["files"]:
            out[f["split"]] += 1
        return out

    def views(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split with every view the entry holds of it:
        ``[views, n, dim]`` (view 0 the plain image, in memory) for a split with augmented views,
        else what :meth:`split` gives, ``[n, dim]``.

        The rows of view ``v >= 1`` are ``base + (v - 1) * rows + row``: every view's block
        holds the first ``rows`` rows, the augmented splits (train first, see ``_extract``).
        """
        x, y = self.split(name)
        info = self.manifest.get("views")
        if not info or name not in info["splits"] or len(y) == 0:
            return x, y
        idx = np.array(
            [f["row"] for f in self.manifest["files"] if f["split"] == name], dtype=np.int64
        )
        feats = np.load(self.path / "features.npy", mmap_mode="r", allow_pickle=False)
        base, rows = info["base"], info["rows"]
        out = np.empty((info["count"], len(idx), feats.shape[1]), np.float32)
        out[0] = x
        for v in range(1, info["count"]):
            out[v] = feats[base + (v - 1) * rows + idx]
        return out, y


def _read_entry(path: Path, key: str | None = None) -> Entry | None:
    """The entry at ``path`` if complete and consistent, else None (never raises)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != CACHE_FORMAT or not manifest.get("complete"):
            return None
        if key is not None and manifest.get("key") != key:
            return None
        if cache_key(manifest["key_parts"]) != manifest["key"]:
            return None
        arr = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
        if list(arr.shape) != manifest["shape"] or str(arr.dtype) != manifest["dtype"]:
            return None
        rows = [f["row"] for f in manifest["files"]]
        views = manifest.get("views")
        end = arr.shape[0] if not views else views["base"]
        if views and views["base"] + (views["count"] - 1) * views["rows"] != arr.shape[0]:
            return None
        if rows and (min(rows) < 0 or max(rows) >= end):
            return None
        return Entry(path=path, manifest=manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _entry_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """An exclusive lock per entry; the OS releases it if the holder dies.

    ``cache clear`` may delete a lock file nobody holds; a process that opened it just before
    would then lock a deleted file while a newcomer locks a new one, so the lock is taken
    again until the file locked is the one at the path.
    """
    lock_path = cache_dir / f"{name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process extracting %s", name)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                continue  # finally: unlock and close, then lock the file now at the path
            yield
            return
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _tmp_name(name: str) -> str:
    """A temporary entry folder's name: which host and process are writing it."""
    return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# A temporary folder written from another machine (a cache on a network share), whose lock this
# machine cannot see, is taken as abandoned once it has not changed for this long.
ABANDONED_AFTER = 24 * 3600


def _in_progress(tmp: Path, locked: bool) -> bool:
    """Whether a temporary entry folder may belong to an extraction still running: its entry
    lock is held (``locked``), or it was written from another machine not long ago."""
    if locked:
        return True
    parts = tmp.name.split(".tmp-", 1)[1].rsplit("-", 2) if ".tmp-" in tmp.name else []
    if len(parts) < 3 or parts[0] == socket.gethostname():  # this machine (or an old name)
        return False  # its lock is free: the process that wrote it is gone
    try:
        return time.time() - tmp.stat().st_mtime < ABANDONED_AFTER
    except FileNotFoundError:
        return False


def _lock_held(path: Path) -> bool:
    """Whether another process holds the entry lock ``path`` (an extraction in progress)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases our lock, if we got it
    return False


class FeatureCache:
    """The cache folder: lookup, extraction with publication, listing and clearing."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TlsweepError(
                f"{self.dir}: cannot create the cache folder ({e.strerror}); "
                "set cache_dir or pass --cache-dir"
            ) from None

    def stat_index(self, data_dir: str | Path) -> Path:
        """Where the stat index of the images under ``data_dir`` lives (by its absolute path)."""
        folder = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:24]
        return self.dir / f"{STAT_INDEX_PREFIX}{folder}.json"

    def images_digest(self, images: ImageSet, verify: bool = False) -> str:
        """:func:`~tlsweep.data.content_digest` through this cache's stat index of the folder."""
        self._mkdir()
        return content_digest(images, index=self.stat_index(images.root), verify=verify)

    def lookup(self, bb: BackboneConfig, key: str) -> Entry | None:
        return _read_entry(self.dir / entry_name(bb, key), key)

    def entries(self) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.iterdir()):
            if p.is_dir() and ".tmp-" not in p.name:
                e = _read_entry(p)
                if e is not None:
                    out.append(e)
        return out

    def clear(self, match: str | None = None) -> list[str]:
        """Remove entries (all, or those whose name contains ``match``) and leftovers; without
        ``match``, the stat indexes of the data folders too (they are a cache as well). An
        extraction in progress (its lock held, its temporary folder alive) is left alone."""
        removed = []
        if not self.dir.is_dir():
            return removed
        for p in sorted(self.dir.iterdir()):
            if match and match not in p.name:
                continue
            if p.is_dir():
                lock = self.dir / f"{p.name.split('.tmp-')[0]}.lock"
                if ".tmp-" in p.name and _in_progress(p, _lock_held(lock)):
                    log.info("%s: an extraction in progress; left alone", p.name)
                    continue
                shutil.rmtree(p, ignore_errors=True)
                if ".tmp-" not in p.name:
                    removed.append(p.name)
            elif (p.suffix == ".lock" and not _lock_held(p)) or (
                match is None and p.name.lstrip(".").startswith(STAT_INDEX_PREFIX)
            ):
                with contextlib.suppress(OSError):
                    p.unlink()
        return removed

    def ensure(
        self,
        bb: BackboneConfig,
        images: ImageSet,
        images_digest: str | None = None,
        progress: Progress | None = None,
    ) -> tuple[Entry, bool]:
        """The entry for ``bb`` on ``images``, extracting it if needed; (entry, was_cached)."""
        return self.ensure_many([bb], images, images_digest, [progress])[0]

    def ensure_many(
        self,
        backbones: list[BackboneConfig],
        images: ImageSet,
        images_digest: str | None = None,
        progress: list[Progress | None] | None = None,
    ) -> list[tuple[Entry, bool]]:
        """The entry of each backbone on ``images``; (entry, was_cached) per backbone, in order.

        The missing entries are extracted together: each image is decoded once, resized to
        every input size they need, and goes through every backbone's forward pass.
        """
        digest = images_digest or self.images_digest(images)
        out: list[tuple[Entry, bool] | None] = [None] * len(backbones)
        jobs: list[tuple[int, _Job]] = []
        first: dict[str, int] = {}  # entry name -> the first backbone asking for it
        same: list[tuple[int, int]] = []
        for k, bb in enumerate(backbones):
            parts = key_parts(bb, digest)
            key = cache_key(parts)
            name = entry_name(bb, key)
            if name in first:
                same.append((k, first[name]))
                continue
            first[name] = k
            hit = self.lookup(bb, key)
            if hit is not None:
                log.info("cache hit: %s", name)
                out[k] = (hit, True)
            else:
                jobs.append((k, _Job(bb, parts, key, name, progress[k] if progress else None)))
        if jobs:
            self._mkdir()
            with contextlib.ExitStack() as locks:
                for name in sorted({job.name for _, job in jobs}):  # one order: no deadlock
                    locks.enter_context(_entry_lock(self.dir, name))
                todo: list[tuple[int, _Job]] = []
                for k, job in jobs:
                    # another worker may have finished it while we waited
                    hit = self.lookup(job.bb, job.key)
                    if hit is not None:
                        log.info("cache hit: %s (extracted by another worker)", job.name)
                        out[k] = (hit, True)
                        continue
                    for stale in self.dir.glob(f"{job.name}.tmp-*"):
                        if not _in_progress(stale, locked=False):  # we hold the lock; others'
                            shutil.rmtree(stale, ignore_errors=True)
                    final = self.dir / job.name
                    if final.exists():  # a damaged entry: never used, replaced
                        hit = _read_entry(final, job.key)  # unless another machine published it
                        if hit is not None:
                            out[k] = (hit, True)
                            continue
                        log.warning("replacing damaged cache entry %s", job.name)
                        shutil.rmtree(final, ignore_errors=True)
                    todo.append((k, job))
                if todo:
                    entries = self._extract([job for _, job in todo], images)
                    for (k, _), entry in zip(todo, entries, strict=True):
                        out[k] = (entry, False)
        for k, j in same:
            out[k] = out[j]
        return out  # type: ignore[return-value]

    def _extract(self, jobs: list[_Job], images: ImageSet) -> list[Entry]:
        import tensorflow as tf

        t0 = time.perf_counter()
        # Rows grouped by split (train, validation, test), each in file order: a split is one
        # block of the .npy, which training maps without a copy (Entry.split). Layout A is in
        # that order already; layout B's files are in path order, their splits interleaved.
        rank = {s: i for i, s in enumerate(SPLITS)}
        order = sorted(range(len(images.files)), key=lambda i: rank[images.files[i].split])
        row_of = np.empty(len(order), dtype=np.int64)
        row_of[order] = np.arange(len(order))
        paths = [images.abspath(images.files[i]) for i in order]
        n = len(paths)
        for job in jobs:
            job.plan_views(n, [images.files[i].split for i in order])
        # One decode per image for every entry: resized once per distinct input size, and
        # augmented once per distinct set of views.
        sizes = sorted({job.bb.input_size for job in jobs})
        augmented = sorted({job.variant for job in jobs if job.variant is not None})
        variants: list[Any] = [*sizes, *augmented]
        slot = {v: i for i, v in enumerate(variants)}
        ready = threading.Event()
        if len(jobs) == 1 and not augmented:
            chunks = decoded_chunks(paths, sizes[0], EXTRACT_BATCH, first_until=ready)
        else:
            # Chunks of MULTI_CHUNK_BATCHES batches (fewer when views make them large): each
            # entry's passes read the images of its size in turn, from memory shared by all.
            pixels = sum(variant_pixels(v) for v in variants)
            per_batch = EXTRACT_BATCH * pixels * 3 * 4
            chunks = decoded_chunks(
                paths,
                variants,
                EXTRACT_BATCH,
                chunk_bytes=(
                    max(per_batch, min(MULTI_CHUNK_BATCHES * per_batch, VIEWS_CHUNK_BYTES))
                    if augmented
                    else MULTI_CHUNK_BATCHES * per_batch
                ),
                first_until=ready,
                seeds=path_seeds([images.files[i].path for i in order]) if augmented else None,
            )
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlsweep-decode") as decoder:
            # The first chunk decodes (on the decoding threads, mostly without the GIL) while
            # this thread builds the models and traces the forward passes: a second of Python
            # per model that leaves the other core free. It stops once the models are ready.
            first = decoder.submit(next, chunks, None)
            try:
                for job in jobs:
                    job.build(tf)
                    job.t_build = time.perf_counter() - t0
                    if weights_identity(job.bb, fetch=False) != job.parts["weights"]:
                        raise TlsweepError(
                            f"{job.bb.label}: its weights file changed while the features were "
                            "being extracted; run again"
                        )
            finally:
                ready.set()
            chunk = first.result()

        if len(jobs) == 1 and not augmented:
            # One stream of batches: the next chunk decodes when the forward passes reach the
            # end of this one, while the last of them is still running (the passes never drain).
            (job,) = jobs
            batches = itertools.chain(chunk or [], itertools.chain.from_iterable(chunks))
            stream: Iterator[tuple[_Job, np.ndarray, int, Any]] = (
                (job, idx, 0, out) for idx, out in _forward_all(job.forward, batches)
            )
        else:
            stream = _forward_each(jobs, itertools.chain([chunk] if chunk else [], chunks), slot)
        del chunk

        try:
            for job in jobs:
                job.tmp = self.dir / _tmp_name(job.name)
                job.tmp.mkdir()
                job.feats = np.lib.format.open_memmap(
                    job.tmp / "features.npy",
                    mode="w+",
                    dtype=np.float32,
                    shape=(job.total, job.dim),
                )
                job.got = np.zeros(n, dtype=bool)
                if job.progress:
                    job.progress(0, job.total)
            for job, idx, view, out in stream:
                job.feats[job.rows_of(idx, view)] = out.reshape(len(idx), job.dim)
                if view == 0:
                    job.got[idx] = True
                job.done += len(idx)
                if job.progress:
                    job.progress(job.done, job.total)
                job.t_extract = time.perf_counter() - t0
            for job in jobs:
                if job.progress and job.done < job.total:
                    job.progress(job.total, job.total)  # every file handled; skipped reported
                job.feats.flush()
                job.feats = None
            # Rows of skipped files stay zero and no file points at them. A file is skipped
            # by the decoding, the same for every entry.
            t_diag = time.perf_counter()
            got = np.logical_and.reduce([job.got for job in jobs])
            missing = np.flatnonzero(~got).tolist()
            for i in missing:  # an I/O error is not a bad image: never a silent skip
                failure = read_failure(paths[i], sizes[0])
                if failure is not None:
                    raise DataError(
                        f"{paths[i]}: {failure}; an I/O error, not a bad image: check the disk "
                        "or network share, then run again"
                    )
            skipped = dict(zip(missing, why_skipped([paths[i] for i in missing]), strict=True))
            t_diag = time.perf_counter() - t_diag
            if not got.any():
                raise TlsweepError(
                    f"{images.root}: none of the {n} image files is usable "
                    f"(first: {images.files[order[0]].path}: {skipped[0]}); check the files"
                )
            files = [
                {"path": f.path, "label": f.label, "split": f.split, "row": int(row_of[i])}
                for i, f in enumerate(images.files)
                if got[row_of[i]]
            ]
            skipped_list = [
                {"path": images.files[i].path, "reason": skipped[int(row_of[i])]}
                for i in range(len(images.files))
                if int(row_of[i]) in skipped
            ]
            done = int(got.sum())
            for job in jobs:
                manifest = {
                    "format": CACHE_FORMAT,
                    "complete": True,
                    "key": job.key,
                    "key_parts": job.parts,
                    "name": job.name,
                    "backbone": {
                        "name": job.bb.name,
                        "weights": job.bb.weights,
                        "input_size": job.bb.input_size,
                        "pooling": job.bb.pooling,
                        "args": dict(job.bb.args),
                        "label": job.bb.label,
                        "augment": asdict(job.bb.augment) if job.bb.augment else None,
                    },
                    "shape": [job.total, job.dim],
                    "dtype": "float32",
                    "data_dir": str(images.root),
                    "layout": images.layout,
                    "class_names": images.class_names,
                    "files": files,
                    "skipped": skipped_list,
                    "ignored": [{"path": p, "reason": r} for p, r in images.ignored],
                    "timings": {
                        # model build and trace, overlapped with the first decoding
                        "build_s": round(job.t_build, 3),
                        # from the start to the last forward pass, build included
                        "extract_s": round(job.t_extract, 3),
                        "images_per_s": (
                            round(done / job.t_extract, 1) if job.t_extract > 0 else None
                        ),
                        "diagnose_skipped_s": round(t_diag, 3),
                        # entries extracted together, from one decoding of each image
                        "extracted_with": len(jobs),
                    },
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                if job.bb.augment is not None:
                    manifest["views"] = job.views_info()
                    # forward passes per usable image: the views' cost, K x on augmented splits
                    manifest["timings"]["forward_passes"] = job.done
                with open(job.tmp / "manifest.json", "w") as f:
                    json.dump(manifest, f)  # no indent: the C encoder, 10x faster on 4000 files
                    f.flush()
                    os.fsync(f.fileno())
                job.theirs = _publish(job.tmp, self.dir / job.name, job.key)
                job.tmp = None
        except BaseException:
            for job in jobs:
                job.feats = None
                if job.tmp is not None:
                    shutil.rmtree(job.tmp, ignore_errors=True)
            raise
        entries = []
        for job in jobs:
            if job.theirs is not None:
                log.info("cache hit: %s (published by another machine meanwhile)", job.name)
                entries.append(job.theirs)
                continue
            entry = _read_entry(self.dir / job.name, job.key)
            if entry is None:  # pragma: no cover - we just wrote it
                raise TlsweepError(
                    f"{self.dir / job.name}: the new cache entry failed verification"
                )
            log.info(
                "extracted %s: %d images in %.1fs (%.0f images/s), %d skipped%s",
                job.name,
                done,
                job.t_extract,
                done / max(job.t_extract, 1e-9),
                len(skipped_list),
                job.cost_note(),
            )
            entries.append(entry)
        return entries


@dataclass
class _Job:
    """One entry being extracted: what it is, its model, and its rows so far."""

    bb: BackboneConfig
    parts: dict[str, Any]
    key: str
    name: str
    progress: Progress | None
    forward: Any = None
    dim: int = 0
    tmp: Path | None = None
    feats: Any = None  # the memory-mapped features.npy being written
    got: Any = None  # which rows were written
    done: int = 0
    t_build: float = 0.0
    t_extract: float = 0.0
    theirs: Entry | None = None  # the same entry, published by another machine first
    base: int = 0  # rows of view 0 (every file)
    rows: int = 0  # rows of each further view: the files of the augmented splits
    total: int = 0  # rows of features.npy

    @property
    def variant(self) -> ViewsVariant | None:
        """The augmented variant of the decoded images this entry needs, if any."""
        a = self.bb.augment
        if a is None:
            return None
        return (int(self.bb.input_size or 0), a.views, a.flip, a.crop, a.seed)

    def plan_views(self, n: int, splits: list[str]) -> None:
        """Lay out the rows: view 0 of all ``n`` files, then views 1 .. K - 1 of the files of
        the augmented splits, which come first in ``splits`` (the files' splits in row order)."""
        self.base = self.total = n
        a = self.bb.augment
        if a is None:
            return
        self.rows = sum(1 for s in splits if s in a.splits)
        if any(s not in a.splits for s in splits[: self.rows]):  # pragma: no cover - row order
            raise TlsweepError("augmented splits must come first in the rows")
        self.total = n + (a.views - 1) * self.rows

    def rows_of(self, idx: np.ndarray, view: int) -> np.ndarray:
        return idx if view == 0 else self.base + (view - 1) * self.rows + idx

    def views_info(self) -> dict[str, Any]:
        a = self.bb.augment
        assert a is not None
        return {"count": a.views, "base": self.base, "rows": self.rows, "splits": list(a.splits)}

    def cost_note(self) -> str:
        if self.bb.augment is None:
            return ""
        return (
            f"; {self.bb.augment.views} views of {', '.join(self.bb.augment.splits)}: "
            f"{self.done} forward passes, {self.done / max(self.base, 1):.2f}x a single view"
        )

    def build(self, tf: Any) -> None:
        extractor = bbs.build_extractor(self.bb)
        self.dim = int(np.prod(extractor.output_shape[1:]))
        # One trace for every batch size (the last batch is smaller), traced here, before two
        # threads call it.
        size = self.bb.input_size
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self.forward = tf.function(
            lambda x: extractor(x, training=False), input_signature=[spec], autograph=False
        )
        self.forward.get_concrete_function()


def _forward_each(
    jobs: list[_Job], chunks: Iterator[list[tuple[np.ndarray, Any]]], slot: dict[Any, int]
) -> Iterator[tuple[_Job, np.ndarray, int, Any]]:
    """Every entry's forward passes over each decoded chunk in turn: ``(job, indices, view,
    features)``. The chunk's batches hold one tuple of images per input size and augmented
    variant (``slot``); an entry with views forwards each view of its augmented splits' files.

    One stream of passes for every entry, so the passes in flight never drain between two
    entries (only where the next chunk is decoded, as with one entry).
    """

    def batches() -> Iterator[tuple[tuple[_Job, np.ndarray, int], tuple[Any, Any]]]:
        import tensorflow as tf

        for chunk in chunks:
            for job in jobs:
                k = slot[job.bb.input_size]
                for idx, x in chunk:
                    yield (job, idx, 0), (job.forward, x[k])
                if job.variant is None:
                    continue
                kv = slot[job.variant]
                for idx, x in chunk:
                    keep = np.flatnonzero(idx < job.rows)  # files of the augmented splits
                    if len(keep) == 0:
                        continue
                    xs = x[kv] if len(keep) == len(idx) else tf.gather(x[kv], keep)
                    for v in range(1, job.variant[1]):
                        yield (job, idx[keep], v), (job.forward, xs[:, v - 1])

    for (job, idx, view), out in _forward_all(lambda fx: fx[0](fx[1]), batches()):
        yield job, idx, view, out


def _publish(tmp: Path, final: Path, key: str) -> Entry | None:
    """Rename the finished ``tmp`` folder to ``final``; None when it is in place.

    Where the entry lock does not hold (``flock`` on some network filesystems), another machine
    may have published the same entry first: the rename then fails because ``final`` exists.
    Its entry is as good as ours (same key, same bytes in), so it is used and ours dropped;
    nobody deletes an entry that verifies.
    """
    try:
        os.rename(tmp, final)
        return None
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    theirs = _read_entry(final, key)
    if theirs is None:
        raise TlsweepError(
            f"{final}: another process published this cache entry at the same time and it does "
            "not verify; run again (the entry will be replaced)"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return theirs


def _forward_all(
    forward: Callable[[Any], Any],
    batches: Iterator[tuple[np.ndarray, Any]],
    in_flight: int | None = None,
):
    """Yield ``(indices, features)`` of every batch, with ``in_flight`` forward passes running.

    One pass at a time leaves a core partly idle between and inside small ops; a second pass
    in flight fills the gaps (TensorFlow runs concurrent calls of one function in parallel and
    releases the GIL while it does). Results come back in order.
    """
    in_flight = in_flight or IN_FLIGHT
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="tlsweep-forward") as pool:
        try:
            for idx, batch in batches:
                pending.append((idx, pool.submit(lambda b: forward(b).numpy(), batch)))
                if len(pending) >= in_flight:
                    i, fut = pending.popleft()
                    yield i, fut.result()
            while pending:
                i, fut = pending.popleft()
                yield i, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def report_skipped(entry: Entry, limit: int = 3) -> None:
    """Warn about files the entry skipped or ignored: the count and the first few paths."""
    for kind, items in (
        ("skipped", entry.manifest["skipped"]),
        ("ignored", entry.manifest["ignored"]),
    ):
        if items:
            first = "; ".join(f"{s['path']} ({s['reason']})" for s in items[:limit])
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            log.warning(
                "%s: %d file(s) %s: %s%s (full list in %s)",
                entry.manifest["backbone"]["label"],
                len(items),
                kind,
                first,
                more,
                entry.path / "manifest.json",
            )


def check_usable(entry: Entry) -> None:
    """Refuse an entry the head cannot learn from: a class with no usable training image, or
    no usable validation image at all (every file of them was skipped).

    Raised after the entry is cached, so fixing the files costs one new extraction and nothing
    that was computed is lost.
    """
    m = entry.manifest
    per_class = collections.Counter(f["label"] for f in m["files"] if f["split"] == "train")
    where = f"{m['data_dir']}: {m['backbone']['label']}"
    for label, name in enumerate(m["class_names"]):
        if per_class[label] == 0:
            raise TlsweepError(
                f"{where}: class '{name}' has no usable training image "
                f"({len(m['skipped'])} file(s) skipped, listed in {entry.path / 'manifest.json'})"
                "; replace the broken files or remove the class folder"
            )
    if not any(f["split"] == "validation" for f in m["files"]):
        raise TlsweepError(
            f"{where}: no usable validation image ({len(m['skipped'])} file(s) skipped, listed "
            f"in {entry.path / 'manifest.json'}); replace the broken files"
        )


def extract_all(
    cfg: SweepConfig,
    progress: Callable[[BackboneConfig], Progress | None] | None = None,
    check: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> list[tuple[BackboneConfig, Entry, bool]]:
    """Find the images once, then make sure every configured backbone's entry exists.

    ``check`` is called with :func:`study_keys`' view of the entries (label -> key and key
    parts) before anything is extracted, so a study made on other features is refused before
    minutes of extraction (a missing ImageNet file is downloaded first: its bytes are part of
    the key). Returns (resolved backbone, entry, was_cached) per backbone, in sweep-file order.
    """
    resolved = list(cfg.backbones)  # load_sweep resolved them against the registry
    images = find_images(cfg.data)
    cache = FeatureCache(cfg.cache_dir)
    digest = cache.images_digest(images, verify=cfg.data.verify)
    if check is not None:
        check({bb.label: _expected(bb, digest) for bb in resolved})
    # Every entry that must exist, fused backbones' members included, extracted together (one
    # decode of each image for all of them); a fused backbone joins its members' entries.
    plain: list[BackboneConfig] = []
    for bb in resolved:
        for m in bb.members or (bb,):
            if m not in plain:
                plain.append(m)
    done = cache.ensure_many(
        plain, images, digest, [progress(bb) for bb in plain] if progress else None
    )
    out = []
    for bb in resolved:
        if bb.members:
            from tlsweep.fusion import fuse_entries

            got = [done[plain.index(m)] for m in bb.members]
            entry, cached = fuse_entries(bb, [e for e, _ in got]), all(c for _, c in got)
        else:
            entry, cached = done[plain.index(bb)]
        report_skipped(entry)
        check_usable(entry)
        out.append((bb, entry, cached))
    return out


def study_keys(entries: list[tuple[BackboneConfig, Entry, bool]]) -> dict[str, dict[str, Any]]:
    """label -> {"key", "parts"} of each backbone's entry: what a study is tied to."""
    return {bb.label: {"key": e.key, "parts": e.manifest["key_parts"]} for bb, e, _ in entries}


def expected_keys(cfg: SweepConfig) -> dict[str, dict[str, Any]]:
    """label -> {"key", "parts"} the sweep file's data would have now, without extracting or
    downloading; a backbone whose ImageNet file is not downloaded yet is left out."""
    images = find_images(cfg.data)
    cache = FeatureCache(cfg.cache_dir)
    if cache.dir.is_dir():  # through the stat index; a command that reads makes no folder
        digest = cache.images_digest(images, verify=cfg.data.verify)
    else:
        digest = content_digest(images)
    out = {}
    for bb in cfg.backbones:
        expected = _expected(bb, digest, fetch=False)
        if expected is not None:
            out[bb.label] = expected
    return out


def _expected(bb: BackboneConfig, digest: str, fetch: bool = True) -> dict[str, Any] | None:
    """{"key", "parts"} of ``bb``'s entry on images of ``digest`` (a fused backbone: of its
    joined members, as :func:`tlsweep.fusion.fuse_entries` keys it); None when an ImageNet
    file is not downloaded yet and ``fetch`` is False."""
    if bb.members:
        members = [_expected(m, digest, fetch) for m in bb.members]
        if any(m is None for m in members):
            return None
        keys = [m["key"] for m in members]  # type: ignore[index]
        return {
            "key": hashlib.sha256(json.dumps({"fuse": keys}).encode()).hexdigest(),
            "parts": {"fuse": keys},
        }
    parts = key_parts(bb, digest, fetch)
    if parts["weights"] is None:
        return None
    return {"key": cache_key(parts), "parts": parts}
