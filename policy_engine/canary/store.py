"""Where rollout states and pending commands live: a local JSON file, or Redis.

The controller is the only writer of states; the CLI only adds commands (promote, abort,
restart), which the controller takes and applies on its next tick. Every serving worker reads
the states to apply the same weights.

* `FileStore`: one JSON document `{"rollouts": {policy: state}, "commands": {policy: command}}`.
  A write goes to a temporary file in the same directory and is renamed over the document, so a
  reader never sees half of it; writers serialise on an advisory lock file next to it.
* `RedisStore`: one hash per policy, `{prefix}{policy}`, fields `state` and `command`; a command
  is taken with HGET + HDEL in one MULTI/EXEC.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from policy_engine.canary.state import COMMANDS, Command, RolloutState
from policy_engine.quota.sentinel import is_sentinel_url, sentinel_target


class StoreError(Exception):
    """The store cannot be read or written; the message says which and why."""


class RolloutStore(Protocol):
    async def load(self, policy: str) -> RolloutState | None: ...

    async def load_many(self, policies: Sequence[str]) -> dict[str, RolloutState]: ...

    async def load_all(self) -> dict[str, RolloutState]: ...

    async def save(self, state: RolloutState) -> None: ...

    async def request(self, policy: str, command: Command) -> None: ...

    async def take_command(self, policy: str) -> Command | None: ...

    async def lease(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the right to drive the rollouts: one controller per shared store."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


def _command(value: object) -> Command | None:
    for command in COMMANDS:
        if value == command:
            return command
    return None


class FileStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def describe(self) -> str:
        return f"file {self.path}"

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"rollouts": {}, "commands": {}}
        except OSError as error:
            raise StoreError(f"cannot read canary state {self.path}: {error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise StoreError(f"canary state {self.path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise StoreError(f"canary state {self.path} is not a JSON object")
        data.setdefault("rollouts", {})
        data.setdefault("commands", {})
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under the lock; the document is replaced atomically on exit."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = self._lock_path.open("a")
        except OSError as error:
            raise StoreError(f"cannot write canary state next to {self.path}: {error}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            try:
                handle, temporary = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent)
                with os.fdopen(handle, "w", encoding="utf-8") as sink:
                    json.dump(data, sink, sort_keys=True)
                    sink.flush()
                    os.fsync(sink.fileno())
                os.replace(temporary, self.path)
            except OSError as error:
                with contextlib.suppress(OSError, UnboundLocalError):
                    os.unlink(temporary)
                raise StoreError(f"cannot write canary state {self.path}: {error}") from None

    def _states(self, data: dict[str, Any], names: Sequence[str] | None) -> dict[str, RolloutState]:
        rollouts = data["rollouts"]
        states: dict[str, RolloutState] = {}
        for name in rollouts if names is None else names:
            if name in rollouts:
                try:
                    states[name] = RolloutState.from_json(json.dumps(rollouts[name]))
                except ValueError as error:
                    raise StoreError(f"{self.path}: rollout {name}: {error}") from None
        return states

    # The file work (a lock another process may hold, fsync) runs in a thread: the controller
    # shares its event loop with the gRPC handlers of worker 0.

    async def load(self, policy: str) -> RolloutState | None:
        return (await asyncio.to_thread(self._states_now, [policy])).get(policy)

    async def load_many(self, policies: Sequence[str]) -> dict[str, RolloutState]:
        return await asyncio.to_thread(self._states_now, policies)

    async def load_all(self) -> dict[str, RolloutState]:
        return await asyncio.to_thread(self._states_now, None)

    def _states_now(self, names: Sequence[str] | None) -> dict[str, RolloutState]:
        return self._states(self._read(), names)

    async def save(self, state: RolloutState) -> None:
        def write() -> None:
            with self._locked() as data:
                data["rollouts"][state.policy] = json.loads(state.to_json())

        await asyncio.to_thread(write)

    async def request(self, policy: str, command: Command) -> None:
        def write() -> None:
            with self._locked() as data:
                data["commands"][policy] = command

        await asyncio.to_thread(write)

    async def take_command(self, policy: str) -> Command | None:
        def take() -> Command | None:
            if policy not in self._read()["commands"]:
                return None  # the common case: no lock, no write
            with self._locked() as data:
                return _command(data["commands"].pop(policy, None))

        return await asyncio.to_thread(take)

    async def lease(self, owner: str, ttl_s: float) -> bool:
        return True  # a local file is one pod's; only its worker 0 runs a controller

    async def close(self) -> None:
        return None


class RedisStore:
    def __init__(
        self, url: str, prefix: str = "pe:canary:", timeout_s: float = 2.0, *, cluster: bool = False
    ) -> None:
        from redis.asyncio import Redis, RedisCluster
        from redis.exceptions import RedisClusterException

        self.url = url
        self.prefix = prefix
        # Each rollout is one key, so a cluster needs nothing else of the store: redis-py routes
        # the key's commands, and scans every primary for load_all.
        self._redis: Redis | RedisCluster
        self._sentinel: Any = None  # redis-py's Sentinel client, whose connections close apart
        try:
            if is_sentinel_url(url):
                self._sentinel, self._redis = _sentinel_primary(url, timeout_s)
            elif cluster:
                self._redis = RedisCluster.from_url(
                    url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
                )
            else:
                self._redis = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # None of these show the URL (it may hold a password). OSError: a TLS file unreadable.
        except (ValueError, OSError, RedisClusterException) as error:
            raise StoreError(f"canary state in Redis: {error}") from None

    def describe(self) -> str:
        return f"redis {_redacted(self.url)} (keys {self.prefix}*)"

    @property
    def _leader_key(self) -> str:
        return self.prefix.rstrip(":") + "-leader"  # outside `prefix*`: not a rollout

    def _key(self, policy: str) -> str:
        return f"{self.prefix}{policy}"

    def _parse(self, policy: str, raw: bytes | None) -> RolloutState | None:
        if raw is None:
            return None
        try:
            return RolloutState.from_json(raw)
        except ValueError as error:
            raise StoreError(f"{self._key(policy)}: {error}") from None

    async def _call(self, operation: str, coroutine: Any) -> Any:
        from redis.exceptions import RedisClusterException, RedisError

        try:
            return await coroutine
        # RedisClusterException: a cluster that cannot be reached or does not cover every slot.
        except (RedisError, RedisClusterException, OSError) as error:
            raise StoreError(f"canary state in {_redacted(self.url)}: {operation} failed: {error}") from None

    async def load(self, policy: str) -> RolloutState | None:
        raw = await self._call("HGET", self._redis.hget(self._key(policy), "state"))
        return self._parse(policy, raw)

    async def load_many(self, policies: Sequence[str]) -> dict[str, RolloutState]:
        if not policies:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for policy in policies:
            pipe.hget(self._key(policy), "state")
        raws = await self._call("HGET", pipe.execute())
        states = {p: self._parse(p, raw) for p, raw in zip(policies, raws, strict=True)}
        return {p: s for p, s in states.items() if s is not None}

    async def load_all(self) -> dict[str, RolloutState]:
        async def scan() -> list[str]:
            return [
                key.decode()[len(self.prefix) :]
                async for key in self._redis.scan_iter(match=f"{self.prefix}*")
            ]

        names: list[str] = await self._call("SCAN", scan())
        return await self.load_many(sorted(names))

    async def save(self, state: RolloutState) -> None:
        await self._call("HSET", self._redis.hset(self._key(state.policy), "state", state.to_json()))

    async def request(self, policy: str, command: Command) -> None:
        await self._call("HSET", self._redis.hset(self._key(policy), "command", command))

    async def take_command(self, policy: str) -> Command | None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._key(policy), "command")
        pipe.hdel(self._key(policy), "command")
        raw, _ = await self._call("MULTI", pipe.execute())
        return _command(raw.decode() if isinstance(raw, bytes) else raw)

    async def lease(self, owner: str, ttl_s: float) -> bool:
        # Replicas sharing this Redis elect one controller; the others only follow the weights.
        taken = await self._call(
            "EVAL", self._redis.eval(_LEASE, 1, self._leader_key, owner, max(1, int(ttl_s * 1000)))
        )
        return bool(taken)

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        finally:
            if self._sentinel is not None:
                await self._sentinel.aclose()


def _sentinel_primary(url: str, timeout_s: float) -> tuple[Any, Any]:
    """redis-py's Sentinel client for a redis+sentinel:// URL (read as the quota store reads
    it: policy_engine/quota/sentinel.py), and its client of the primary the sentinels name."""
    from redis.asyncio.connection import SSLConnection, parse_url
    from redis.asyncio.sentinel import Sentinel

    target = sentinel_target(url)
    options: dict[str, Any] = dict(parse_url(target.primary_url))
    options.pop("host", None)
    options.pop("port", None)
    tls = options.pop("connection_class", None) is SSLConnection
    tls_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    sentinel_options: dict[str, Any] = {**timeouts, **({"ssl": True, **tls_options} if tls else {})}
    if target.sentinel_username:
        sentinel_options["username"] = target.sentinel_username
    if target.sentinel_password:
        sentinel_options["password"] = target.sentinel_password
    connection: dict[str, Any] = {**timeouts, **options, **({"ssl": True} if tls else {})}
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options, **connection)
    return sentinel, sentinel.master_for(target.group)


def _redacted(url: str) -> str:
    """The URL without its password (in the user part or the query), for messages."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = urllib.parse.urlencode(
        [
            (name, "***" if name.lower().endswith("password") else value)
            for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*/",
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def open_store(redis_url: str | None, path: Path, *, cluster: bool = False) -> RolloutStore:
    """Redis when a URL is given (shared by every replica; the primary Sentinel names with a
    redis+sentinel:// URL; a Redis Cluster with `cluster`), else the local file."""
    if redis_url:
        return RedisStore(redis_url, cluster=cluster)
    if cluster:
        raise StoreError("--redis-cluster needs --redis-url (any node of the cluster)")
    return FileStore(path)
