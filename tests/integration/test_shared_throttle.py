"""Two instances, one Dataverse sandbox with service protection on, one storage account (Azurite).

Each "instance" is a whole Runtime (own token, connection pool, blob client, throttle), as two
Functions instances are; they share only the emulated environment and the storage account.
Assertions are on the emulator's counters and the throttles' own records, never on durations.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from devstack.control import SandboxClient, Stack
from shared.errors import DataverseError
from shared.runtime import Runtime
from shared.settings import Settings
from shared.throttle import BUDGET_SHARE, CONTAINER, DeploymentThrottle, blob_name

pytestmark = pytest.mark.integration


@pytest.fixture
def instances(stack: Stack, sandbox_env: SandboxClient,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Runtime]]:
    if not stack.azurite:
        pytest.skip("stack started without Azurite")
    monkeypatch.setenv("AzureWebJobsStorage", stack.azurite["connection_string"])
    monkeypatch.setenv("DATAVERSE_SHARED_THROTTLE", "auto")
    # Re-read the blob before every send: which instance learns what is then decided by order alone.
    monkeypatch.setenv("DATAVERSE_THROTTLE_REFRESH_SECONDS", "0")
    monkeypatch.setenv("DATAVERSE_THROTTLE_GROW_AFTER", "2")
    made: list[Runtime] = []

    def make() -> Runtime:
        runtime = Runtime.from_settings(Settings.from_env())
        assert isinstance(runtime.dataverse.throttle, DeploymentThrottle)
        made.append(runtime)
        return runtime

    made_two = [make(), make()]
    try:
        yield made_two
    finally:
        for runtime in made:
            runtime.close()


def throttle_of(runtime: Runtime) -> DeploymentThrottle:
    throttle = runtime.dataverse.throttle
    assert isinstance(throttle, DeploymentThrottle)
    return throttle


def test_after_one_429_the_other_instance_sends_nothing_into_the_window(
        instances: list[Runtime], sandbox_env: SandboxClient, stack: Stack) -> None:
    a, b = instances
    for runtime in (a, b):
        runtime.dataverse.whoami()  # both warm (token), both have read the shared state
    sandbox_env.set_limits(requests=3, window_seconds=2)
    sandbox_env.reset_counters()
    a_settings = Settings.from_env({**sandbox_env.env, "DATAVERSE_MAX_RETRIES": "0"})
    a.dataverse._settings = a_settings  # a gives up at its first 429 instead of waiting in process
    for _ in range(3):
        a.dataverse.whoami()
    with pytest.raises(DataverseError) as info:
        a.dataverse.whoami()
    assert info.value.status == 429
    # b has not seen a 429 of its own; it must learn the window from the blob and wait it out.
    assert b.dataverse.whoami()["UserId"]
    counters = sandbox_env.counters()["dataverse"]
    assert counters.get("status:429") == 1  # only a's: b sent nothing into the window
    assert counters.get("status:200") == 4
    assert throttle_of(b).stats.learned == 1 and throttle_of(b).stats.waits >= 1
    assert throttle_of(b).stats.throttled == 0
    assert "halve" in [why for _, why, _ in throttle_of(b).limiter.history]  # b backed off too
    # The 429 stated the budget (3 requests per 2 s); b, which never got one, paces at its half of it.
    stated = throttle_of(b).budget["requests"]
    assert (stated.limit, stated.window) == (3, 2) and throttle_of(b).active_instances == 2
    assert throttle_of(b)._interval(time.time()) == pytest.approx(2 / (BUDGET_SHARE * 3 / 2))

    from azure.storage.blob import BlobServiceClient

    blob = BlobServiceClient.from_connection_string(stack.azurite["connection_string"]).get_blob_client(
        CONTAINER, blob_name(a_settings.dataverse_url, a_settings.client_id))
    state = json.loads(blob.download_blob().readall())
    assert state["cut"] == 1 and state["reason"] == "0x80072322"
    assert {k: state["budget"]["requests"][k] for k in ("limit", "windowSeconds")} == {
        "limit": 3, "windowSeconds": 2}
    assert "instances" not in state  # heartbeats live in their own blobs, beside it
    container = BlobServiceClient.from_connection_string(
        stack.azurite["connection_string"]).get_container_client(CONTAINER)
    prefix = blob.blob_name.removesuffix(".json") + "/instances/"
    beats = {item.name.removeprefix(prefix) for item in container.list_blobs(name_starts_with=prefix)}
    assert {throttle_of(a).instance_id, throttle_of(b).instance_id} <= beats


def test_adaptive_concurrency_shrinks_on_429_and_grows_back_with_nothing_lost(
        instances: list[Runtime], sandbox_env: SandboxClient) -> None:
    a, b = instances
    sandbox_env.set_limits(requests=24, window_seconds=2, dop_hint=16)
    a.dataverse.whoami()
    b.dataverse.whoami()  # two live instances: each gets half the hint
    a.dataverse.whoami()
    limiter = throttle_of(a).limiter
    assert throttle_of(a).active_instances == 2 and limiter.ceiling == 8 and limiter.limit == 8
    prefix = uuid.uuid4().hex[:8]
    emails = [f"{prefix}-{i:03d}@example.com" for i in range(60)]

    def write(email: str) -> None:
        a.dataverse.upsert("contacts", {"emailaddress1": email}, {"lastname": email})

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(write, emails))
    reasons = [why for _, why, _ in limiter.history]
    limits = [limit for _, _, limit in limiter.history]
    halved = reasons.index("halve")
    assert limits[halved] == 4  # one 429 episode: halved once, not once per refused request
    assert "grow" in reasons[halved:] and limiter.limit == 8  # grown back to the ceiling
    assert limiter.peak_in_flight <= 8
    records = [r for r in sandbox_env.records("contacts") if str(r["emailaddress1"]).startswith(prefix)]
    assert sorted(r["emailaddress1"] for r in records) == emails  # 0 lost, 0 duplicates
    assert sandbox_env.counters()["dataverse"].get("status:429", 0) >= 1
