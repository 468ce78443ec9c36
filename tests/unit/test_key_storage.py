"""API keys exist only as salted hashes, and a presented key is compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from policy_engine.decide import tenants
from policy_engine.decide.tenants import TenantRegistry, hash_key
from policy_engine.policy.compiler import BundleError, load_bundle
from policy_engine.policy.schema import ApiKey, TenantEntry, TenantSet, TenantSpec
from policy_engine.policy.source import parse_documents

KEY = "sk-test-tenant-key-0001"


def registry(stored: ApiKey) -> TenantRegistry:
    entry = TenantEntry(id="t1", api_keys=[ApiKey(id="k1", hash=stored.hash, prefix=stored.prefix)])
    tenant_set = TenantSet(
        apiVersion="policy-engine/v1",
        kind="TenantSet",
        metadata={"name": "t"},  # type: ignore[arg-type]
        spec=TenantSpec(tenants=[entry]),
    )
    return TenantRegistry([tenant_set])


def test_the_same_key_hashes_differently_each_time_and_both_verify() -> None:
    first, second = hash_key(KEY), hash_key(KEY)
    assert first.hash != second.hash  # a fresh salt each time
    assert KEY not in first.hash and KEY not in second.hash
    assert first.prefix == second.prefix == KEY[:8]
    for stored in (first, second):
        tenant = registry(stored).resolve({"authorization": f"Bearer {KEY}"}, "")
        assert (tenant.id, tenant.credential) == ("t1", "api_key")


def test_a_key_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    compare = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", spy)
    found = registry(hash_key(KEY))
    wrong = KEY[:-1] + "9"  # same prefix: reaches the digest comparison
    assert found.resolve({"x-api-key": wrong}, "").credential == "invalid_key"
    assert found.resolve({"x-api-key": KEY}, "").credential == "api_key"
    assert len(calls) == 2 and all(len(a) == len(b) == 64 for a, b in calls)


def test_a_verified_key_is_remembered_and_a_wrong_one_never_is(monkeypatch: pytest.MonkeyPatch) -> None:
    digests: list[str] = []
    verify = tenants._verify

    def counting(key: str, stored: str) -> bool:
        digests.append(key)
        return verify(key, stored)

    monkeypatch.setattr(tenants, "_verify", counting)
    found = registry(hash_key(KEY))
    wrong = KEY[:-1] + "9"
    for _ in range(3):
        assert found.resolve({"x-api-key": KEY}, "").credential == "api_key"
        assert found.resolve({"x-api-key": wrong}, "").credential == "invalid_key"
    # The right key is hashed once; the wrong one every time (it is never remembered).
    assert digests.count(KEY) == 1 and digests.count(wrong) == 3
    # A new registry (a reloaded bundle, where the key may have been revoked) starts empty.
    assert registry(hash_key(KEY + "x")).resolve({"x-api-key": KEY}, "").credential == "invalid_key"


def test_remembered_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenants, "_VERIFIED_KEYS", 2)
    keys = [f"sk-test-tenant-key-{i:04d}" for i in range(4)]
    entries = [
        TenantEntry(id=f"t{i}", api_keys=[ApiKey(id="k", hash=hash_key(k).hash, prefix=k[:8])])
        for i, k in enumerate(keys)
    ]
    spec = TenantSpec(tenants=entries)
    found = TenantRegistry(
        [TenantSet(apiVersion="policy-engine/v1", kind="TenantSet", metadata={"name": "t"}, spec=spec)]  # type: ignore[arg-type]
    )
    for i, key in enumerate(keys):
        assert found.resolve({"x-api-key": key}, "").id == f"t{i}"
    assert list(found._verified) == [found.remembered(k) for k in keys[2:]]  # the oldest made room
    assert all(len(digest) == 32 for digest in found._verified)  # digests, not the keys


def test_a_plaintext_key_in_a_policy_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "tenants.yaml").write_text(
        "apiVersion: policy-engine/v1\nkind: TenantSet\nmetadata: {name: t}\nspec:\n  tenants:\n"
        f"    - id: t1\n      api_keys:\n        - {{id: k1, prefix: sk-test-, key: {KEY}}}\n"
    )
    with pytest.raises(BundleError) as raised:
        load_bundle(tmp_path)
    assert "tenants.yaml:8:" in str(raised.value)


@pytest.mark.parametrize("length", [4, 7, 12, 16])
def test_a_prefix_of_any_allowed_length_finds_its_key(length: int) -> None:
    """The schema takes prefixes of 4 to 16 characters (hash-key writes 8): each one works."""
    stored = hash_key(KEY)
    found = registry(stored.model_copy(update={"prefix": KEY[:length]}))
    assert found.resolve({"x-api-key": KEY}, "").credential == "api_key"
    assert found.resolve({"x-api-key": KEY[:-1] + "9"}, "").credential == "invalid_key"


def test_hash_key_writes_an_entry_the_loader_reads_back_as_it_was(tmp_path: Path) -> None:
    import subprocess
    import sys

    def hash_key_cli(key: str, key_id: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "policy_engine", "hash-key", "--id", key_id]
        return subprocess.run(command, input=key + "\n", capture_output=True, text=True, check=False)

    key = "sk: 'a # quoted key-0001"  # YAML's own characters in the prefix
    for numeric in ("12345e67-key-0001", "1234.567-key-0001", "00000000-key-0001", "yes-key-no-000001"):
        (read,) = next(iter(parse_documents("hash-key", hash_key_cli(numeric, "k").stdout))).data
        assert read["prefix"] == numeric[:8], read  # a prefix YAML could read as a number stays text
    result = hash_key_cli(key, "prod-1")
    assert result.returncode == 0, result.stderr
    (document,) = parse_documents("hash-key", result.stdout)  # as the policy loader reads it
    (entry,) = document.data
    assert (entry["id"], entry["prefix"]) == ("prod-1", key[:8])
    tenant = registry(ApiKey.model_validate(entry)).resolve({"x-api-key": key}, "")
    assert tenant.credential == "api_key"
    refused = hash_key_cli(KEY, "Prod Key")
    assert refused.returncode == 2 and "--id must be a name" in refused.stderr and not refused.stdout
