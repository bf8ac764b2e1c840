"""How a command stops: Ctrl-C, SIGTERM and SIGHUP, each at a point where nothing is left open.

The CLI routes the three signals to :func:`interrupt`, which raises ``KeyboardInterrupt`` in the
main thread, as Python does for Ctrl-C, so ``try``/``except BaseException`` handlers close what
they own (a trial is failed and queued again, its MLflow run ended, a temporary cache entry
removed). Some steps must not be cut in two, because no handler owns their result yet: a trial
asked from the study but not yet inside the objective that fails it on an interrupt, an MLflow run
created but whose id is not yet known, a trial told complete whose state is not yet recorded.
Inside :func:`deferred` an interrupt is held and raised when the step is whole.

A library may turn the ``KeyboardInterrupt`` raised inside its code into an error of its own
(TensorFlow reports a Python exception raised inside a ``tf.py_function`` as its
``UnknownError``, for one); :func:`requested` still tells that a stop was asked for, so the
study stops instead of counting a failed trial and going on.

Signals are delivered to the main thread only, so the state here is a plain module variable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_held = {"depth": 0, "pending": False, "requested": False}


def interrupt() -> None:
    """Stop now (``KeyboardInterrupt``), or at the end of the :func:`deferred` step running."""
    _held["requested"] = True
    if _held["depth"]:
        _held["pending"] = True
        return
    raise KeyboardInterrupt


def requested() -> bool:
    """Whether a stop was asked for since :func:`clear` (the start of the command)."""
    return _held["requested"]


def clear() -> None:
    """Forget a stop asked for earlier (a new command starts, in the same process)."""
    _held.update(depth=0, pending=False, requested=False)


@contextmanager
def deferred() -> Iterator[Callable[[], None]]:
    """Hold interrupts for a step; yields ``release``, which ends the hold early (raising the
    interrupt that arrived meanwhile, if any), e.g. once a handler that closes the step's
    result is in place. The end of the block releases the hold too."""
    _held["depth"] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        _held["depth"] -= 1
        if _held["depth"] == 0 and _held["pending"]:
            _held["pending"] = False
            raise KeyboardInterrupt

    try:
        yield release
    finally:
        release()
