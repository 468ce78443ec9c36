"""What the rollout store's messages show of a Redis URL: never its password."""

from __future__ import annotations

import pytest

from policy_engine.canary.store import RedisStore, StoreError, _redacted, open_store


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@redis:6379/0", "redis://user:***@redis:6379/0"),
        ("redis://:s3cret@redis", "redis://:***@redis"),
        ("redis://redis/0?password=s3cret&socket_timeout=1", "redis://redis/0?password=***&socket_timeout=1"),
        ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        (
            "redis+sentinel://:s3cret@s1:26379/g/0?sentinel_password=s3cret",
            "redis+sentinel://:***@s1:26379/g/0?sentinel_password=***",
        ),
    ],
)
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert _redacted(url) == shown
    assert "s3cret" not in RedisStore(url).describe()


def test_a_cluster_url_the_client_refuses_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as refused:
        open_store("redis://user:s3cret@redis:6379/2", None, cluster=True)  # type: ignore[arg-type]
    assert "s3cret" not in str(refused.value)
    with pytest.raises(StoreError, match="needs --redis-url"):
        open_store(None, None, cluster=True)  # type: ignore[arg-type]
