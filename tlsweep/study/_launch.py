"""The local worker processes of ``run --workers N``: starting, handing over, stopping.

The parent starts N ``python -m tlsweep run ... --worker-index I`` processes on the same study.
When features are missing, the workers first extract them (on one machine, one process per entry
with every core while the others wait: :mod:`tlsweep.features._shards`), then wait for ``go`` on
their stdin until the study is ready (:func:`wait_for_go`); otherwise they are started to run trials
at once (:func:`run_workers`). A worker never outlives its parent (:func:`die_with_parent`); a
Ctrl-C or SIGTERM of the parent reaches every worker, which closes its trial and its runs and
stops.

What a worker does on the study is :mod:`tlsweep.study._runner`'s; this module knows only processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tlsweep.config import SweepConfig
from tlsweep.errors import StudyFailing

log = logging.getLogger(__name__)

# Seconds a worker that extracted features first is given to exit by itself once told there
# are no trials for it (the end of its input), before it is sent SIGTERM.
STOP_HELD_WAIT = 5.0

PARENT_PID_ENV = "TLSWEEP_PARENT_PID"  # set by `run --workers N` for its workers
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_workers(
    n: int, argv: Sequence[str], extra_env: dict[str, str], extract_first: bool = False
) -> list[Any]:
    """Start the ``n`` worker processes of `run --workers N` (they stop if this process dies).

    With ``extract_first``, each first extracts the missing features (one of them per entry, with
    every core; the others wait, and take over if it dies: :mod:`tlsweep.features._shards`), then
    waits for a line on its stdin: ``go`` once the study is ready (:func:`run_workers`), anything
    else or the end of input to stop (:func:`stop_held`). Starting the workers that will run the
    trials, not other processes, costs no extra start.
    """
    # they stop if this process dies; extra_env: what must not show on a command line
    env = {**os.environ, **extra_env, PARENT_PID_ENV: str(os.getpid())}
    extra = ["--extract-first"] if extract_first else []
    procs: list[Any] = []
    try:
        for i in range(n):
            cmd = [sys.executable, "-m", "tlsweep", *argv, *extra, "--worker-index", str(i)]
            stdin = subprocess.PIPE if extract_first else None
            procs.append(subprocess.Popen(cmd, env=env, stdin=stdin))
    except BaseException:
        stop_held(procs)
        raise
    return procs


def extract_in_workers(
    n: int, argv: Sequence[str], extra_env: dict[str, str], ready: Callable[[], bool]
) -> list[Any]:
    """Start the workers on the missing features and wait until ``ready()`` (every entry is
    published); returns them, waiting for ``go``. If one stops first, the others are stopped
    and [] returned: this process then extracts what is left itself, and meets (and reports)
    the cause itself."""
    log.info("extracting the missing features with %d workers", n)
    procs = _start_workers(n, argv, extra_env, extract_first=True)
    try:
        while not ready():
            stopped = [p for p in procs if p.poll() is not None]
            if stopped:
                log.warning(
                    "a worker stopped while extracting features (exit code %s); extracting in "
                    "this process instead",
                    stopped[0].returncode,
                )
                stop_held(procs)
                return []
            time.sleep(0.5)
    except BaseException:
        stop_held(procs)
        raise
    return procs


def stop_held(procs: list[Any]) -> None:
    """Stop workers started with ``extract_first`` that will not run trials, extracting or
    waiting for ``go`` (this process is stopping, or extracts what is left itself)."""
    for p in procs:  # one waiting for `go` reads the end of its input and exits
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
    deadline = time.monotonic() + STOP_HELD_WAIT
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:  # still extracting: stop it as a Ctrl-C would
        with contextlib.suppress(ProcessLookupError):
            if p.poll() is None:
                p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for_go(cfg: SweepConfig) -> bool:
    """A worker started with ``--extract-first``: extract the missing features (or wait for
    this machine's extractor), then wait for the parent; True to go on with the trials, False
    to stop."""
    from tlsweep.features import extract_all

    extract_all(cfg)
    return sys.stdin.readline().strip() == "go"


def run_workers(
    n: int, argv: Sequence[str], extra_env: dict[str, str], procs: list[Any] | None = None
) -> None:
    """Run ``n`` worker processes on the study (or let the ``procs`` waiting for ``go`` run)
    and wait for them."""
    try:
        if procs:
            for p in procs:
                with contextlib.suppress(OSError):  # one that died is counted below
                    p.stdin.write(b"go\n")
                    p.stdin.close()
        else:
            procs = _start_workers(n, argv, extra_env)
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too (one process group); a SIGTERM only reached us:
        # pass it on, so each worker closes its trial and runs and stops.
        for p in procs or []:
            with contextlib.suppress(ProcessLookupError):
                if p.poll() is None:
                    p.terminate()
        for p in procs or []:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop within 60s of SIGTERM: killed", p.pid)
                p.kill()
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        raise StudyFailing(
            f"{len(bad)} of {n} workers exited with an error (codes {bad}); see above"
        )


def die_with_parent() -> None:
    """Make this worker get SIGTERM when the ``run --workers N`` process that started it dies.

    Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) covers every death, ``kill -9``
    included; elsewhere a thread watches the parent pid. If the parent died before the signal
    was armed, this process is re-parented already: it stops at once. The SIGTERM handler of the
    command then closes the running trial and its runs, as for a Ctrl-C.
    """
    import signal

    expected = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    armed = False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: no prctl in the C library
        armed = False
    if os.getppid() != expected:
        log.debug("the parent %d is gone before this worker started: stopping", expected)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not armed:

        def watch() -> None:
            while os.getppid() == expected:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="tlsweep-parent-watch", daemon=True).start()
