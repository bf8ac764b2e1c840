"""The MLflow UI server that ``tlsweep ui`` starts, owns and stops.

The server (``mlflow ui``: a launcher, its uvicorn workers and MLflow's job runner) runs in a
session and process group of its own, so it never sees the terminal's signals directly and
:meth:`UiServer.stop` can end every process of it at once: SIGTERM to the group, SIGKILL to
what is left after a grace period, and a check that no member of the group survives. If
``tlsweep ui`` itself is killed (even by SIGKILL), Linux's parent-death signal sends the server
SIGTERM.
A port that is taken is found before the server starts (:func:`check_port_free`) and again
when the server exits early; a server that does not answer in time is stopped.

No printing here, and no MLflow import: the CLI prints, :mod:`tlsweep.tracking` talks to MLflow.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tlsweep.errors import TlsweepError

log = logging.getLogger(__name__)

STOP_GRACE = 15.0  # seconds the server's processes get to exit after SIGTERM, before SIGKILL
# Run in the launcher before it becomes `python -m mlflow`: Linux sends it SIGTERM when tlsweep
# dies, even by SIGKILL (the parent-death signal survives exec), and MLflow's launcher passes
# SIGTERM on to its uvicorn server. argv: tlsweep's pid, then the arguments of `mlflow`.
_LAUNCHER = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):  # tlsweep died before prctl
        sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "mlflow", *sys.argv[2:]])
"""


class ServerError(TlsweepError):
    """The server cannot be started or did not come up: a runtime failure (exit code 1)."""


class PortInUseError(ServerError):
    """The port is taken by another process."""

    def __init__(self, host: str, port: int):
        super().__init__(
            f"--port {port}: {_hostport(host, port)} is already in use; pick another with --port N"
        )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine (a wildcard -> loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def base_url(host: str, port: int) -> str:
    return f"http://{_hostport(client_host(host), port)}"


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` if a server could not listen on ``host:port`` now.

    Binds as uvicorn does (SO_REUSEADDR, so a closed connection's TIME_WAIT does not count).
    An address this machine does not have is a usage error naming ``--host``.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TlsweepError(
            f"--host {host}: cannot resolve it ({e.strerror}); give an address of this "
            "machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    for family, type_, proto, _, addr in infos:
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUseError(host, port) from None
                if e.errno == errno.EADDRNOTAVAIL:
                    raise TlsweepError(
                        f"--host {host}: not an address of this machine; "
                        "give one it has, e.g. 127.0.0.1 or 0.0.0.0"
                    ) from None
                if e.errno == errno.EACCES:
                    raise TlsweepError(
                        f"--port {port}: ports below 1024 need root; pick one from 1024 to 65535"
                    ) from None
                raise


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    if not os.path.isdir("/proc"):  # not Linux: whether the group has any process at all
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(d.name))
    return members


class UiServer:
    """``mlflow ui`` on one tracking store, in its own session, stopped as a whole."""

    def __init__(self, tracking_uri: str, host: str, port: int):
        self.tracking_uri = tracking_uri
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            _LAUNCHER,
            str(os.getpid()),
            "ui",  # the store's URI goes by the environment (MLFLOW_BACKEND_STORE_URI): not in ps
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",  # one user, one browser: MLflow's default of 4 only costs start-up time
        ]

    def start(self) -> int:
        """Start the server in a new session (its own process group); returns its pid."""
        env = dict(os.environ)
        env["MLFLOW_BACKEND_STORE_URI"] = self.tracking_uri  # a password stays out of `ps`
        # MLflow's job runner (huey consumers, for GenAI scorers and trace roll-ups) adds seven
        # processes the training-runs pages do not use: off unless the user's environment sets
        # MLFLOW_SERVER_ENABLE_JOB_EXECUTION.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        log.debug("started the MLflow server, pid %d: mlflow %s", self.proc.pid, self.command()[4:])
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        """Return once the server answers its health check; raise :class:`ServerError` if not.

        An early exit is reported as a taken port when the port is taken now (another process
        got it first), else with the server's exit code; after ``timeout`` seconds the server
        is stopped and the error says what was waited for.
        """
        if self.proc is None:
            raise RuntimeError("UiServer.start() first")
        health = f"{self.url}/health"
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                check_port_free(self.host, self.port)
                raise ServerError(
                    f"the MLflow server exited with code {rc} before it answered on {health}; "
                    "its messages are above"
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):  # not listening yet, or still starting
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerError(
                    f"the MLflow server did not answer on {health} within {timeout:g} s; "
                    "stopped it (a busy machine may need more: --start-timeout SECONDS)"
                )
            time.sleep(0.25)

    def wait(self) -> int:
        if self.proc is None:
            raise RuntimeError("UiServer.start() first")
        return self.proc.wait()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """End every process of the server's group: SIGTERM, then SIGKILL after ``grace``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # a session leader's group id is its pid
        self._signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:  # e.g. a slow exit on a loaded machine
            log.debug("the MLflow server did not stop within %g s: killing it", grace)
            self._signal_group(pgid, signal.SIGKILL)
            self.proc.wait()
        # Its workers and job runner are in the group too: give them the same grace.
        deadline = time.monotonic() + grace
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_members(pgid):
            self._signal_group(pgid, signal.SIGKILL)
            end = time.monotonic() + 5
            while group_members(pgid) and time.monotonic() < end:
                time.sleep(0.1)
        left = group_members(pgid)
        if left:
            log.warning("processes of the MLflow server still running: %s", left)
        self.proc = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
