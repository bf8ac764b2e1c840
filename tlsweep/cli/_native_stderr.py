"""Keep TensorFlow's native start-up chatter off the terminal, and everything else on it.

TensorFlow 2.21 writes absl log lines straight to file descriptor 2 when it is imported and
when it first looks for devices: the oneDNN notice, "Could not find cuda drivers", and on every
machine without a GPU an alarming ``E0000 ... failed call to cuInit``. No setting silences
them (``TF_CPP_MIN_LOG_LEVEL`` included: tensorflow/tensorflow#100442), so the CLI does it at
the file-descriptor level:

- Python's own ``sys.stderr`` (logging, warnings, the progress bar, tracebacks) keeps writing
  to the terminal directly, through a duplicate of the original descriptor;
- descriptor 2, which only native code and child processes write to, becomes a pipe into a
  small filter *process* that drops the known start-up lines and passes everything else
  through unchanged and at once. Being a process, it outlives a crash of the CLI (an abort
  in native code, ``kill -9``) and still delivers the last words, then exits at end of input.

``tlsweep -v`` leaves descriptor 2 alone. Standard library only: the filter runs this file as
a script, with ``python -I -S``, in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
from collections.abc import Callable

# The lines dropped, by C++ file and message: start-up notices about the CPU build or the
# absence of a CUDA driver, and libjpeg's nameless complaint about a file tlsweep reports
# anyway by name. Other messages from the same files (a real GPU error: cuDNN version
# mismatch, out of memory, no device) pass, as does everything else.
KNOWN = {
    "port": r"oneDNN custom operations are on\b.*",
    "cudart_stub": r"Could not find cuda drivers on your machine, GPU will not be used\.",
    "cuda_platform": r"failed call to cuInit: .*UNKNOWN ERROR \(303\)",
    "cpu_feature_guard": r"This TensorFlow binary is optimized to use available CPU .*",
    "cuda_dnn": r"Unable to register cuDNN factory: .*",
    "cuda_fft": r"Unable to register cuFFT factory: .*",
    "cuda_blas": r"Unable to register cuBLAS factory: .*",
    "computation_placer": r"computation placer already registered\. .*",
    "jpeg_mem": r"Premature end of JPEG data\b.*",
}
SOURCES = tuple(KNOWN)
_RECORD = rb"[IWE]\d{4} [\d:.]+ +\d+ "  # absl's head: level, date, time, thread
_SOURCE_TAGS = tuple(f"{name}.cc:".encode() for name in SOURCES)
# Whole lines, without the newline.
NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|"
    + _RECORD
    + rb"(?:"
    + b"|".join(f"{name}\\.cc:\\d+\\] {text}".encode() for name, text in KNOWN.items())
    + rb")"
    rb"|To enable the following instructions: .*rebuild TensorFlow with the appropriate "
    rb"compiler flags\."
)
_STARTS = (b"WARNING: All log messages before absl", b"To enable the following instructions")
_RECORD_HEAD = re.compile(rb"[IWE]\d{0,4}(?: [\d:.]*(?: +\d*)?)?")  # an unfinished head
# An unfinished line that may still be noise is held back at most this long (seconds).
HOLD_S = 0.2
ENV_FLAG = "TLSWEEP_NATIVE_STDERR_FILTER"


def _starts(whole: bytes, partial: bytes) -> bool:
    """Whether ``partial`` and ``whole`` agree on their common length."""
    n = min(len(whole), len(partial))
    return whole[:n] == partial[:n]


def _may_be_noise(partial: bytes) -> bool:
    """Whether an unfinished line can still turn out to be a noise line."""
    if any(_starts(s, partial) for s in _STARTS):
        return True
    head = re.match(_RECORD, partial)
    if head is None:
        return _RECORD_HEAD.fullmatch(partial) is not None
    rest = partial[head.end() :]
    return any(_starts(tag, rest) for tag in _SOURCE_TAGS)


class LineFilter:
    """Feed bytes in, get the bytes to pass on: noise lines dropped, the rest untouched.

    Output is never delayed except for an unfinished line that can still become noise, and
    then only until its next byte or ``flush``.
    """

    def __init__(self) -> None:
        self._held = b""  # the start of a line that may be noise
        self._passing = False  # inside a line already known not to be noise

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        while data:
            if self._passing:
                nl = data.find(b"\n")
                if nl < 0:
                    out += data
                    return bytes(out)
                out += data[: nl + 1]
                data = data[nl + 1 :]
                self._passing = False
                continue
            nl = data.find(b"\n")
            line = self._held + (data if nl < 0 else data[:nl])
            if nl < 0:
                if _may_be_noise(line):
                    self._held = line
                else:
                    out += line
                    self._held = b""
                    self._passing = True
                return bytes(out)
            self._held = b""
            data = data[nl + 1 :]
            if not NOISE.fullmatch(line):
                out += line + b"\n"
        return bytes(out)

    def flush(self) -> bytes:
        """The held-back start of a line, given up on: it is passed on as it is."""
        out, self._held = self._held, b""
        if out:
            self._passing = True
        return out


def run_filter(read_fd: int = 0, write_fd: int = 1) -> None:
    """Copy ``read_fd`` to ``write_fd`` through a :class:`LineFilter` until end of input."""
    f = LineFilter()
    while True:
        if f.holding and not select.select([read_fd], [], [], HOLD_S)[0]:
            _write(write_fd, f.flush())
            continue
        try:
            data = os.read(read_fd, 65536)
        except InterruptedError:
            continue
        if not data:
            _write(write_fd, f.flush())
            return
        _write(write_fd, f.feed(data))


def _write(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except InterruptedError:
            continue
        except OSError:  # the terminal is gone: nothing left to show the output on
            return


def install() -> Callable[[], None] | None:
    """Route descriptor 2 through the filter process; ``sys.stderr`` keeps the terminal.

    Returns the function that undoes it (call it before the process ends: it hands
    descriptor 2 back and waits briefly for the filter to pass on the last lines), or None
    when nothing was done: already done by a parent tlsweep, no descriptor 2, or a failure
    setting it up (then everything stays as it was).
    """
    if os.environ.get(ENV_FLAG) or sys.stderr is None:
        return None
    opened: list[int] = []
    try:
        os.fstat(2)
        sys.stderr.flush()
        terminal = os.dup(2)
        opened.append(terminal)
        read_end, write_end = os.pipe()
        opened += [read_end, write_end]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=read_end,
            stdout=terminal,
            stderr=terminal,
            close_fds=True,
            start_new_session=True,  # Ctrl-C in the terminal is not for the filter
        )
        os.dup2(write_end, 2)
    except (OSError, subprocess.SubprocessError):  # never worse off than without the filter
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None
    os.close(read_end)
    os.close(write_end)
    previous = sys.stderr
    sys.stderr = open(  # noqa: SIM115 - closed by restore()
        terminal,
        "w",
        buffering=1,
        encoding=getattr(previous, "encoding", None) or "utf-8",
        errors="backslashreplace",
        closefd=False,
    )
    os.environ[ENV_FLAG] = "1"  # child processes write through this filter already

    def restore() -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or file
            sys.stderr.flush()
        sys.stderr = previous
        os.environ.pop(ENV_FLAG, None)
        with contextlib.suppress(OSError):
            os.dup2(terminal, 2)  # our end of the pipe closes: the filter sees end of input
            os.close(terminal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # its last lines out before ours; longer if children remain

    return restore


if __name__ == "__main__":
    run_filter()
