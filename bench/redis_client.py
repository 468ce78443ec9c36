"""The quota script through two Redis clients, side by side: CPU and wall time per call.

Run: .venv/bin/python bench/redis_client.py [--calls 3000] [--rounds 5] [--concurrency 1 32]

Starts its own Redis-compatible server on a free loopback port (the test suite's), and runs the
quota store's script with one request's arguments (a request budget and a token budget, one
hash tag) through:
- redis-py's asyncio client (`register_script`, a connection pool: what the store used before);
- `RespConnection` (policy_engine/quota/resp.py, one pipelined connection: what it uses now);
and, for the store's whole cost, `RedisStore.admit`, `.charge` (a returned reservation) and
`.charge_many` (four of them in one call, as the access log's charging sends them), and the
memory store's admission; and on a Redis Cluster of three primaries (started the same way), the
script through `RespCluster` (routed by slot, policy_engine/quota/cluster.py) and
`RedisStore.admit` with `cluster=True`. Rounds take turns between the variants so that a
noisy spell of this shared machine lands on all of them. CPU is this process's (user + system,
from getrusage), so the servers' own work is not in it; with --concurrency N, N callers share
the client at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from policy_engine.quota.cluster import RespCluster  # noqa: E402
from policy_engine.quota.memory import MemoryStore  # noqa: E402
from policy_engine.quota.redis_store import _SCRIPT, _SCRIPT_SHA, RedisStore  # noqa: E402
from policy_engine.quota.resp import RespConnection  # noqa: E402
from policy_engine.quota.store import Charge, CounterStore, Demand  # noqa: E402
from tests.redis_server import start_cluster, start_redis  # noqa: E402

DEMANDS = [
    Demand("tier-quotas/pro-requests/requests/acme", "acme", 10**9, 60.0, "sliding", 1, False),
    Demand("tier-quotas/pro-tokens/total_tokens/acme", "acme", 10**12, 3600.0, "sliding", 1500, True),
]

Call = Callable[[], Awaitable[object]]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed(call: Call, calls: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per call."""

    async def caller(count: int) -> None:
        for _ in range(count):
            await call()

    share = calls // concurrency
    cpu, wall = cpu_s(), time.perf_counter()
    await asyncio.gather(*(caller(share) for _ in range(concurrency)))
    done = share * concurrency
    return (cpu_s() - cpu) / done * 1e6, (time.perf_counter() - wall) / done * 1e6


async def main(args: argparse.Namespace) -> None:
    server = start_redis()
    cluster = start_cluster(primaries=3)
    try:
        redis_py = Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        script = redis_py.register_script(_SCRIPT)
        resp = RespConnection(server.url, timeout_s=1.0)
        store = RedisStore(server.url, timeout_s=1.0, prefix="bench:")
        memory = MemoryStore()
        probe = RedisStore(server.url, timeout_s=1.0, prefix="args:")
        keys, argv = probe._admit_args(DEMANDS, time.time())
        await probe.close()
        reserved_at = (await store.admit(DEMANDS)).at
        on_cluster = RespCluster(cluster.url, timeout_s=1.0)
        cluster_store = RedisStore(cluster.url, timeout_s=1.0, prefix="bench:", cluster=True)

        variants: dict[str, Call] = {
            "the script via redis-py (pool, register_script)": lambda: script(
                keys=keys, args=["admit", *argv]
            ),
            "the script via RespConnection (pipelined)": lambda: resp.call(
                "EVALSHA", _SCRIPT_SHA, len(keys), *keys, "admit", *argv
            ),
            "RedisStore.admit": lambda: store.admit(DEMANDS),
            "RedisStore.charge (a returned reservation)": lambda: store.charge(
                DEMANDS[1].counter, "acme", 3600.0, "sliding", -1, reserved_at
            ),
            "RedisStore.charge_many, 4 returned reservations of one tenant (one call)": lambda: (
                store.charge_many(
                    [Charge(DEMANDS[1].counter, "acme", 3600.0, "sliding", -1, reserved_at)] * 4
                )
            ),
            "the script via RespCluster (3 primaries)": lambda: on_cluster.call(
                "EVALSHA", _SCRIPT_SHA, len(keys), *keys, "admit", *argv, key=keys[0]
            ),
            "RedisStore.admit on the cluster": lambda: cluster_store.admit(DEMANDS),
            "MemoryStore.admit": lambda: memory.admit(DEMANDS),
        }
        await on_cluster.call("SCRIPT", "LOAD", _SCRIPT, key=keys[0])  # EVALSHA alone never loads it
        stores: list[CounterStore] = [store, memory, cluster_store]
        for call in variants.values():  # warm up: connections, script cache
            for _ in range(200):
                await call()
        print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
        print(
            f"machine: {platform.machine()} cores={os.cpu_count()} python={platform.python_version()} "
            f"load before={os.getloadavg()[0]:.2f}"
        )
        for concurrency in args.concurrency:
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            for round_index in range(args.rounds):
                names = list(variants)
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    results[name].append(await timed(variants[name], args.calls, concurrency))
            print(
                f"\n{args.calls} calls in each of {args.rounds} rounds, {concurrency} caller(s) at once; "
                "medians of the rounds"
            )
            print("\n| variant | CPU µs/call | wall µs/call | round CPU medians µs |")
            print("|---|---:|---:|---|")
            for name, rounds in results.items():
                cpu = statistics.median(r[0] for r in rounds)
                wall = statistics.median(r[1] for r in rounds)
                per_round = " / ".join(f"{r[0]:.0f}" for r in rounds)
                print(f"| {name} | {cpu:.0f} | {wall:.0f} | {per_round} |")
        await redis_py.aclose()
        await resp.close()
        await on_cluster.close()
        for each in stores:
            await each.close()
    finally:
        server.close()
        cluster.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    asyncio.run(main(parser.parse_args()))
