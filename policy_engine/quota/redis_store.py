"""Quota counters in Redis (or Valkey), shared by every replica of the decision service.

Each counter is kept as fixed buckets, one key per bucket:

    {prefix}{{{hash_tag}}}:{counter}:{bucket_index}

The braces around the hash tag make Redis Cluster place all counters of a tag in one slot, which
a multi-key script requires (braces and "%" inside a tag are percent-escaped, see _key_tag).
A bucket expires 2 x window after its last increment: it is still read as the previous bucket
during the following window and is useless after that.

All operations go through one Lua script, run by EVALSHA (by EVAL when the server does not know
it, e.g. after a restart, which also caches it), over one pipelined connection
(policy_engine/quota/resp.py). For `admit`, the script reads every demand's two
buckets, decides, and only if no demand is exceeded increments each current bucket - atomically
for the demands sharing a hash tag. The window arithmetic (bucket indices, the previous bucket's
weight, reset estimates) is done on the client with the functions the memory store uses, so the
two stores agree on identical inputs; the script only evaluates floor(current + previous *
weight) against each limit.

Time comes from the client's clock, not from Redis TIME: one round trip per request, and the
bucket keys can be named before the script runs (Cluster routes by key). Replicas must keep their
clocks in sync (NTP); a skew of d seconds shifts that replica's bucket boundaries by d. A
reservation carries the admitting replica's clock, so its return comes out of the bucket it went
into whichever replica charges the usage.

Atomicity holds per hash tag. Demands with several tags are settled with one script call per
tag, in order of first appearance; once a tag refuses, the remaining tags are only checked, and
tags already charged get their costs back (negative charges on the same buckets), so a refused
request leaves nothing charged. Between those calls other requests may observe the interim
charge. If Redis fails part-way the refund is attempted at most once and may be lost: the charge
then expires with its bucket, and the failure names the counters that surely stayed charged
(StoreUnavailable.kept), so that a request admitted anyway reserves those; a refund that may
have run (a timeout) counts as returned. A refusal stands even if a later tag fails. (A
cancelled call refunds nothing: its charges expire with their buckets.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence

from policy_engine.quota.cluster import RespCluster
from policy_engine.quota.memory import (
    WindowPosition,
    bucket_ttl_ms,
    check_window,
    counter_state,
    previous_weight,
    refund_source,
    validate_demands,
    weighted_usage,
    window_position,
)
from policy_engine.quota.resp import RedisClient, RedisLost, RedisNotSent, RedisReplyError, RespConnection
from policy_engine.quota.sentinel import RespSentinel, is_sentinel_url
from policy_engine.quota.store import (
    Admission,
    Algorithm,
    Charge,
    CounterState,
    Demand,
    StoreUnavailable,
)

log = logging.getLogger("policy_engine.quota")

# One script for every operation, so a restarted server needs a single reload.
#
# KEYS: for each counter, its current bucket, then its previous bucket.
# ARGV[1]: the mode.
#   "admit"/"check": per counter 5 values: previous-bucket weight, limit, cost,
#     refuse_at_limit ("1"/"0"), bucket TTL in ms. "check" decides but charges nothing.
#   "charge": per counter 3 values: amount (negative refunds, 0 only reads), bucket TTL in ms,
#     and for a refund the bucket(s) it comes out of: "current", "previous" or "both" (the
#     current first), as refund_source() in policy_engine/quota/memory.py decides.
# Reply: {decision (1 = within every budget), current_1, previous_1, current_2, previous_2, ...},
#   the buckets before the charge for admit/check, after it for charge.
_SCRIPT = """
local mode = ARGV[1]
local n = #KEYS / 2
local reply = {1}

local function bucket(key)
  return tonumber(redis.call('GET', key) or '0')
end

if mode == 'charge' then
  for i = 1, n do
    local current_key, previous_key = KEYS[2 * i - 1], KEYS[2 * i]
    local arg = 2 + 3 * (i - 1)
    local amount = tonumber(ARGV[arg])
    local source = ARGV[arg + 2]
    if amount > 0 then
      redis.call('INCRBY', current_key, amount)
      redis.call('PEXPIRE', current_key, ARGV[arg + 1])
    elseif amount < 0 then
      -- Never below zero; "both" takes from the current bucket first.
      local refund = -amount
      if source == 'current' or source == 'both' then
        local taken = math.min(bucket(current_key), refund)
        if taken > 0 then
          redis.call('DECRBY', current_key, taken)
          refund = refund - taken
        end
      end
      if source == 'previous' or source == 'both' then
        local rest = math.min(bucket(previous_key), refund)
        if rest > 0 then
          redis.call('DECRBY', previous_key, rest)
        end
      end
    end
    reply[2 * i] = bucket(current_key)
    reply[2 * i + 1] = bucket(previous_key)
  end
  return reply
end

for i = 1, n do
  local arg = 1 + 5 * (i - 1)
  local current = bucket(KEYS[2 * i - 1])
  local previous = bucket(KEYS[2 * i])
  -- Must match weighted_usage() and is_exceeded() in policy_engine/quota/memory.py.
  local used = math.floor(current + previous * tonumber(ARGV[arg + 1]))
  local limit = tonumber(ARGV[arg + 2])
  local cost = tonumber(ARGV[arg + 3])
  if ARGV[arg + 4] == '1' then
    if used >= limit then reply[1] = 0 end
  elseif used + cost > limit then
    reply[1] = 0
  end
  reply[2 * i] = current
  reply[2 * i + 1] = previous
end

if mode == 'admit' and reply[1] == 1 then
  for i = 1, n do
    local arg = 1 + 5 * (i - 1)
    local cost = tonumber(ARGV[arg + 3])
    if cost > 0 then
      redis.call('INCRBY', KEYS[2 * i - 1], cost)
      redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[arg + 5])
    end
  end
end
return reply
"""


_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()


class RedisStore:
    """CounterStore on a Redis/Valkey server, over one pipelined connection; on the primary
    that Sentinel names (a redis+sentinel:// URL); or on a Redis Cluster (`cluster`), over one
    connection per node, each script call going to its hash tag's slot.

    `timeout_s` bounds connecting and each reply. Commands are not retried: a script whose
    reply timed out may have charged, and running it again would charge twice. Every failure
    (connection, timeout, server error) raises StoreUnavailable; the connection is made again
    on the next call, so the store recovers by itself once the server is back.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pe:",
        timeout_s: float = 0.05,
        cluster: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            # Cluster hashes the first {...} of a key; braces in the prefix would hide the tag.
            raise ValueError(f"prefix must not contain braces: {prefix!r}")
        self._prefix = prefix
        self._clock = clock
        self._cluster = cluster
        self._redis = redis_client(url, cluster=cluster, timeout_s=timeout_s)

    async def admit(self, demands: Sequence[Demand]) -> Admission:
        validate_demands(demands)
        # One clock reading for the whole request: every tag, and any refund, uses the same
        # buckets, so a refund lands exactly where the charge went.
        now = self._clock()
        by_tag: dict[str, list[int]] = {}
        for position, demand in enumerate(demands):
            by_tag.setdefault(demand.hash_tag, []).append(position)

        states: list[CounterState | None] = [None] * len(demands)
        charged: list[list[Demand]] = []
        refused = False
        failure: StoreUnavailable | None = None
        try:
            for positions in by_tag.values():
                group = [demands[p] for p in positions]
                decision, buckets = await self._run(
                    "check" if refused else "admit", *self._admit_args(group, now)
                )
                for p, demand, (current, previous) in zip(positions, group, buckets, strict=True):
                    states[p] = counter_state(demand, now, current, previous)
                if not refused:
                    if decision:
                        charged.append(group)
                    else:
                        refused = True
        except StoreUnavailable as error:
            failure = error
        if failure is not None and not refused:
            # Best effort only: the server that just failed is unlikely to take the refund. What
            # it surely did not take stays charged, and the caller must know (StoreUnavailable.kept).
            with contextlib.suppress(StoreUnavailable):
                await self._refund(charged, now)
            if not charged:
                raise failure
            kept = frozenset(d.counter for group in charged for d in group if d.cost > 0)
            raise StoreUnavailable(str(failure), kept=kept, at=now) from failure
        if refused:
            # The refusal stands, even if a later tag's check failed: the counters that answered
            # said no, and a store outage would let `on_error: allow` admit the request.
            try:
                await self._refund(charged, now)
            except StoreUnavailable as error:
                # The tags charged before the refusal keep a cost nobody uses until their
                # buckets expire.
                log.warning("refund of a refused request lost: %s", error)
        return Admission(not refused, tuple(state for state in states if state is not None), now)

    async def charge(
        self,
        counter: str,
        hash_tag: str,
        window: float,
        algorithm: Algorithm,
        amount: int,
        reserved_at: float | None = None,
    ) -> int:
        charge = Charge(counter, hash_tag, window, algorithm, amount, reserved_at)
        keys, args, position = self._charge_args(charge, self._clock())
        current = self._keys(hash_tag, counter, position.index)
        if keys != current:
            # Returned to a bucket this clock has not reached: the same script call reads this
            # replica's buckets too (a zero charge), for the usage it returns.
            keys += current
            args += ["0", str(bucket_ttl_ms(window)), "none"]
        _, buckets = await self._run("charge", keys, args)
        current_bucket, previous_bucket = buckets[-1]
        return weighted_usage(current_bucket, previous_bucket, previous_weight(algorithm, position, window))

    async def charge_many(self, charges: Sequence[Charge]) -> list[StoreUnavailable | None]:
        now = self._clock()
        by_tag: dict[str, list[int]] = {}
        for position, charge in enumerate(charges):
            by_tag.setdefault(charge.hash_tag, []).append(position)
        # Every call's arguments first: one that cannot be built (a bad window) must fail the
        # batch before any of it is applied.
        calls: list[tuple[list[int], list[str], list[str]]] = []
        for positions in by_tag.values():
            # One script call per tag: the script applies its counters in order, atomically.
            keys: list[str] = []
            args: list[str] = []
            for p in positions:
                more_keys, more_args, _ = self._charge_args(charges[p], now)
                keys += more_keys
                args += more_args
            calls.append((positions, keys, args))
        failures: list[StoreUnavailable | None] = [None] * len(charges)
        for positions, keys, args in calls:
            try:
                await self._run("charge", keys, args)
            except StoreUnavailable as error:
                for p in positions:
                    failures[p] = error
        return failures

    def _charge_args(self, charge: Charge, now: float) -> tuple[list[str], list[str], WindowPosition]:
        """The bucket pair one charge goes to at `now`, its three script arguments, and where
        `now` falls in the charge's window."""
        check_window(charge.counter, charge.window)
        position = window_position(now, charge.window)
        amount, current_index = charge.amount, position.index
        index = current_index
        ttl = str(bucket_ttl_ms(charge.window))
        if amount >= 0:
            source: str = "none"
        else:
            reserved_index = None
            if charge.reserved_at is not None:
                reserved_index = window_position(charge.reserved_at, charge.window).index
            if reserved_index is not None and reserved_index > current_index:
                # Reserved by a replica whose clock runs ahead, in a bucket this one has not
                # reached: the refund goes back to that bucket's key (taking it from the current
                # one would erase other requests' usage).
                index, source = reserved_index, "current"
            else:
                source = refund_source(current_index, charge.window, charge.reserved_at)
                if source == "none":
                    amount = 0  # the reservation's bucket no longer counts: nothing to return
        return self._keys(charge.hash_tag, charge.counter, index), [str(amount), ttl, source], position

    async def usage(self, counter: str, hash_tag: str, window: float, algorithm: Algorithm) -> int:
        # A zero charge only reads: the same script keeps one code path and one round trip.
        return await self.charge(counter, hash_tag, window, algorithm, 0)

    async def close(self) -> None:
        await self._redis.close()

    async def _refund(self, groups: list[list[Demand]], now: float) -> None:
        """Return the costs of the charged groups. Each group returned leaves the list, and so
        does one whose refund may have run (a timeout, a connection lost after sending): on a
        failure the list holds what surely stays charged. Erring that way can only leave a cost
        counted twice, never erase other requests' usage."""
        while groups:
            keys: list[str] = []
            args: list[str] = []
            for d in groups[0]:
                if d.cost > 0:
                    # Reserved at the same clock reading as the charge: exactly its bucket.
                    refund = Charge(d.counter, d.hash_tag, d.window, d.algorithm, -d.cost, reserved_at=now)
                    more_keys, more_args, _ = self._charge_args(refund, now)
                    keys += more_keys
                    args += more_args
            try:
                if keys:
                    await self._run("charge", keys, args)
            except StoreUnavailable as error:
                if not _never_sent(error.__cause__):
                    groups.pop(0)
                raise
            groups.pop(0)

    def _admit_args(self, group: Sequence[Demand], now: float) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = []
        for demand in group:
            position = window_position(now, demand.window)
            keys += self._keys(demand.hash_tag, demand.counter, position.index)
            args += [
                # repr is the shortest string that reads back as the same double, so the script
                # computes the same usage as the client does.
                repr(previous_weight(demand.algorithm, position, demand.window)),
                str(demand.limit),
                str(demand.cost),
                "1" if demand.refuse_at_limit else "0",
                str(bucket_ttl_ms(demand.window)),
            ]
        return keys, args

    def _keys(self, hash_tag: str, counter: str, index: int) -> list[str]:
        base = f"{self._prefix}{{{_key_tag(hash_tag)}}}:{counter}:"
        return [f"{base}{index}", f"{base}{index - 1}"]

    async def _run(self, mode: str, keys: list[str], args: list[str]) -> tuple[bool, list[tuple[int, int]]]:
        try:
            try:
                reply = await self._redis.call(
                    "EVALSHA", _SCRIPT_SHA, len(keys), *keys, mode, *args, key=keys[0]
                )
            except RedisReplyError as error:
                if not str(error).startswith("NOSCRIPT"):
                    raise
                # The server lost its script cache (a restart, SCRIPT FLUSH): nothing ran.
                reply = await self._redis.call("EVAL", _SCRIPT, len(keys), *keys, mode, *args, key=keys[0])
        except (RedisNotSent, RedisLost, RedisReplyError) as exc:
            hint = ""
            if not self._cluster and str(exc).startswith(("MOVED ", "ASK ")):
                hint = " (the server is a node of a Redis Cluster: use --redis-cluster)"
            raise StoreUnavailable(f"redis quota store: {type(exc).__name__}: {exc}{hint}") from exc
        if not isinstance(reply, list) or len(reply) != 1 + len(keys):
            raise StoreUnavailable(f"redis quota store: unexpected script reply {reply!r}")
        try:
            values = [int(v) for v in reply]
        except (TypeError, ValueError) as exc:
            raise StoreUnavailable(f"redis quota store: unexpected script reply {reply!r}") from exc
        buckets = [(values[i], values[i + 1]) for i in range(1, len(values), 2)]
        return values[0] == 1, buckets


def redis_client(url: str, *, cluster: bool, timeout_s: float) -> RedisClient:
    """The client a URL calls for: a cluster's (`cluster`), Sentinel's (redis+sentinel://) or
    one server's. It connects on its first call; a ValueError (an OSError for a TLS file that
    cannot be read) for what it cannot honour, so that settings are checked by making one."""
    if is_sentinel_url(url):
        if cluster:
            raise ValueError("--redis-cluster takes a node's redis:// URL, not a redis+sentinel:// one")
        return RespSentinel(url, timeout_s=timeout_s)
    if cluster:
        return RespCluster(url, timeout_s=timeout_s)
    return RespConnection(url, timeout_s=timeout_s)


def _never_sent(error: BaseException | None) -> bool:
    """Whether a failed command surely never reached the server."""
    return isinstance(error, RedisNotSent)


def _key_tag(hash_tag: str) -> str:
    """The hash tag as written between the braces of a key.

    Tags are request data (a tenant, an API key), so they are escaped rather than rejected: a "}"
    would end the tag early and an empty tag ("{}") makes Cluster hash the whole key, either of
    which could scatter a request's counters over several slots and fail the script. "%" is
    escaped too, and the empty tag becomes a lone "%", which no escaped tag can equal.
    """
    if not hash_tag:
        return "%"
    return hash_tag.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
