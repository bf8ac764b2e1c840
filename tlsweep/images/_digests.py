"""Content identity of images: tlsweep's one file hasher, and the stat index that spares it.

:func:`content_digest` is one hash of every image's bytes, path, label and split: the part of
a cache key that changes when any image does. A stat index per data folder maps each file's
(size, mtime, ctime, inode, device) to its digest, so a later run reads only the files whose
stat changed (:func:`file_digests`). Pure Python: no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tlsweep.files import atomic_write

from ._find import ImageSet, cores

log = logging.getLogger(__name__)


def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes: tlsweep's one file hasher (images and weights files)."""
    # SHA-256 runs on the CPU's SHA instructions where it has them (OpenSSL): on this project's
    # machine 1.5 GB/s against 0.85 for BLAKE2b; with file_digest's reusable buffer and one
    # thread per core, hashing the 4000 cats-vs-dogs photos (180 MB) took 0.27 s instead of 0.4.
    try:
        with open(path, "rb") as f:
            if hasattr(hashlib, "file_digest"):  # Python >= 3.11
                return hashlib.file_digest(f, "sha256").hexdigest()
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except OSError as e:
        return f"unreadable:{e.errno}"


def features_stat(path: Path) -> dict[str, int]:
    """What must not change for a recorded checksum of the file ``path`` to stay valid."""
    st = os.stat(path)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


def features_record(path: Path) -> dict[str, Any]:
    """The checksum (SHA-256) and stat of the feature array ``path``, for the manifest."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"sha256": digest, **features_stat(path)}


# The stat index: (size, mtime_ns, ctime_ns, inode, device) of a file -> its digest, trusted on a
# later run without reading the file. A file whose last change (mtime or ctime) is less than this
# long before the hashing started is not trusted: a later edit within the same timestamp tick
# (a coarse filesystem clock, FAT's 2 s mtimes, a little clock skew on NFS) could leave every
# stat field unchanged ("racy git"). Such files are read again next time; by then they are old.
RACY_NS = 5_000_000_000
STAT_INDEX_FORMAT = 1
StatKey = tuple[int, int, int, int, int]


def _stat_key(path: str) -> StatKey | None:
    """What must not change for a file's stored digest to stay valid; None if it cannot be
    stat'ed. ctime is set by the kernel on every write, rename or ``utime`` and cannot be
    set back, so a same-size rewrite that restores the mtime (or ``mv`` over the file) shows."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _read_stat_index(index: Path, root: str) -> dict[str, list]:
    """The index's entries for ``root``; empty (everything is hashed) if it is missing, damaged,
    of another format or of another folder. Never raises."""
    try:
        with open(index, "rb") as f:
            raw = json.load(f)
        if (
            raw.get("format") != STAT_INDEX_FORMAT
            or raw.get("algorithm") != "sha256"
            or raw.get("root") != root
            or not isinstance(raw.get("files"), dict)
        ):
            log.debug("%s: stat index of another format or folder; hashing every file", index)
            return {}
        files = raw["files"]
        for v in files.values():
            if not (isinstance(v, list) and len(v) == 6 and isinstance(v[5], str)):
                log.debug("%s: malformed stat index; hashing every file", index)
                return {}
        return files
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.debug("%s: unreadable stat index (%s); hashing every file", index, e)
        return {}


def _write_stat_index(index: Path, root: str, files: dict[str, list]) -> None:
    """Replace the index atomically (temporary file, fsync, rename); a failure only logs: the
    index saves time, it is never needed."""
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(index) as f:
            json.dump(
                {"format": STAT_INDEX_FORMAT, "algorithm": "sha256", "root": root, "files": files},
                f,
            )
    except OSError as e:
        log.warning("%s: cannot write the image stat index (%s); next run hashes again", index, e)


def file_digests(
    images: ImageSet,
    index: Path | None = None,
    verify: bool = False,
    workers: int | None = None,
) -> list[str]:
    """The SHA-256 of every file of ``images``, in order.

    With an ``index`` file, a file whose stat (size, mtime, ctime, inode, device) is the one
    recorded there is not read: its recorded digest is used. The others are read and hashed,
    and the index is rewritten if anything changed. ``verify`` reads every file and ignores
    (then rewrites) the index.
    """
    root = os.path.abspath(images.root)
    base = root.rstrip("/") + "/"
    rels = [f.path for f in images.files]
    known = {} if (index is None or verify) else _read_stat_index(index, root)
    started = time.time_ns()
    # Stat before reading: an edit between the two leaves a stat that no longer matches.
    stats = [_stat_key(base + r) for r in rels]
    digests: list[str | None] = []
    todo: list[int] = []
    for i, (rel, st) in enumerate(zip(rels, stats, strict=True)):
        rec = known.get(rel)
        if st is not None and rec is not None and tuple(rec[:5]) == st:
            digests.append(rec[5])
        else:
            digests.append(None)
            todo.append(i)
    if todo:
        log.debug("hashing %d of %d image files", len(todo), len(rels))
        with ThreadPoolExecutor(max_workers=workers or cores()) as pool:
            paths = [base + rels[i] for i in todo]
            for i, d in zip(todo, pool.map(file_digest, paths, chunksize=64), strict=True):
                digests[i] = d
    elif len(known) == len(rels):
        return digests  # type: ignore[return-value] # every file, and only they, in the index
    if index is not None:
        trusted_before = started - RACY_NS
        files = {
            rel: [*st, d]
            for rel, st, d in zip(rels, stats, digests, strict=True)
            if st is not None
            and not d.startswith("unreadable:")
            and max(st[1], st[2]) < trusted_before
        }
        if files != known:
            _write_stat_index(index, root, files)
    return digests  # type: ignore[return-value]


def content_digest(
    images: ImageSet,
    workers: int | None = None,
    index: Path | None = None,
    verify: bool = False,
) -> str:
    """One hash of every file's bytes, path, label and split: changes when any image does.

    ``index`` and ``verify``: see :func:`file_digests`.
    """
    digests = file_digests(images, index=index, verify=verify, workers=workers)
    h = hashlib.sha256()
    h.update("\x00".join(images.class_names).encode())
    h.update(
        "".join(
            f"{f.path}\x00{f.label}\x00{f.split}\x00{d}\n"
            for f, d in zip(images.files, digests, strict=True)
        ).encode()
    )
    return h.hexdigest()
