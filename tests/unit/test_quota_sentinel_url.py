"""redis+sentinel:// URLs: the sentinels, the group, the primary's settings.
(Against real sentinels: tests/integration/test_quota_sentinel.py.)"""

from __future__ import annotations

import ssl

import pytest

from policy_engine.quota.sentinel import is_sentinel_url, sentinel_target


def test_a_sentinel_url_names_sentinels_a_group_and_the_primarys_settings() -> None:
    target = sentinel_target("redis+sentinel://app:s3cret@s1:26380,s2,[::1]:26381/quotas/2")
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))  # 26379 by default
    assert target.group == "quotas"
    primary = target.primary
    assert (primary.db, primary.username, primary.password, primary.tls) == (2, "app", "s3cret", None)
    # Sentinels usually have no password of their own.
    assert target.sentinel(("s1", 26380)).password is None
    assert "s3cret" not in repr(target)


def test_sentinels_may_have_credentials_of_their_own_and_tls() -> None:
    target = sentinel_target(
        "rediss+sentinel://:node-pw@s1/quotas?sentinel_password=sentinel-pw&ssl_cert_reqs=none"
    )
    assert target.primary.db == 0 and target.primary.password == "node-pw"
    assert isinstance(target.primary.tls, ssl.SSLContext)
    sentinel = target.sentinel(("s1", 26379))
    assert sentinel.password == "sentinel-pw" and sentinel.tls is target.primary.tls


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///quotas", "at least one sentinel"),
        ("redis+sentinel://s1", "/GROUP"),
        ("redis+sentinel://s1/a/b/c", "/GROUP"),
        ("redis+sentinel://s1/quotas/x", "is a number"),
        ("redis+sentinel://s1:port/quotas", "host[:port]"),
        ("redis+sentinel://s1/quotas?bogus=1", "not supported by the quota store: bogus"),
        ("redis+sentinel://s1/quotas/1?db=3", "in the path"),
        ("redis+sentinel://s1/quotas/\uff11", "is a number"),
        ("redis+sentinel://s1:263790/quotas", "1-65535"),
        ("redis+sentinel://s1:0/quotas", "1-65535"),
        ("redis+sentinel://::1/quotas", "[IPv6]:port"),
    ],
)
def test_a_sentinel_url_this_client_cannot_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sentinel_target(url)


def test_sentinel_urls_are_told_apart_by_their_scheme() -> None:
    assert is_sentinel_url("redis+sentinel://s/g") and is_sentinel_url("REDISS+SENTINEL://s/g")
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("unix:///r.sock")
