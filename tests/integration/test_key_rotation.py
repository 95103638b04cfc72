"""Webhook key rotation against the Key Vault emulator (real SDK, real SecretStore), on an injected clock.

After the key is rotated in Key Vault, the instance picks it up on its periodic re-read — no request needs
to use the new key — accepts the old one for the grace period, then refuses it.
"""

from __future__ import annotations

import time

import pytest

from devstack.control import SandboxClient
from shared.keyring import KeyRing
from shared.secrets import SecretStore
from shared.webhooks import handle_webhook, signature_header

pytestmark = pytest.mark.integration

NAME = "webhook-signing-secret"
BODY = b'{"id":"k-1","entity":"contacts","operation":"create","data":{"firstname":"Ada"}}'


def post(ring: KeyRing, key: str) -> int:
    headers = {"Content-Type": "application/json",
               "X-Signature": signature_header(key.encode(), BODY, int(time.time()), source="crm")}
    return handle_webhook("crm", headers, BODY, ring.keys, refresh_key=lambda stale: ring.reread()).status


def reads(sbx: SandboxClient) -> int:
    return int(sbx.counters()["keyvault"].get("GET secret", 0))


def test_rotation_grace_then_refusal(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_secret(NAME, "old-key")
    clock = [0.0]
    store = SecretStore(sbx.env["KEY_VAULT_URL"])
    ring = KeyRing(store, NAME, refresh_seconds=300, grace_seconds=600, clock=lambda: clock[0])
    try:
        sbx.reset_counters()
        assert post(ring, "old-key") == 202 and reads(sbx) == 1
        sbx.set_secret(NAME, "new-key")  # rotated; every sender still signs with the old key

        clock[0] = 299
        assert post(ring, "old-key") == 202 and reads(sbx) == 1  # no read before the period is over
        clock[0] = 300
        assert post(ring, "old-key") == 202 and reads(sbx) == 2  # re-read: new key known, old in grace
        assert post(ring, "new-key") == 202 and reads(sbx) == 2
        clock[0] = 899
        assert post(ring, "old-key") == 202
        clock[0] = 900  # grace over (600 s after the new key was read), though nobody used the new key
        assert post(ring, "old-key") == 401
        assert post(ring, "new-key") == 202
        # a flood of bad signatures is not Key Vault traffic: one re-read per minute at most
        for _ in range(20):
            assert post(ring, "forged") == 401
        assert reads(sbx) <= 4
    finally:
        store.close()


def test_a_sender_with_the_new_key_is_served_after_one_reread(sandbox_env: SandboxClient) -> None:
    sbx = sandbox_env
    sbx.set_secret(NAME, "k1")
    clock = [0.0]
    store = SecretStore(sbx.env["KEY_VAULT_URL"])
    ring = KeyRing(store, NAME, refresh_seconds=300, grace_seconds=600, clock=lambda: clock[0])
    try:
        assert post(ring, "k1") == 202
        sbx.set_secret(NAME, "k2")
        clock[0] = 61  # past the mismatch rate limit, before the periodic re-read
        assert post(ring, "k2") == 202  # mismatch -> one re-read -> accepted
        assert post(ring, "k1") == 202  # and the old one still, for its grace
    finally:
        store.close()
