"""Files every stage shares: exclusive file locks whose wait is bounded and names the holder.

A lock is an ``flock`` on a lock file (or a folder): the OS releases it when its holder dies, so
a lock is never left behind by a killed process. The taker writes itself (pid, host, start time)
into the lock file, and a process that waits for it says, every ``LOCK_LOG_EVERY`` seconds, who
holds it; after ``TLSWEEP_LOCK_TIMEOUT`` (default :data:`tlsweep.config.DEFAULT_LOCK_TIMEOUT`)
seconds the wait ends with one :class:`~tlsweep.errors.ServiceError` naming the lock and its
holder. Used by the feature cache (an entry's lock), fine-tuning (a stage's folder, the decoded
images), the local Optuna storage and the local stores.

A file that must be whole or absent (a manifest, a state, a shard, an exported model, a CSV) is
written by :func:`atomic_write` (or :func:`replaced_atomically` for a writer that wants a path):
a temporary file beside it, synced, then renamed over it; removed on any failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def lock_held(path: Path) -> bool:
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


LOCK_POLL = 0.2  # seconds between two tries of a lock another process holds
LOCK_LOG_EVERY = 30.0  # seconds between two "waiting for <lock>" lines


def lock_timeout() -> float:
    """How long a lock is waited for: ``$TLSWEEP_LOCK_TIMEOUT`` seconds, else the default."""
    from tlsweep.config import DEFAULT_LOCK_TIMEOUT

    try:
        return float(os.environ.get("TLSWEEP_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT


def lock_holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, as written into it by :func:`wait_flock`'s taker."""
    try:
        h = json.loads(Path(lock_path).read_text())
        return f"pid {h['pid']} on host {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def wait_flock(fd: int, lock_path: Path, doing: str, timeout: float | None = None) -> None:
    """Take an exclusive ``flock`` on ``fd`` (the file ``lock_path``), waiting at most
    ``timeout`` seconds (:func:`lock_timeout`) for its holder, logged every LOCK_LOG_EVERY
    seconds; then write this process (pid, host, start time) into the file when it is a
    regular file. On timeout a :class:`ServiceError` names the lock and its holder."""
    from tlsweep.errors import ServiceError

    limit = lock_timeout() if timeout is None else timeout
    start = time.monotonic()
    last = -LOCK_LOG_EVERY
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited >= limit:
                raise ServiceError(
                    f"{lock_path}: still held by {lock_holder(lock_path)} after {limit:g}s "
                    f"(another process {doing}); let it finish or stop it, or wait longer "
                    "with TLSWEEP_LOCK_TIMEOUT=<seconds>"
                ) from None
            if waited - last >= LOCK_LOG_EVERY:
                last = waited
                log.info(
                    "waiting for %s, held by %s (waiting for another process %s; %.0fs so far, "
                    "at most %gs)",
                    lock_path,
                    lock_holder(lock_path),
                    doing,
                    waited,
                    limit,
                )
            time.sleep(LOCK_POLL)
    with contextlib.suppress(OSError):
        if os.path.isfile(lock_path):
            since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)


@contextlib.contextmanager
def held_lock(lock_path: Path, doing: str, timeout: float | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path``; the OS releases it if the holder dies. The wait
    for it is bounded and says who holds it (:func:`wait_flock`).

    ``cache clear`` may delete a lock file nobody holds; a process that opened it just before
    would then lock a deleted file while a newcomer locks a new one, so the lock is taken
    again until the file locked is the one at the path.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            wait_flock(fd, lock_path, doing, timeout)
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


def temp_beside(path: Path, suffix: str = "") -> Path:
    """A temporary name beside ``path`` (same folder, so the rename is atomic) that says who
    writes it: ``<name>.tmp-<host>-<pid>-<id><suffix>``."""
    who = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f"{path.name}.tmp-{who}{suffix}")


@contextlib.contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write (``suffix`` for writers that
    want one, e.g. ``.keras``); once written it is synced and renamed over ``path``, which is
    then whole or absent, never half-written. On any failure (Ctrl-C too) the temporary file
    is removed and the error raised."""
    tmp = temp_beside(Path(path), suffix)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, whole or not at all (:func:`replaced_atomically`)."""
    with replaced_atomically(path) as tmp, open(tmp, mode, **open_args) as f:
        yield f
