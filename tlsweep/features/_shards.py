"""The shard folder of an entry being extracted: one extraction shared by every worker, on
every machine.

A missing entry's rows are cut into shards that the machines asking for it (several machines on
one cache folder) claim, extract and write (:class:`Shards`); a shard of a worker that died is
taken over (:class:`Claim`, refreshed by :class:`Refresher`). On one machine, one process at a
time extracts an entry, with every core (its machine lock, :meth:`Shards.take_machine`): the
forward passes already use every core, and a second process would only add its own start and
split the cores (measured in ``bench/shards.py``); the other local workers wait for it and take
over if it dies. How rows are cut into shards and extracted is :mod:`tlsweep.features`'.

The file locks of the cache (an entry's, a fine-tuning stage's) are :func:`held_lock`: a
bounded wait that says who holds the lock (:func:`wait_flock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep.files import atomic_write, lock_held

log = logging.getLogger(__name__)

Span = tuple[int, int]  # rows [start, end) of an entry, in its row order
SHARDS_SUFFIX = ".shards"
# A worker refreshes the time stamp of its claims this often; a claim written from another
# machine (a cache folder on a network share) that was not refreshed for CLAIM_STALE_AFTER
# seconds is taken as left by a dead or hung worker and taken over. A claim of this machine is
# taken over as soon as its process is gone (its lock is free).
CLAIM_REFRESH = 10.0
CLAIM_STALE_AFTER = 120.0


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Claim:
    """A shard claimed by this process: a file created exclusively and locked (``flock``)
    while the shard is extracted, holding ``host:pid``. Its lock dies with the process."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def create(cls, path: Path) -> Claim | None:
        """Claim ``path``; None if it is claimed already (FileNotFoundError: no folder).

        The file is written and locked under a temporary name, then linked to ``path`` (which
        fails if it exists): nobody ever sees a claim that is not locked yet.
        """
        tmp = path.with_name(f"{path.name}.tmp-{_owner().replace(':', '-')}-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, _owner().encode())
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return cls(path, fd)

    def _ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def refresh(self) -> None:
        if self._ours():
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self.fd < 0:
            return
        if self._ours():  # not taken over meanwhile (a hung worker's claim can be)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)  # releases the lock
        self.fd = -1


def _claim_owner(path: Path) -> str | None:
    """Who holds the claim ``path`` if it is live: locked (its process is alive), or written
    from another machine and refreshed within CLAIM_STALE_AFTER seconds; else None."""
    try:
        owner = path.read_text()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    if lock_held(path):
        return owner or "?"
    host = owner.rpartition(":")[0]
    if host and host != socket.gethostname() and age < CLAIM_STALE_AFTER:
        return owner
    return None


class Shards:
    """The shard folder of one entry being extracted, by any number of workers::

        <cache_dir>/<entry>.shards/
            000000000-000000512.claim   # held by the worker extracting those rows
            000000000-000000512.npz     # the rows, written: features, which rows decoded, who
            <host>.extracting           # locked by the one process of <host> extracting

    Each shard is claimed by one worker, extracted and written atomically (temporary name,
    then rename); a claim whose worker died is taken over. The worker that finds every shard
    written joins them into the entry and publishes it under the entry lock, then removes the
    folder. A folder left by workers that were all killed is reused by the next extraction.
    """

    def __init__(self, cache_dir: Path, name: str):
        self.dir = cache_dir / f"{name}{SHARDS_SUFFIX}"
        self._machine_fd = -1  # this process's machine lock on the entry, while held

    @property
    def _machine_path(self) -> Path:
        return self.dir / f"{socket.gethostname()}.extracting"

    def take_machine(self) -> bool:
        """Become this machine's extractor of the entry (a ``flock`` held until
        :meth:`release_machine` or the process's end); False while another local process is."""
        if self._machine_fd >= 0:
            return True
        try:
            fd = os.open(self._machine_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder is gone: published or cleared
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, _owner().encode())
        self._machine_fd = fd
        return True

    def machine_extractor(self) -> str | None:
        """``host:pid`` of the other process of this machine extracting the entry, if any."""
        if self._machine_fd >= 0 or not lock_held(self._machine_path):
            return None
        try:
            return self._machine_path.read_text() or "?"
        except OSError:
            return "?"

    def release_machine(self) -> None:
        if self._machine_fd >= 0:
            os.close(self._machine_fd)  # releases the lock; the file stays for the next one
            self._machine_fd = -1

    def _path(self, span: Span, ext: str) -> Path:
        return self.dir / f"{span[0]:09d}-{span[1]:09d}.{ext}"

    def is_done(self, span: Span) -> bool:
        return self._path(span, "npz").is_file()

    def live_owner(self, span: Span) -> str | None:
        return _claim_owner(self._path(span, "claim"))

    def claimable(self, span: Span) -> bool:
        return not self.is_done(span) and self.live_owner(span) is None

    def remove_if_abandoned(self) -> bool:
        """Remove the folder unless a worker is extracting shards of it; whether it did. This
        machine's extractor lock is held meanwhile, so no local worker starts in between."""
        if not self.take_machine():
            return False
        try:
            if any(_claim_owner(p) is not None for p in self.dir.glob("*.claim")):
                return False
            shutil.rmtree(self.dir, ignore_errors=True)
            return True
        finally:
            self.release_machine()

    def any_live(self) -> bool:
        """Whether a live worker claims a shard, or is this machine's extractor."""
        return any(_claim_owner(p) is not None for p in self.dir.glob("*.claim")) or any(
            lock_held(p) for p in self.dir.glob("*.extracting")
        )

    def claim(
        self, span: Span, lock: Callable[[], contextlib.AbstractContextManager[Any]]
    ) -> Claim | None:
        """Claim the shard, taking over a claim whose worker is dead; None if a live worker
        holds it. Takeovers happen under ``lock`` (the entry lock), one at a time, so a claim
        just made by another taker is never removed."""
        path = self._path(span, "claim")
        claim = Claim.create(path)
        if claim is not None or _claim_owner(path) is not None:
            return claim
        with lock():
            if path.exists() and _claim_owner(path) is None:
                try:
                    left_by = path.read_text()
                except OSError:
                    left_by = "?"
                log.info(
                    "taking over shard %d-%d of %s, left by %s",
                    span[0],
                    span[1],
                    self.dir.name,
                    left_by,
                )
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return Claim.create(path)

    def write(self, span: Span, feats: np.ndarray, rows: np.ndarray) -> None:
        with atomic_write(self._path(span, "npz"), "wb") as f:
            np.savez(f, features=feats, rows=rows, owner=np.array(_owner()))

    def read(self, span: Span) -> tuple[np.ndarray, np.ndarray, str]:
        with np.load(self._path(span, "npz"), allow_pickle=False) as z:
            return z["features"], z["rows"], str(z["owner"])


class Refresher:
    """Refreshes the time stamp of this process's open claims every CLAIM_REFRESH seconds, so
    that workers on other machines see they are alive."""

    def __init__(self, opened: list[tuple[Span, list[tuple[Any, Claim]]]]):
        self._opened = opened
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tlsweep-claims")

    def _run(self) -> None:
        while not self._stop.wait(CLAIM_REFRESH):
            for _, claimed in list(self._opened):
                for _, claim in claimed:
                    claim.refresh()

    def __enter__(self) -> Refresher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
