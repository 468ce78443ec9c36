"""One pipelined connection to a Redis (or Valkey) server, for the quota script.

Every request runs one script on the server, so the client's cost per call is the quota store's
cost per request. A general client pays for a connection pool, per-command hooks and a timer
task per call (~150 µs of CPU per call with redis-py's asyncio client on the project's machine);
this one writes the command to a single connection and waits for its reply in order (~70 µs;
docs/BENCHMARKS.md). The server runs commands one at a time anyway, so one connection
carrying every caller's commands (pipelining) loses nothing to a pool.

Failures say whether the command can have run, which decides whether a reservation it made can
be counted on:
- RedisNotSent: nothing was sent; RedisUnreachable, its kind for when no connection could be
  made (or its AUTH/SELECT failed);
- RedisLost: sent, but the reply did not come in time or the connection broke: it may have run;
- RedisReplyError: the server answered with an error.

A call whose reply is later than the timeout fails alone, as it would on a connection of its own:
the replies behind it keep their order, and the late reply is dropped when it comes. A
connection on which the oldest command has waited STALL_TIMEOUTS timeouts (at least
MIN_STALL_S) is taken for dead (a half-open socket, a hung server) and dropped, failing every
command on it, whether or not its caller still waits; the next call connects again. (Checked
from the first timeout on, until the late command is answered: a dead connection is dropped
whether or not other calls follow, so a call long after a stall never waits on it.) Callers
arriving while a connection is being made share that one attempt, and its failure. URLs are
read as redis-py reads them (the canary store uses redis-py with the same URL): `redis://`,
`rediss://` (TLS) and `unix://`, with user, password and database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

Arg = str | bytes | int | float
Address = tuple[str, int]  # a server's host and port

STALL_TIMEOUTS = 4
MIN_STALL_S = 1.0


class RedisNotSent(Exception):
    """The command was never sent (it could not be encoded, or there is no connection)."""


class RedisUnreachable(RedisNotSent):
    """No connection could be made: the command was never sent."""


class RedisLost(Exception):
    """The command was sent but no reply came (timeout, connection broken): it may have run."""


class RedisReplyError(Exception):
    """The server answered with an error (the message is the server's)."""


@dataclass(frozen=True)
class Endpoint:
    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:  # never the password
        where = self.path or f"{self.host}:{self.port}"
        return f"Endpoint({'tls ' if self.tls else ''}{where} db={self.db})"


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_URL_OPTIONS = frozenset(
    {"host", "port", "path", "db", "username", "password", "connection_class"}
    | {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
)


def endpoint(url: str) -> Endpoint:
    """The server a URL names; a ValueError for what this client cannot honour."""
    options: dict[str, Any] = dict(parse_url(url))
    unknown = sorted(set(options) - _URL_OPTIONS)
    if unknown:
        raise ValueError(f"redis URL option(s) not supported by the quota store: {', '.join(unknown)}")
    kind = options.get("connection_class")
    tls = None
    if kind is SSLConnection:
        tls = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
        requirement = options.get("ssl_cert_reqs", "required")
        if requirement not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {requirement!r}")
        check_hostname = options.get("ssl_check_hostname", requirement == "required")
        tls.check_hostname = bool(check_hostname) and requirement != "none"
        tls.verify_mode = _CERT_REQS[requirement]
        if options.get("ssl_certfile"):
            tls.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    if kind is UnixDomainSocketConnection and not options.get("path"):
        raise ValueError("a unix:// redis URL needs an absolute socket path (unix:///path/redis.sock)")
    return Endpoint(
        host=options.get("host") or "localhost",
        port=int(options.get("port") or 6379),
        path=options.get("path") if kind is UnixDomainSocketConnection else None,
        db=int(options.get("db") or 0),
        username=options.get("username"),
        password=options.get("password"),
        tls=tls,
    )


class _Connection(asyncio.Protocol):
    """A connection's replies, handed to the waiting calls in the order the commands went out."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        # Each command's reply waiter and when the command went out, oldest first.
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.open = False
        # Commands sent and replies received so far: a timer set for command n knows its reply
        # came when more than n replies have, whether or not its caller is still waiting.
        self.sent = 0
        self.answered = 0
        # Set while a late command waits: drops the connection at the stall limit even if no
        # other call comes to notice it.
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.open = True

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as error:
                self.abort(RedisLost(f"redis protocol error: {error}"))
                return
            if reply is False:
                return
            waiter, _ = self.waiting.popleft()
            self.answered += 1
            if waiter.done():  # its caller gave up, or it timed out
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(RedisReplyError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self._fail(RedisLost(reason))

    def send(self, args: tuple[Arg, ...]) -> tuple[asyncio.Future[Any], int]:
        """The waiter of the command's reply, and the command's number on this connection."""
        assert self.transport is not None
        if not self.open:  # lost, aborted or closed: a write would go nowhere (or hang in a buffer)
            raise RedisNotSent("the connection is closed")
        try:
            # hiredis's stub types the argument as a 1-tuple; any tuple of arguments is meant.
            data = hiredis.pack_command(args)  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:  # before queueing a waiter: replies stay aligned
            raise RedisNotSent(f"cannot encode the command: {type(error).__name__}: {error}") from error
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((waiter, loop.time()))
        self.transport.write(data)
        self.sent += 1
        return waiter, self.sent - 1

    def abort(self, error: Exception) -> None:
        """Fail every waiting call with `error`, then drop the connection."""
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        self.open = False
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiting:
            waiter, _ = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class RedisClient(Protocol):
    """What the quota store needs of a server or a cluster."""

    async def call(self, *args: Arg, key: str | None = None) -> Any: ...

    async def close(self) -> None: ...


class RespConnection:
    """Commands to one server over one pipelined connection, each bounded by `timeout_s`
    (connecting, AUTH and SELECT too). Reconnects on the next call after a failure."""

    def __init__(self, target: str | Endpoint, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self._endpoint = endpoint(target) if isinstance(target, str) else target
        self._timeout_s = timeout_s
        self._stall_s = max(MIN_STALL_S, STALL_TIMEOUTS * timeout_s)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def call(self, *args: Arg, key: str | None = None) -> Any:
        """The command's reply. `key` is ignored (one server holds every key): it lets a cluster
        client (policy_engine/quota/cluster.py), which routes by it, stand in."""
        connection = self._connection
        if connection is None or not connection.open or self._loop is not asyncio.get_running_loop():
            connection = await self._connect()
        waiter, number = connection.send(args)
        return await self._await(connection, waiter, number)

    async def call_asking(self, *args: Arg) -> Any:
        """The command preceded by ASKING, with nothing between them on the connection: a Redis
        Cluster node takes a command for a slot it is importing only right after ASKING, and
        another caller's command in between would use up the flag."""
        connection = self._connection
        if connection is None or not connection.open or self._loop is not asyncio.get_running_loop():
            connection = await self._connect()
        asking, asking_number = connection.send(("ASKING",))
        waiter, number = connection.send(args)
        # ASKING's own outcome does not matter: refused or lost, the command fails by itself.
        outcomes: tuple[Any, Any] = await asyncio.gather(
            self._await(connection, asking, asking_number),
            self._await(connection, waiter, number),
            return_exceptions=True,
        )
        reply = outcomes[1]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    @property
    def broken(self) -> bool:
        """Whether the connection was made and has been lost, aborted or closed since (a late
        reply alone leaves it open: the calls behind it still get theirs)."""
        return self._closed or (self._connection is not None and not self._connection.open)

    @property
    def idle(self) -> bool:
        """Whether no command waits for its reply and no caller for a connection."""
        connecting = self._connecting is not None and not self._connecting.done()
        return not connecting and (self._connection is None or not self._connection.waiting)

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        attempt, self._connecting = self._connecting, None
        if attempt is not None and not attempt.done() and self._loop is asyncio.get_running_loop():
            attempt.cancel()
        if connection is not None and connection.open:
            # Fails the calls still waiting now (they may have run) and drops any unsent buffer.
            # RuntimeError: made on an event loop that is closed; nothing runs there any more.
            with contextlib.suppress(RuntimeError):
                connection.abort(RedisLost("the connection was closed"))

    async def _await(self, connection: _Connection, waiter: asyncio.Future[Any], number: int) -> Any:
        timer = asyncio.get_running_loop().call_later(
            self._timeout_s, self._expire, connection, waiter, number
        )
        try:
            return await waiter
        finally:
            # A cancelled caller leaves its timer set: the command still holds the connection's
            # queue, and a server that never answers it must not go unnoticed.
            if not waiter.cancelled():
                timer.cancel()

    def _expire(self, connection: _Connection, waiter: asyncio.Future[Any], number: int) -> None:
        if connection.answered > number:
            return  # answered (its caller had gone)
        if not waiter.done():
            waiter.set_exception(RedisLost(f"no reply within {self._timeout_s:g} s"))
        if connection.watchdog is None:
            self._watch(connection)

    def _watch(self, connection: _Connection) -> None:
        """Drop the connection if its oldest command has waited the stall limit; else, while
        that command is late, look again when it will have."""
        connection.watchdog = None
        if not connection.open or not connection.waiting:
            return  # failed with the connection, or every reply came
        _, oldest = connection.waiting[0]
        loop = asyncio.get_running_loop()
        waited = loop.time() - oldest
        if waited >= self._stall_s:
            connection.abort(RedisLost(f"no reply for {self._stall_s:g} s: connection dropped"))
        elif waited >= self._timeout_s:
            connection.watchdog = loop.call_at(oldest + self._stall_s, self._watch, connection)

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RedisUnreachable("the connection was closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new event loop (tests, embedding): what the old one made is unusable.
            if self._connection is not None:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nothing runs there
                    self._connection.abort(RedisUnreachable("made on another event loop"))
            self._loop, self._connection, self._connecting = loop, None, None
        attempt = self._connecting
        if attempt is None or (attempt.done() and not _made(attempt)):
            attempt = self._connecting = loop.create_task(self._open())
            attempt.add_done_callback(self._opened)
        # Shielded: a caller that gives up does not end the attempt the others wait on.
        try:
            connection = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.cancelled() and task is not None and not task.cancelling():
                raise RedisUnreachable("the connection was closed while connecting") from None
            raise
        if not connection.open:  # closed, or lost before this caller resumed: nothing sent
            raise RedisUnreachable("the connection was closed")
        return connection

    def _opened(self, attempt: asyncio.Task[_Connection]) -> None:
        if attempt.cancelled() or attempt.exception() is not None:  # each waiter has the failure
            return
        connection = attempt.result()
        if self._closed or attempt is not self._connecting:
            connection.abort(RedisUnreachable("the connection was closed"))
            return
        self._connection = connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        target = self._endpoint
        try:
            async with asyncio.timeout(self._timeout_s):
                if target.path is not None:
                    _, connection = await loop.create_unix_connection(_Connection, target.path)
                else:
                    _, connection = await loop.create_connection(
                        _Connection,
                        target.host,
                        target.port,
                        ssl=target.tls,
                        server_hostname=target.host if target.tls else None,
                    )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as error:
            # ValueError: a host name the resolver refuses (an IDNA label over 63 characters).
            raise RedisUnreachable(
                f"cannot connect to {target!r}: {type(error).__name__}: {error}"
            ) from error
        setup: list[tuple[str, ...]] = []
        if target.username is not None:
            # As redis-py does: a user without a password authenticates with an empty one.
            setup.append(("AUTH", target.username, target.password or ""))
        elif target.password is not None:
            setup.append(("AUTH", target.password))
        if target.db:
            setup.append(("SELECT", str(target.db)))
        try:
            for command in setup:
                waiter, number = connection.send(command)
                await self._await(connection, waiter, number)
        except (RedisNotSent, RedisLost, RedisReplyError) as error:
            connection.abort(RedisUnreachable(str(error)))
            raise RedisUnreachable(f"{command[0]} on {target!r} failed: {error}") from error
        except BaseException:  # cancelled (the service closing): the socket must not leak
            connection.abort(RedisUnreachable("connecting was cancelled"))
            raise
        if self._closed:
            connection.abort(RedisUnreachable("the connection was closed"))
            raise RedisUnreachable("the connection was closed")
        return connection


def _made(attempt: asyncio.Task[_Connection]) -> bool:
    """Whether a finished attempt made a connection that is still open."""
    return not attempt.cancelled() and attempt.exception() is None and attempt.result().open
