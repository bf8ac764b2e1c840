"""The local worker processes of ``run --workers N``: each dies with the process that started it."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


PARENT_PID_ENV = "TLSWEEP_PARENT_PID"  # set by `run --workers N` for its workers
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
