"""Child processes of the demo: started in their own sessions, stopped by PID, never left behind.

Each child gets its own session so a Ctrl-C in the terminal reaches only the demo, which then
stops the children in order (gateway first, backends last). On Linux each child also asks the
kernel for SIGTERM when the demo dies, so even a SIGKILLed demo leaves nothing running; an
atexit hook is the last safety net for the ordinary exit paths.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class DemoError(Exception):
    """A problem the user can fix (a port in use, a missing binary, a child that did not start)."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; the setting survives exec (not setuid).
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port(host: str, port: int, option: str) -> None:
    """Raise DemoError naming the option to change when `port` cannot be bound."""
    if port == 0:
        return
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                why = "is taken" if error.errno == errno.EADDRINUSE else "is not permitted"
                hint = f"use {option} PORT, or {option} 0 for any free port"
                raise DemoError(f"port {port} {why} ({hint})") from None
            raise DemoError(f"cannot use port {port}: {error.strerror}") from None


def wait_for(condition: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]) -> None:
    """Poll `condition` until true; DemoError when the child dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if condition():
                return
        if not alive():
            raise DemoError(f"{what}: the process exited")
        time.sleep(0.05)
    raise DemoError(f"{what}: not ready within {timeout:.0f}s")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class ProcessGroup:
    """The demo's children; `stop_all` is idempotent and also registered with atexit."""

    workdir: Path
    children: list[Child] = field(default_factory=list)
    pid_file: Path | None = None

    def __post_init__(self) -> None:
        atexit.register(self.kill_all)

    def start(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                list(args),
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        child = Child(name, process, log)
        self.children.append(child)
        self._write_pids()
        return child

    def _write_pids(self) -> None:
        if self.pid_file is not None:
            data = {"demo": os.getpid(), "children": {c.name: c.pid for c in self.children}}
            self.pid_file.write_text(json.dumps(data))

    def stop(self, child: Child, grace_s: float) -> int:
        """SIGTERM, wait up to `grace_s`, then SIGKILL; the exit code."""
        if child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                child.process.wait(5)
        return int(child.process.returncode)

    def stop_all(self, grace_s: float = 8.0) -> list[str]:
        """Stop children in reverse start order; what was stopped, for the summary."""
        stopped = []
        for child in reversed(self.children):
            was_running = child.alive()
            code = self.stop(child, grace_s)
            if was_running:
                stopped.append(f"{child.name} (pid {child.pid}, exit {code})")
        return stopped

    def kill_all(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(5)
