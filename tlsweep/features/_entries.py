"""What a feature cache entry is on disk: its key, its folder, how it is read, locked and
published.

One cache entry per (backbone, weights identity, input size, pooling, preprocessing, constructor
arguments, image content and labels, library versions). An entry is a folder::

    <cache_dir>/<Backbone>-<size>-<pooling>-<key16>/
        manifest.json   # key, shapes, class names, files, skipped files, timings (written last)
        features.npy    # float32 [rows, dim], memory-mappable, never pickled

With augmented views (``augment:``), rows ``0 .. n`` are view 0 (the plain image) of every file
and views ``1 .. K - 1`` follow, one block each, holding the files of the augmented splits (the
training split, every split with ``tta``), which come first in the row order; the manifest's
``views`` says where (:meth:`Entry.views`).

It is written under a temporary name and renamed into place (:func:`publish`) under a
per-entry file lock (:func:`entry_lock`); an entry whose manifest is missing, unreadable or
does not match its key and arrays is never used (:func:`read_entry`). Computing a key imports
no TensorFlow.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep import backbones as bbs
from tlsweep.config import BackboneConfig
from tlsweep.errors import TlsweepError
from tlsweep.files import atomic_write, held_lock
from tlsweep.images import features_record, features_stat, file_digest
from tlsweep.versions import version

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


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
        "versions": {p: version(p) for p in ("keras", "tensorflow")},
    }
    if bb.augment is not None:
        parts["augment"] = bb.augment.key()
    return parts


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_name(bb: BackboneConfig, key: str) -> str:
    views = f"-views{bb.augment.views}" if bb.augment is not None else ""
    return f"{bb.name}-{bb.input_size}-{bb.pooling}{views}-{key[:16]}"


class ManifestFields:
    """An entry's key and class names, read from its manifest: one implementation for
    :class:`Entry` and the fused view (:class:`tlsweep.features._fusion.FusedEntry`)."""

    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]


@dataclass
class Entry(ManifestFields):
    """A complete, verified cache entry."""

    path: Path
    manifest: dict[str, Any]

    def features(self) -> np.ndarray:
        """All rows, memory-mapped read-only."""
        return np.load(self.path / "features.npy", mmap_mode="r", allow_pickle=False)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split, in file order; empty arrays if the split is empty.

        The features of a split stored in one block of rows (every entry extracted since rows
        are grouped by split) are a slice of the file's memory map, copy-on-write: writes would
        stay in this process and never reach the file. Writable, so that TensorFlow can read
        the mapped pages in place (:func:`tlsweep.head._graph.as_tensor`); the page cache
        holding them is shared by every process on the machine. Other entries give an
        in-memory copy.
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


FEATURES_FILE = "features"  # the manifest's record of features.npy: checksum and stat


def _unreadable(path: Path, e: OSError) -> TlsweepError:
    from tlsweep.errors import ServiceError

    return ServiceError(
        f"{e.filename or path}: cannot read this cache entry ({e.strerror or e}); nothing was "
        "deleted: fix the disk, mount or open-files limit and run again"
    )


def _rewrite_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace the entry's manifest atomically (a checksum's new stat); best effort."""
    try:
        with atomic_write(path / "manifest.json") as f:
            f.write(json.dumps(manifest))
    except OSError as e:
        log.debug("%s: manifest not updated (%s)", path, e)


def _checksum_ok(path: Path, manifest: dict[str, Any], verify: bool) -> bool:
    """Whether ``features.npy`` holds the bytes published: trusted without reading when its
    stat is the one recorded (unless ``verify``), else its checksum is computed and compared.
    A match records the new stat. An entry published before checksums were recorded has its
    checksum computed and recorded on its first load: it is trusted as it is then."""
    array = path / "features.npy"
    rec = manifest.get(FEATURES_FILE)
    now = features_stat(array)
    if rec is not None and not verify and {k: rec.get(k) for k in now} == now:
        return True
    got = features_record(array)
    if rec is not None and got["sha256"] != rec.get("sha256"):
        log.warning(
            "%s: changed on disk since the entry was published (checksum mismatch); not used",
            array,
        )
        return False
    manifest[FEATURES_FILE] = got
    _rewrite_manifest(path, manifest)
    return True


def read_entry(path: Path, key: str | None = None, verify: bool = False) -> Entry | None:
    """The entry at ``path`` if complete and consistent, None if it is absent or proven invalid
    (then it may be replaced); a file that cannot be read (an I/O error, too many open files)
    raises a :class:`ServiceError` naming it: a good entry is never taken for a damaged one.

    A feature array whose stat changed since publication is checked against its recorded
    checksum (every array with ``verify``); the hit of an unchanged entry reads no array."""
    try:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        if manifest.get("format") != CACHE_FORMAT or not manifest.get("complete"):
            return None
        if key is not None and manifest.get("key") != key:
            return None
        if cache_key(manifest["key_parts"]) != manifest["key"]:
            return None
        try:
            arr = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        if list(arr.shape) != manifest["shape"] or str(arr.dtype) != manifest["dtype"]:
            return None
        rows = [f["row"] for f in manifest["files"]]
        views = manifest.get("views")
        end = arr.shape[0] if not views else views["base"]
        if views and views["base"] + (views["count"] - 1) * views["rows"] != arr.shape[0]:
            return None
        if rows and (min(rows) < 0 or max(rows) >= end):
            return None
        if not _checksum_ok(path, manifest, verify):
            return None
        return Entry(path=path, manifest=manifest)
    except OSError as e:
        raise _unreadable(path, e) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def entry_lock(cache_dir: Path, name: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock per entry (see :func:`held_lock`)."""
    return held_lock(cache_dir / f"{name}.lock", f"extracting {name}")


def tmp_name(name: str) -> str:
    """A temporary entry folder's name: which host and process are writing it."""
    return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# A temporary folder written from another machine (a cache on a network share), whose lock this
# machine cannot see, is taken as abandoned once it has not changed for this long.
ABANDONED_AFTER = 24 * 3600


def in_progress(tmp: Path, locked: bool) -> bool:
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


def publish(tmp: Path, final: Path, key: str) -> Entry | None:
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
    theirs = read_entry(final, key)
    if theirs is None:
        raise TlsweepError(
            f"{final}: another process published this cache entry at the same time and it does "
            "not verify; run again (the entry will be replaced)"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return theirs


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
