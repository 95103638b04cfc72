"""The sandbox registry in-process: tokens, revocation, faults, client secrets, Key Vault versions."""

from __future__ import annotations

import time

import pytest

from devstack.sandboxes import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT_ID,
    KEYVAULT_AUDIENCE,
    Fault,
    Registry,
)


@pytest.fixture
def registry() -> Registry:
    return Registry()


def test_token_round_trip_and_every_refusal(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    token, exp = registry.issue_token(sandbox, KEYVAULT_AUDIENCE, oid="o", appid="a")

    claims = registry.verify_token(token, KEYVAULT_AUDIENCE)
    assert claims is not None and claims["tid"] == sandbox.tenant_id and claims["exp"] == exp
    assert registry.verify_token(token, "https://127.0.0.1:7075") is None
    assert registry.verify_token(token + "x", KEYVAULT_AUDIENCE) is None
    assert Registry().verify_token(token, KEYVAULT_AUDIENCE) is None  # another stack's key
    expired, _ = registry.issue_token(sandbox, KEYVAULT_AUDIENCE, oid="o", appid="a", lifetime=-5)
    assert registry.verify_token(expired, KEYVAULT_AUDIENCE) is None

    registry.delete(sandbox.id)
    assert registry.verify_token(token, KEYVAULT_AUDIENCE) is None


def test_revocation_spares_tokens_issued_in_the_same_second_after_it(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    before, _ = registry.issue_token(sandbox, KEYVAULT_AUDIENCE, oid="o", appid="a")
    sandbox.revoke_tokens()
    after, _ = registry.issue_token(sandbox, KEYVAULT_AUDIENCE, oid="o", appid="a")

    assert registry.verify_token(before, KEYVAULT_AUDIENCE) is None
    assert registry.verify_token(after, KEYVAULT_AUDIENCE) is not None


def test_audience_trailing_slash_is_ignored(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    token, _ = registry.issue_token(sandbox, "https://127.0.0.1:7075", oid="o", appid="a")
    assert registry.sandbox_for_token(token, "https://127.0.0.1:7075/") is not None


def test_faults_are_fifo_counted_and_filtered(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    sandbox.add_fault(Fault("dataverse", method="PATCH", path_regex=r"/contacts", status=429, times=2))
    sandbox.add_fault(Fault("dataverse", status=503, times=-1))

    assert sandbox.take_fault("entra", "PATCH", "/contacts") is None
    first = sandbox.take_fault("dataverse", "patch", "/api/data/v9.2/contacts(1)")
    second = sandbox.take_fault("dataverse", "PATCH", "/api/data/v9.2/contacts(1)")
    assert first is not None and second is not None and first.status == second.status == 429
    for _ in range(3):
        forever = sandbox.take_fault("dataverse", "PATCH", "/api/data/v9.2/contacts(1)")
        assert forever is not None and forever.status == 503
    assert len(sandbox.faults) == 1
    sandbox.clear_faults()
    assert sandbox.take_fault("dataverse", "GET", "/") is None


@pytest.mark.parametrize("kwargs", [{"service": "blob"}, {"service": "entra", "times": 0},
                                    {"service": "entra", "path_regex": "("}])
def test_bad_faults_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Fault(**kwargs)  # type: ignore[arg-type]


def test_client_secret_verdicts_and_rotation(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    sandbox.set_client_secret("one")
    sandbox.set_client_secret("two", keep_old=True)
    assert sandbox.check_client_secret("one") == sandbox.check_client_secret("two") == "ok"
    assert sandbox.check_client_secret("three") == "invalid"

    sandbox.expire_client_secret()
    assert sandbox.check_client_secret("two") == "expired"
    sandbox.set_client_secret("four")
    assert sandbox.check_client_secret("one") == "invalid"
    assert sandbox.check_client_secret("four") == "ok"


def test_seeded_secrets_match_and_versions_accumulate(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    seeded = sandbox.get_secret("dataverse-client-secret")
    assert seeded is not None and sandbox.check_client_secret(seeded.value) == "ok"

    rotated = sandbox.set_secret("Dataverse-Client-Secret", "new")
    latest = sandbox.get_secret("dataverse-client-secret")
    assert latest is not None and latest.value == "new" and latest.version == rotated.version
    pinned = sandbox.get_secret("dataverse-client-secret", seeded.version)
    assert pinned is not None and pinned.value == seeded.value
    assert len(sandbox.secret_versions("DATAVERSE-CLIENT-SECRET")) == 2
    assert sandbox.get_secret("nope") is None


def test_default_sandbox_has_fixed_ids_and_lookups_work(registry: Registry) -> None:
    default = registry.create(sandbox_id="default")
    assert (default.tenant_id, default.client_id) == (DEFAULT_TENANT_ID, DEFAULT_CLIENT_ID)
    assert default.check_client_secret(DEFAULT_CLIENT_SECRET) == "ok"
    assert registry.by_tenant(DEFAULT_TENANT_ID.upper()) is default
    assert registry.by_identity_header(default.identity_header) is default
    with pytest.raises(ValueError, match="already exists"):
        registry.create(sandbox_id="default")

    other = registry.create(seed="empty")
    assert other.tenant_id != default.tenant_id and other.identity_header != default.identity_header
    assert registry.delete(other.id) is True
    assert registry.by_identity_header(other.identity_header) is None
    assert registry.delete(other.id) is False


def test_counters_snapshot_is_a_copy(registry: Registry) -> None:
    sandbox = registry.create(seed="empty")
    sandbox.counters.count("keyvault", "GET secret")
    snapshot = sandbox.counters.snapshot()
    sandbox.counters.count("keyvault", "GET secret")
    assert snapshot["keyvault"] == {"GET secret": 1}
    assert sandbox.counters.get("keyvault", "GET secret") == 2
    sandbox.counters.reset()
    assert sandbox.counters.snapshot()["keyvault"] == {}
    assert time.time() >= sandbox.created


def test_the_registry_builds_organisations_with_the_factory_it_is_given() -> None:
    """The stack injects devstack.dataverse.state.Org; nothing is looked up by module name at run time."""
    from devstack.dataverse.state import Org
    from devstack.sandboxes import NoDataverse

    calls: list[tuple[str, str, int]] = []

    def factory(sandbox: object, seed: str, users: int) -> NoDataverse:
        calls.append((getattr(sandbox, "id", ""), seed, users))
        return NoDataverse(sandbox, seed, users)  # type: ignore[arg-type]

    sandbox = Registry(org_factory=factory).create(seed="empty", users=3, sandbox_id="sbx-x")
    assert calls == [("sbx-x", "empty", 3)] and isinstance(sandbox.org, NoDataverse)
    assert isinstance(Registry(org_factory=Org).create(seed="empty").org, Org)
    assert Registry().create().org.users_wire() == []
