"""Feature extraction and the on-disk, content-addressed feature cache.

One cache entry per (backbone, weights identity, input size, pooling, preprocessing, constructor
arguments, image content and labels, library versions). An entry is a folder::

    <cache_dir>/<Backbone>-<size>-<pooling>-<key16>/
        manifest.json   # key, shapes, class names, files, skipped files, timings (written last)
        features.npy    # float32 [rows, dim], memory-mappable, never pickled

It is written under a temporary name and renamed into place; an entry whose manifest is missing,
unreadable or does not match its key and arrays is never used. Extraction streams batches to a
memory-mapped ``.npy`` file, so a dataset larger than memory works. A per-entry file lock makes
concurrent workers extract each entry once: the others wait, and because the lock dies with its
process, a worker that died while extracting is taken over.

Computing a key reads image bytes but imports no TensorFlow, so a cache hit stays fast.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep import backbones as bbs
from tlsweep.config import BackboneConfig, SweepConfig
from tlsweep.data import ImageSet, content_digest, decoded_chunks, find_images, why_skipped
from tlsweep.errors import TlsweepError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Images per forward pass, two passes in flight (see _forward_all). Measured on 2 cores with
# MobileNetV2 a0.35 at 160 px: 32 with two in flight beats 64, 128 or 256 with one.
EXTRACT_BATCH = 32
IN_FLIGHT = 2
Progress = Callable[[int, int], None]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(bb: BackboneConfig) -> str:
    """What identifies the weights: Keras's ImageNet file, random init, or a file's bytes."""
    if bb.weights == "imagenet":
        return "imagenet"
    if bb.weights == "none":
        return f"random-seed-{bbs.RANDOM_WEIGHTS_SEED}"
    return f"file:{_file_digest(bb.weights)}"


def key_parts(bb: BackboneConfig, images_digest: str) -> dict[str, Any]:
    """Everything that changes the features, as a JSON-able dict."""
    return {
        "format": CACHE_FORMAT,
        "backbone": bb.name,
        "args": {k: bb.args[k] for k in sorted(bb.args)},
        "weights": weights_identity(bb),
        "input_size": bb.input_size,
        "pooling": bb.pooling,
        "preprocessing": bbs.preprocessing_name(bb),
        "resize": "bilinear-squash",
        "images": images_digest,
        "versions": {p: _version(p) for p in ("keras", "tensorflow")},
    }


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_name(bb: BackboneConfig, key: str) -> str:
    return f"{bb.name}-{bb.input_size}-{bb.pooling}-{key[:16]}"


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
        """(features, labels) of one split, in file order; empty arrays if the split is empty."""
        rows = [(f["row"], f["label"]) for f in self.manifest["files"] if f["split"] == name]
        feats = self.features()
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
        if rows and (min(rows) < 0 or max(rows) >= arr.shape[0]):
            return None
        return Entry(path=path, manifest=manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _entry_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """An exclusive lock per entry; the OS releases it if the holder dies."""
    lock_path = cache_dir / f"{name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process extracting %s", name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
        """Remove entries (all, or those whose name contains ``match``) and leftovers."""
        removed = []
        if not self.dir.is_dir():
            return removed
        for p in sorted(self.dir.iterdir()):
            if match and match not in p.name:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif p.suffix == ".lock":
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
        digest = images_digest or content_digest(images)
        parts = key_parts(bb, digest)
        key = cache_key(parts)
        name = entry_name(bb, key)
        hit = self.lookup(bb, key)
        if hit is not None:
            log.info("cache hit: %s", name)
            return hit, True
        self._mkdir()
        with _entry_lock(self.dir, name):
            hit = self.lookup(bb, key)  # another worker may have finished it while we waited
            if hit is not None:
                log.info("cache hit: %s (extracted by another worker)", name)
                return hit, True
            for stale in self.dir.glob(f"{name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            final = self.dir / name
            if final.exists():  # a damaged entry: never used, replaced
                log.warning("replacing damaged cache entry %s", name)
                shutil.rmtree(final, ignore_errors=True)
            entry = self._extract(bb, images, parts, key, name, progress)
            return entry, False

    def _extract(
        self,
        bb: BackboneConfig,
        images: ImageSet,
        parts: dict[str, Any],
        key: str,
        name: str,
        progress: Progress | None,
    ) -> Entry:
        import tensorflow as tf

        t0 = time.perf_counter()
        paths = [images.abspath(f) for f in images.files]
        ready = threading.Event()
        chunks = decoded_chunks(paths, bb.input_size, EXTRACT_BATCH, first_until=ready)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlsweep-decode") as decoder:
            # The first chunk decodes (on the decoding threads, mostly without the GIL) while
            # this thread builds the model and traces the forward pass: a second of Python
            # that leaves the other core free. It stops as soon as the model is ready.
            first = decoder.submit(next, chunks, None)
            try:
                extractor = bbs.build_extractor(bb)
                dim = int(np.prod(extractor.output_shape[1:]))
                # One trace for every batch size (the last batch is smaller), traced here, before
                # two threads call it.
                spec = tf.TensorSpec([None, bb.input_size, bb.input_size, 3], tf.float32)
                forward = tf.function(
                    lambda x: extractor(x, training=False), input_signature=[spec], autograph=False
                )
                forward.get_concrete_function()
                t_build = time.perf_counter() - t0
            finally:
                ready.set()
            chunk = first.result()

        tmp = self.dir / f"{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            feats = np.lib.format.open_memmap(
                tmp / "features.npy", mode="w+", dtype=np.float32, shape=(len(paths), dim)
            )
            got = np.zeros(len(paths), dtype=bool)
            done = 0
            if progress:
                progress(0, len(paths))
            # One stream of batches: the next chunk decodes when the forward passes reach the
            # end of this one, while the last of them is still running (the passes never drain).
            batches = itertools.chain(chunk or [], itertools.chain.from_iterable(chunks))
            del chunk
            for idx, out in _forward_all(forward, batches):
                feats[idx] = out.reshape(len(idx), dim)
                got[idx] = True
                done += len(idx)
                if progress:
                    progress(done, len(paths))
            t_extract = time.perf_counter() - t0
            if progress and done < len(paths):
                progress(len(paths), len(paths))  # every file handled; the skipped are reported
            feats.flush()
            del feats
            # Rows of skipped files stay zero and no file points at them.
            t_diag = time.perf_counter()
            missing = np.flatnonzero(~got).tolist()
            skipped = dict(zip(missing, why_skipped([paths[i] for i in missing]), strict=True))
            t_diag = time.perf_counter() - t_diag
            if not got.any():
                raise TlsweepError(
                    f"{images.root}: none of the {len(paths)} image files is usable "
                    f"(first: {images.files[0].path}: {skipped[0]}); check the files"
                )
            files = [
                {"path": f.path, "label": f.label, "split": f.split, "row": i}
                for i, f in enumerate(images.files)
                if got[i]
            ]
            skipped_list = [
                {"path": images.files[i].path, "reason": r} for i, r in sorted(skipped.items())
            ]
            manifest = {
                "format": CACHE_FORMAT,
                "complete": True,
                "key": key,
                "key_parts": parts,
                "name": name,
                "backbone": {
                    "name": bb.name,
                    "weights": bb.weights,
                    "input_size": bb.input_size,
                    "pooling": bb.pooling,
                    "args": dict(bb.args),
                    "label": bb.label,
                },
                "shape": [len(paths), dim],
                "dtype": "float32",
                "data_dir": str(images.root),
                "layout": images.layout,
                "class_names": images.class_names,
                "files": files,
                "skipped": skipped_list,
                "ignored": [{"path": p, "reason": r} for p, r in images.ignored],
                "timings": {
                    # model build and trace, overlapped with the first decoding
                    "build_s": round(t_build, 3),
                    # from the start to the last forward pass, build included
                    "extract_s": round(t_extract, 3),
                    "images_per_s": round(done / t_extract, 1) if t_extract > 0 else None,
                    "diagnose_skipped_s": round(t_diag, 3),
                },
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            with open(tmp / "manifest.json", "w") as f:
                json.dump(manifest, f)  # no indent: the C encoder, 10x faster on 4000 files
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.dir / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = _read_entry(self.dir / name, key)
        if entry is None:  # pragma: no cover - we just wrote it
            raise TlsweepError(f"{self.dir / name}: the new cache entry failed verification")
        log.info(
            "extracted %s: %d images in %.1fs (%.0f images/s), %d skipped",
            name,
            done,
            t_extract,
            done / max(t_extract, 1e-9),
            len(skipped_list),
        )
        return entry


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
) -> list[tuple[BackboneConfig, Entry, bool]]:
    """Find the images once, then make sure every configured backbone's entry exists.

    Returns (resolved backbone, entry, was_cached) per backbone, in sweep-file order.
    """
    resolved = list(cfg.backbones)  # load_sweep resolved them against the registry
    images = find_images(cfg.data)
    digest = content_digest(images)
    cache = FeatureCache(cfg.cache_dir)
    out = []
    for bb in resolved:
        if bb.members:  # a fused backbone: its members' entries (extracted if needed), joined
            from tlsweep.fusion import fuse_entries

            got = [
                cache.ensure(m, images, digest, progress(m) if progress else None)
                for m in bb.members
            ]
            entry, cached = fuse_entries(bb, [e for e, _ in got]), all(c for _, c in got)
        else:
            entry, cached = cache.ensure(bb, images, digest, progress(bb) if progress else None)
        report_skipped(entry)
        check_usable(entry)
        out.append((bb, entry, cached))
    return out
