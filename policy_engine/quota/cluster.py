"""Commands to a Redis (or Valkey) Cluster: each one goes to the node serving its key's slot.

The quota store runs one script per hash tag, and every key of a script shares the tag, so each
call names one slot and goes, pipelined, to that slot's primary over the node's own connection
(policy_engine/quota/resp.py; its timeouts and stall detection hold per node).

The slot map is read with CLUSTER SLOTS from the URL's node on the first call, then from any
node known, and read again when the cluster says it changed:
- MOVED: the slot has a new owner (resharding, a failover). Nothing ran; the command goes to the
  node named, and the map is read again in the background.
- ASK: the slot is being migrated and this key is already on the target. Nothing ran; the
  command goes to the target once, preceded by ASKING.
- TRYAGAIN: a multi-key command whose keys are split by a migration in progress. Nothing ran; it
  is sent again after a short pause.
- A node that cannot be reached or stops answering: the call fails (it may have run), and the
  map is read again, so that calls go to a replica the cluster promotes in its place.
Redirections are followed at most MAX_REDIRECTS times per call, so a cluster that keeps
redirecting fails the call instead of holding it. A call that may have run is never sent again:
a second script run would charge twice.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
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

SLOTS = 16384
MAX_REDIRECTS = 5
TRYAGAIN_PAUSE_S = 0.005
# A burst of failures on a dead node reads the map once per interval, not once per call.
MIN_REFRESH_INTERVAL_S = 0.25


def key_slot(key: str) -> int:
    """The cluster slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole key when it
    has no non-empty {...}."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def seed_endpoint(url: str) -> Endpoint:
    """The cluster node a URL names; a ValueError for what a cluster cannot honour."""
    seed = endpoint(url)
    if seed.path is not None:
        raise ValueError("a Redis Cluster is reached over TCP: a unix:// URL cannot name one")
    if seed.db != 0:
        raise ValueError(f"a Redis Cluster has only database 0; the URL asks for {seed.db}")
    return seed


def slot_map(reply: Any, asked: str) -> list[Address | None]:
    """Each slot's primary from a CLUSTER SLOTS reply. A node announced without a host (NULL,
    or "" from a node that does not know its address) is on the host of the node that
    answered, `asked`, at its own port; one announced as "?" (a hostname preferred but not set)
    cannot be reached, and its slots have no owner. A ValueError for a reply of another shape."""
    owners: list[Address | None] = [None] * SLOTS
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS answered {reply!r}")
    for entry in reply:
        try:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
            port = int(primary[1])
            if host is not None and not isinstance(host, str):
                raise TypeError(f"host {host!r}")
        except (TypeError, ValueError, IndexError, UnicodeDecodeError) as error:
            raise ValueError(f"CLUSTER SLOTS entry {entry!r}: {error}") from None
        if not 0 <= start <= end < SLOTS:
            raise ValueError(f"CLUSTER SLOTS entry {entry!r}: slots out of range")
        address = None if host == "?" else (asked if host in (None, "") else host, port)
        owners[start : end + 1] = [address] * (end - start + 1)
    return owners


def redirect_target(message: str, replied: str) -> tuple[int, Address]:
    """The slot and the node of a MOVED or ASK error ("MOVED 3999 127.0.0.1:6381"); a node
    without a host (":6381") is on the host of the node that replied. A ValueError for another
    shape."""
    _, slot_text, where = message.split(" ", 2)
    host, colon, port = where.strip().rpartition(":")
    slot = int(slot_text)
    if not colon or host == "?" or not 0 <= slot < SLOTS:
        raise ValueError(f"not a redirection this client can follow: {message!r}")
    return slot, (host.strip("[]") or replied, int(port))


class RespCluster:
    """Commands to a Redis Cluster, each routed by the slot of `key`; bounded by `timeout_s`
    per node call as RespConnection's are. The URL names any node of the cluster (a discovery
    endpoint will do); its credentials and TLS settings apply to every node."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        seed = seed_endpoint(url)
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self._seed = seed
        self._timeout_s = timeout_s
        self._nodes: dict[Address, RespConnection] = {}
        self._owners: list[Address | None] | None = None
        self._map = Discovery(
            self._read_map,
            name="redis cluster",
            doing="reading the slot map",
            min_interval_s=MIN_REFRESH_INTERVAL_S,
        )
        self._closed = False

    async def call(self, *args: Arg, key: str | None = None) -> Any:
        if key is None:
            raise ValueError("a cluster routes each command by its key: none was given")
        slot = key_slot(key)
        asking: Address | None = None
        last = ""
        for _ in range(MAX_REDIRECTS + 1):
            if asking is not None:
                node, asking = asking, None
                send = self._node(node).call_asking
            else:
                node = await self._owner(slot)
                send = self._node(node).call
            try:
                return await send(*args)
            except RedisReplyError as error:
                message = last = str(error)
                if message.startswith(("MOVED ", "ASK ")):
                    try:
                        moved_slot, target = redirect_target(message, node[0])
                    except ValueError:
                        raise error from None
                    if message.startswith("ASK "):
                        asking = target
                    else:
                        if self._owners is not None:
                            self._owners[moved_slot] = target
                        self._map.start_soon()
                elif message.startswith("TRYAGAIN"):
                    await asyncio.sleep(TRYAGAIN_PAUSE_S)
                else:
                    if message.startswith("CLUSTERDOWN"):
                        self._map.start_soon()
                    raise
            except (RedisNotSent, RedisLost):
                # The node may be gone for good: the cluster will promote a replica in its place.
                self._map.start_soon()
                raise
        raise RedisNotSent(f"slot {slot} still redirected after {MAX_REDIRECTS} redirections: {last}")

    async def close(self) -> None:
        self._closed = True
        nodes, self._nodes = self._nodes, {}
        try:
            await self._map.close()
        finally:
            for connection in nodes.values():
                await connection.close()

    def _node(self, address: Address) -> RespConnection:
        connection = self._nodes.get(address)
        if connection is None:
            if self._closed:
                raise RedisUnreachable("the connection was closed")
            host, port = address
            target: Endpoint = dataclasses.replace(self._seed, host=host, port=port)
            connection = self._nodes[address] = RespConnection(target, timeout_s=self._timeout_s)
        return connection

    async def _owner(self, slot: int) -> Address:
        if self._owners is None:
            await self._map.result()
        assert self._owners is not None
        owner = self._owners[slot]
        if owner is None:
            self._map.start_soon()
            raise RedisNotSent(f"no node of the cluster serves slot {slot}")
        return owner

    async def _read_map(self) -> None:
        """The slot map from the first node that answers: the known ones, then the URL's."""
        known = {owner for owner in self._owners or () if owner is not None}
        candidates = [*sorted(known), (self._seed.host, self._seed.port)]
        failures: list[str] = []
        for address in dict.fromkeys(candidates):
            try:
                reply = await self._node(address).call("CLUSTER", "SLOTS")
                owners = slot_map(reply, address[0])
            except (RedisNotSent, RedisLost, RedisReplyError, ValueError) as error:
                failures.append(f"{address[0]}:{address[1]}: {error}")
                continue
            self._owners = owners
            await self._forget_others({owner for owner in owners if owner is not None} | {address})
            return
        raise RedisUnreachable("cannot read the cluster's slot map: " + "; ".join(failures))

    async def _forget_others(self, keep: set[Address]) -> None:
        """Close the idle connections to nodes that serve no slot any more (removed, or replicas
        now); one with a command in flight is left for that command's sake."""
        seed = (self._seed.host, self._seed.port)
        for address, connection in list(self._nodes.items()):
            if address not in keep and address != seed and connection.idle:
                del self._nodes[address]
                await connection.close()
