"""The webhook replay window against real blob storage (Azurite, the real SDK): once, shared, fail closed."""

from __future__ import annotations

import threading
import uuid

import pytest

from devstack.control import Stack
from shared.errors import ReplayStoreUnavailable
from shared.replay import ReplayGuard, blob_name
from shared.storage import BlobStore, StorageTarget

pytestmark = pytest.mark.integration


@pytest.fixture
def guard(stack: Stack) -> ReplayGuard:
    connection = stack.azurite.get("connection_string")
    if not connection:
        pytest.skip("the devstack state has no Azurite")
    # a container of its own per test: the first use creates it, as on a fresh account
    return ReplayGuard(BlobStore(StorageTarget("test", connection_string=connection)),
                       container=f"replay-{uuid.uuid4().hex[:12]}")


def test_a_body_is_new_once(guard: ReplayGuard) -> None:
    body = b'{"id":"x"}'
    assert guard.first_use(1_700_000_000, "crm", body) is True
    assert guard.first_use(1_700_000_000, "crm", body) is False
    assert guard.first_use(1_700_000_001, "crm", body) is True  # another signature time: another request
    assert guard.first_use(1_700_000_000, "erp", body) is True  # another source: another request


def test_concurrent_identical_requests_one_wins(guard: ReplayGuard, stack: Stack) -> None:
    # two "instances": two clients of the same account
    connection = stack.azurite["connection_string"]
    other = ReplayGuard(BlobStore(StorageTarget("test", connection_string=connection)),
                        container=guard._container)
    results: list[bool] = []
    guard.first_use(1, "warm", b"")  # the container exists, so the race is on the blob alone
    threads = [threading.Thread(target=lambda g=g: results.append(g.first_use(1_700_000_000, "crm", b"{}")))
               for g in (guard, other) * 8]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 15 + [True]


def test_unreachable_storage_fails_closed() -> None:
    dead = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" \
           "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;" \
           "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    guard = ReplayGuard(BlobStore(StorageTarget("test", connection_string=dead)))
    with pytest.raises(ReplayStoreUnavailable) as caught:
        guard.first_use(1_700_000_000, "crm", b"{}")
    assert caught.value.transient and caught.value.code == "replay_store_unavailable"


def test_blob_name_is_the_documented_contract() -> None:
    name = blob_name(1_700_000_000, "crm", b"{}")
    t, digest = name.split("/")
    assert t == "1700000000" and len(digest) == 64
