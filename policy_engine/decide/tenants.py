"""Who is calling: API keys (stored as salted SHA-256, compared in constant time) and principals."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policy_engine.policy.schema import ApiKey, TenantEntry, TenantSet

_PREFIX_LENGTH = 8
# Verified keys remembered per registry (that is, per bundle): a salted SHA-256 per request
# was ~5 µs of a ~100 µs decision. Only keys that verified are kept, so unknown keys cannot
# flush the entries of real ones; and only as a keyed BLAKE2b digest under a per-registry random
# key (~0.5 µs), so the process's memory holds no plaintext key longer than a request does.
_VERIFIED_KEYS = 4096


@dataclass(frozen=True)
class Tenant:
    id: str = ""
    tier: str = ""
    authenticated: bool = False
    key_id: str = ""
    credential: str = "none"  # none | api_key | invalid_key | principal
    models: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


ANONYMOUS = Tenant()


def hash_key(key: str, key_id: str = "key", salt: str | None = None) -> ApiKey:
    """The stored form of an API key: its prefix (lookup index) and a salted digest. Raises
    ValueError (pydantic's ValidationError for a `key_id` that is not a name)."""
    if len(key) < _PREFIX_LENGTH + 8:
        raise ValueError(f"API keys must be at least {_PREFIX_LENGTH + 8} characters")
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    return ApiKey(id=key_id, hash=f"sha256${salt}${digest}", prefix=key[:_PREFIX_LENGTH])


def _verify(key: str, stored: str) -> bool:
    _, salt, digest = stored.split("$")
    actual = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    return hmac.compare_digest(actual, digest)


def resolved_tenant(entry: TenantEntry, credential: str, key_id: str = "") -> Tenant:
    """The tenant a request proved to be `entry` through `credential`."""
    return Tenant(
        id=entry.id,
        tier=entry.tier,
        authenticated=True,
        key_id=key_id,
        credential=credential,
        models=tuple(entry.models),
        labels=dict(entry.labels),
    )


class TenantRegistry:
    """Resolves a tenant from request headers or the mTLS principal."""

    def __init__(self, sets: Iterable[TenantSet]) -> None:
        # By the stored prefix as written (4 to 16 characters; hash-key writes 8): a presented
        # key is looked up by its first characters at each length some stored prefix has.
        self._by_prefix: dict[str, list[tuple[ApiKey, TenantEntry]]] = {}
        self._by_principal: dict[str, TenantEntry] = {}
        self._by_id: dict[str, TenantEntry] = {}
        headers: list[str] = []
        for tenant_set in sets:
            for name in tenant_set.spec.key_headers:
                if name not in headers:
                    headers.append(name)
            for entry in tenant_set.spec.tenants:
                self._by_id.setdefault(entry.id, entry)
                for key in entry.api_keys:
                    self._by_prefix.setdefault(key.prefix, []).append((key, entry))
                for principal in entry.principals:
                    self._by_principal[principal] = entry
        self._key_headers = tuple(headers) or ("authorization", "x-api-key")
        self._prefix_lengths = tuple(sorted({len(prefix) for prefix in self._by_prefix}))
        self._verified: dict[bytes, Tenant] = {}
        self._digest_key = secrets.token_bytes(32)

    @property
    def key_headers(self) -> tuple[str, ...]:
        """Headers that may carry an API key (secrets: never logged)."""
        return self._key_headers

    def known(self, tenant_id: str, credential: str, key_id: str = "") -> Tenant | None:
        """The tenant with this id as it would resolve through `credential` (for replays)."""
        entry = self._by_id.get(tenant_id)
        return None if entry is None else resolved_tenant(entry, credential, key_id)

    def presented_key(self, headers: Mapping[str, str]) -> str:
        for name in self._key_headers:
            value = headers.get(name, "")
            if name == "authorization":
                scheme, _, token = value.partition(" ")
                value = token.strip() if scheme.lower() == "bearer" else ""
            if value:
                return value
        return ""

    def remembered(self, key: str) -> bytes:
        """The form a verified key is remembered in."""
        return hashlib.blake2b(
            key.encode("utf-8", "surrogatepass"), key=self._digest_key, digest_size=32
        ).digest()

    def resolve(self, headers: Mapping[str, str], principal: str) -> Tenant:
        key = self.presented_key(headers)
        if key:
            remembered = self.remembered(key)
            known_key = self._verified.get(remembered)
            if known_key is not None:
                return known_key
            candidates = (c for n in self._prefix_lengths for c in self._by_prefix.get(key[:n], ()))
            for stored, entry in candidates:
                if _verify(key, stored.hash):
                    tenant = resolved_tenant(entry, "api_key", stored.id)
                    if len(self._verified) >= _VERIFIED_KEYS:
                        del self._verified[next(iter(self._verified))]  # the oldest
                    self._verified[remembered] = tenant
                    return tenant
            # A wrong key is not silently downgraded to the principal's identity.
            return Tenant(credential="invalid_key")
        known = self._by_principal.get(principal) if principal else None
        if known is not None:
            return resolved_tenant(known, "principal")
        return ANONYMOUS


class FixedTenant(TenantRegistry):
    """Resolves every request to one tenant, whatever its credentials say: a replayed
    decision's (the key is not in the decision log) or a policy test's stub (policies deployed
    with tenants of their own, the chart's, have no TenantSet to resolve against). Keeps the key
    headers of the registry it stands in for, which stay secrets to redact."""

    def __init__(self, tenant: Tenant, key_headers: tuple[str, ...]) -> None:
        super().__init__(())
        self._tenant = tenant
        self._key_headers = key_headers

    def resolve(self, headers: Mapping[str, str], principal: str) -> Tenant:
        return self._tenant
