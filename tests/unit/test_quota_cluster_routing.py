"""How the cluster client routes: slots of keys, the slot map CLUSTER SLOTS gives, redirections.
(Against a real cluster: tests/integration/test_quota_cluster.py.)"""

from __future__ import annotations

import random
import string

import pytest
from redis.crc import key_slot as redis_py_key_slot

from policy_engine.quota.cluster import SLOTS, key_slot, redirect_target, seed_endpoint, slot_map


def test_key_slots_follow_the_cluster_specification() -> None:
    assert key_slot("123456789") == 0x31C3  # the specification's CRC16 check value
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == redis_py_key_slot(b"foo{}{bar}") != key_slot("bar")  # {} hashes it all
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")  # the tag ends at the first "}"
    assert key_slot("pe:{acme}:tokens:42") == key_slot("acme")


def test_key_slots_agree_with_redis_py_on_random_keys() -> None:
    rng = random.Random(7)
    alphabet = string.ascii_letters + "{}:%é"
    for _ in range(2000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert key_slot(key) == redis_py_key_slot(key.encode()), key


def test_the_slot_map_is_read_from_cluster_slots() -> None:
    reply = [
        [0, 5460, [b"10.0.0.1", 6379, b"id1", {}], [b"10.0.0.4", 6379, b"id4", {}]],
        [5461, 10000, [b"", 6380, b"id2", {}]],
        [10001, 12000, [b"?", 6381, b"id3", {}]],
        [12001, 16383, [None, 6382, b"id4", {}]],
    ]
    owners = slot_map(reply, "seed")
    assert len(owners) == SLOTS
    assert owners[0] == owners[5460] == ("10.0.0.1", 6379)  # the primary, not its replica
    # A node without an address is on the host of the node asked, at its own port.
    assert owners[5461] == owners[10000] == ("seed", 6380)
    assert owners[16383] == ("seed", 6382)
    # "?": a hostname preferred but not set; nobody can reach that node.
    assert owners[10001] is None


def test_a_partial_slot_map_leaves_the_rest_unowned() -> None:
    owners = slot_map([[100, 199, ["h", 1]]], "seed")
    assert owners[99] is None and owners[100] == ("h", 1) and owners[200] is None


@pytest.mark.parametrize(
    "reply",
    [
        b"ERR",
        [[0]],
        [[0, 10, []]],
        [[0, 10, ["h", "port"]]],
        [[0, 10, [7, 1]]],
        [[10, 0, ["h", 1]]],
        [[0, SLOTS, ["h", 1]]],
    ],
)
def test_a_malformed_slot_map_is_refused(reply: object) -> None:
    with pytest.raises(ValueError, match="CLUSTER SLOTS"):
        slot_map(reply, "seed")


def test_redirections_name_a_slot_and_a_node() -> None:
    assert redirect_target("MOVED 3999 127.0.0.1:6381", "r") == (3999, ("127.0.0.1", 6381))
    assert redirect_target("ASK 1 ::1:7000", "r") == (1, ("::1", 7000))
    assert redirect_target("MOVED 2 redis-0.redis.data.svc:6379", "r") == (
        2,
        ("redis-0.redis.data.svc", 6379),
    )
    assert redirect_target("MOVED 3999 :6380", "replier") == (3999, ("replier", 6380))  # no host: its own


@pytest.mark.parametrize(
    "message",
    [
        "MOVED 3999",
        "MOVED x h:1",
        "MOVED 1 h",
        "MOVED 1 h:port",
        "MOVED 16384 h:1",
        "MOVED -1 h:1",
        "ASK 1 ?:1",
    ],
)
def test_a_malformed_redirection_is_refused(message: str) -> None:
    with pytest.raises(ValueError):
        redirect_target(message, "r")


def test_a_cluster_url_must_name_a_tcp_node_of_database_0() -> None:
    assert seed_endpoint("rediss://user:pw@node-1:7000").port == 7000
    with pytest.raises(ValueError, match="only database 0"):
        seed_endpoint("redis://node-1:7000/2")
    with pytest.raises(ValueError, match="over TCP"):
        seed_endpoint("unix:///run/redis.sock")
