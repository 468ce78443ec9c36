"""Commands to the primary of a Redis (or Valkey) replication group that Sentinel watches.

The URL names the sentinels and the group, and carries the primary's database, credentials and
TLS settings as a `redis://` URL does:

    redis+sentinel://[[user]:password@]host1[:26379][,host2[:26379]...]/GROUP[/DB][?options]
    rediss+sentinel://...   (TLS to the sentinels and the primary)

Sentinels usually run without a password; `?sentinel_password=` (and `sentinel_username=`) give
them one. The primary's address is asked of the sentinels, in the URL's order, on the first call;
the answer is checked (`ROLE` must say master: a sentinel that has not yet seen a failover names
the old primary), and every command then goes to it over one pipelined connection
(policy_engine/quota/resp.py, with its timeouts and stall detection). It is asked again:
- when the connection to the primary breaks (refused, lost, dropped as stalled): the call fails
  (it may have run), and the next call asks the sentinels, which name the promoted replica once
  the failover is done. A late reply alone fails its own call only, as on any connection;
- when the primary answers READONLY (it was demoted: the old primary back as a replica), or
  LOADING or MASTERDOWN (it cannot serve yet): the command did not run or wrote nothing (the
  scripts fail at their first write), so it is sent once more, to the primary the sentinels
  name now. The old connection is closed once the commands already on it are answered.
While no primary can be found, calls fail at once with the last error for MIN_ASK_INTERVAL_S,
instead of each asking every sentinel again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from policy_engine.quota.discovery import Discovery
from policy_engine.quota.resp import (
    Address,
    Arg,
    Endpoint,
    RedisLost,
    RedisNotSent,
    RedisReplyError,
    RedisUnreachable,
    RespConnection,
    endpoint,
)

log = logging.getLogger("policy_engine.quota")

SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
SENTINEL_PORT = 26379
MIN_ASK_INTERVAL_S = 0.25
# Replies that mean the command did not run, or wrote nothing, on a node that is no primary now.
_NOT_PRIMARY = ("READONLY", "LOADING", "MASTERDOWN")
RETIRE_WAIT_S = 5.0  # the longest a retired connection is kept for the replies still due on it
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SCHEMES


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[Address, ...]
    group: str
    primary: Endpoint  # database, credentials and TLS; the address comes from the sentinels
    primary_url: str  # the same as a redis[s]:// URL with a placeholder host (for redis-py)
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:  # never a password
        where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelTarget({where} group={self.group} db={self.primary.db})"

    def sentinel(self, address: Address) -> Endpoint:
        host, port = address
        return Endpoint(
            host=host,
            port=port,
            username=self.sentinel_username,
            password=self.sentinel_password,
            tls=self.primary.tls,
        )


def sentinel_target(url: str) -> SentinelTarget:
    """What a redis+sentinel:// URL names; a ValueError for what this client cannot honour
    (the messages never carry the URL: it may hold a password)."""
    parts = urllib.parse.urlsplit(url)
    scheme = SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"not a Sentinel URL (redis+sentinel:// or rediss+sentinel://): {parts.scheme}://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_address(part) for part in hosts.split(",") if part.strip())
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel: redis+sentinel://host:26379/GROUP")
    path = [urllib.parse.unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a Sentinel URL's path is /GROUP or /GROUP/DB (the name sentinels monitor)")
    group, db = path[0], path[1] if len(path) == 2 else "0"
    if not (db.isascii() and db.isdigit()):
        raise ValueError(f"the database of a Sentinel URL is a number, not {db!r}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "db" for name, _ in query):
        raise ValueError("a Sentinel URL gives its database in the path (/GROUP/DB), not as ?db=")
    options = {name: value for name, value in query if name in _SENTINEL_OPTIONS}
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name not in _SENTINEL_OPTIONS])
    credentials = f"{userinfo}@" if userinfo else ""
    primary_url = f"{scheme}://{credentials}primary/{db}" + (f"?{rest}" if rest else "")
    return SentinelTarget(
        sentinels=sentinels,
        group=group,
        primary=endpoint(primary_url),  # read as a redis:// URL is: one parser, one set of options
        primary_url=primary_url,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def _address(text: str) -> Address:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or str(SENTINEL_PORT)
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host, port = text, str(SENTINEL_PORT)
    if not host or (":" in host and not text.startswith("[")) or not (port.isascii() and port.isdigit()):
        raise ValueError(f"a sentinel is host[:port] or [IPv6]:port, not {text!r}")
    if not 0 < int(port) <= 65535:
        raise ValueError(f"a sentinel's port is 1-65535, not {port}")
    return urllib.parse.unquote(host), int(port)


class RespSentinel:
    """Commands to the primary the sentinels name, each bounded by `timeout_s` as
    RespConnection's are (asking a sentinel and checking the primary's role too)."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self._target = sentinel_target(url)
        self._timeout_s = timeout_s
        self._sentinels = {
            address: RespConnection(self._target.sentinel(address), timeout_s=timeout_s)
            for address in self._target.sentinels
        }
        self._primary: tuple[Address, RespConnection] | None = None
        self._search = Discovery(
            self._find,
            name="redis sentinel",
            doing="asking the sentinels",
            min_interval_s=MIN_ASK_INTERVAL_S,
            found=self._found,
            discard=lambda found: self._close_soon(found[1]),
        )
        self._closing: set[asyncio.Task[None]] = set()  # connections closed in the background
        self._closed = False

    async def call(self, *args: Arg, key: str | None = None) -> Any:
        """The command's reply; `key` is ignored (the primary holds every key)."""
        for attempt in (1, 2):
            connection = await self._current()
            try:
                return await connection.call(*args)
            except RedisReplyError as error:
                # A demoted primary refuses the first write, which aborts a script before it
                # has written anything (Redis 6 reports it inside an ERR, hence "in").
                message = str(error)
                if attempt == 2 or not any(reason in message for reason in _NOT_PRIMARY):
                    raise
                self._forget(connection)
            except (RedisNotSent, RedisLost):
                if connection.broken:
                    self._forget(connection)
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        primary, self._primary = self._primary, None
        try:
            await self._search.close()
        finally:
            if primary is not None:
                await primary[1].close()
            for connection in self._sentinels.values():
                await connection.close()
            closing = list(self._closing)
            for task in closing:
                task.cancel()  # stop waiting for replies: close now
            await asyncio.gather(*closing, return_exceptions=True)

    def _forget(self, connection: RespConnection) -> None:
        """The primary failed or is one no more: the next call asks the sentinels again."""
        if self._primary is not None and self._primary[1] is connection:
            self._primary = None
            self._close_soon(connection)

    def _close_soon(self, connection: RespConnection) -> None:
        """Close in the background once the commands already sent have their replies (their
        callers get their own answers, READONLY included, and resend): a caller must not wait."""
        closing = asyncio.get_running_loop().create_task(self._retire(connection))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    @staticmethod
    async def _retire(connection: RespConnection) -> None:
        try:
            deadline = asyncio.get_running_loop().time() + RETIRE_WAIT_S
            while not connection.idle and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            await connection.close()

    async def _current(self) -> RespConnection:
        if self._closed:
            raise RedisUnreachable("the connection was closed")
        if self._primary is not None:
            # (On a new event loop too: the connection makes itself again there.)
            return self._primary[1]
        _, connection = await self._search.result()
        return connection

    def _found(self, found: tuple[Address, RespConnection]) -> None:
        address, _ = found
        previous, self._primary = self._primary, found
        if previous is not None:  # (a search starts only without one; kept safe all the same)
            self._close_soon(previous[1])
        if previous is None or previous[0] != address:
            log.info("redis sentinel: primary of %s at %s:%d", self._target.group, *address)

    async def _find(self) -> tuple[Address, RespConnection]:
        """The primary the first answering sentinel names, once it says it is one."""
        failures: list[str] = []
        for sentinel, asking in self._sentinels.items():
            where = f"sentinel {sentinel[0]}:{sentinel[1]}"
            try:
                reply = await asking.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._target.group)
            except (RedisNotSent, RedisLost, RedisReplyError) as error:
                failures.append(f"{where}: {error}")
                continue
            if reply is None:
                failures.append(f"{where} knows no group named {self._target.group!r}")
                continue
            try:
                host = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                address = (host, int(reply[1]))
            except (TypeError, ValueError, IndexError, UnicodeDecodeError):
                failures.append(f"{where} answered {reply!r}")
                continue
            target = dataclasses.replace(self._target.primary, host=address[0], port=address[1])
            connection = RespConnection(target, timeout_s=self._timeout_s)
            try:
                role = await connection.call("ROLE")
            except (RedisNotSent, RedisLost, RedisReplyError) as error:
                await connection.close()
                failures.append(f"{where} names {address[0]}:{address[1]}, which failed: {error}")
                continue
            except BaseException:  # cancelled (closing): the socket must not leak
                await connection.close()
                raise
            if not isinstance(role, list) or not role or role[0] not in (b"master", "master"):
                await connection.close()
                # Not yet told of a failover: another sentinel may have been.
                failures.append(f"{where} names {address[0]}:{address[1]}, which is not a primary")
                continue
            return address, connection
        raise RedisUnreachable(f"no primary of {self._target.group!r} found: " + "; ".join(failures))
