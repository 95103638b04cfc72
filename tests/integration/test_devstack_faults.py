"""Faults, latency, counters, sandbox isolation and connection reuse of the emulator framework."""

from __future__ import annotations

import pytest
import requests
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from devstack.control import ControlError, SandboxClient, Stack

pytestmark = pytest.mark.integration

MSI_PARAMS = {"api-version": "2019-08-01", "resource": "https://vault.azure.net"}


def msi(sbx: SandboxClient, session: requests.Session | None = None,
        timeout: float = 10) -> requests.Response:
    getter = session.get if session is not None else requests.get
    return getter(sbx.env["IDENTITY_ENDPOINT"], params=MSI_PARAMS,
                  headers={"X-IDENTITY-HEADER": sbx.identity_header}, timeout=timeout)


def discovery(sbx: SandboxClient, session: requests.Session | None = None,
              timeout: float = 10) -> requests.Response:
    getter = session.get if session is not None else requests.get
    return getter(f"{sbx.env['AZURE_AUTHORITY_HOST']}/{sbx.tenant_id}/v2.0/.well-known/openid-configuration",
                  timeout=timeout)


def test_status_fault_answers_body_and_headers_then_runs_out(sandbox: SandboxClient) -> None:
    sandbox.add_fault("identity", status=503, body={"statusCode": 503, "message": "busy"},
                      headers={"Retry-After": "2"}, times=2)

    first, second, third = msi(sandbox), msi(sandbox), msi(sandbox)

    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.json() == {"statusCode": 503, "message": "busy"}
    assert first.headers["Retry-After"] == "2"
    counters = sandbox.counters()["identity"]
    assert counters == {"GET msi": 3, "status:503": 2, "status:200": 1}


def test_raw_body_fault_is_sent_verbatim(sandbox: SandboxClient) -> None:
    sandbox.add_fault("entra", raw_body="<html>gateway</html>", status=502)
    response = discovery(sandbox)
    assert response.status_code == 502
    assert response.text == "<html>gateway</html>"


def test_fault_matches_method_and_path_only(sandbox: SandboxClient) -> None:
    sandbox.add_fault("entra", method="POST", path=r"/oauth2/v2\.0/token$", status=500, times=-1)

    assert discovery(sandbox).status_code == 200
    token = requests.post(f"{sandbox.env['AZURE_AUTHORITY_HOST']}/{sandbox.tenant_id}/oauth2/v2.0/token",
                          data={"grant_type": "client_credentials"}, timeout=10)
    assert token.status_code == 500
    assert len(sandbox.faults()) == 1  # times=-1: still armed

    sandbox.clear_faults()
    assert sandbox.faults() == []


def test_drop_fault_resets_the_connection_without_an_answer(sandbox: SandboxClient) -> None:
    sandbox.add_fault("entra", drop=True)
    with requests.Session() as session:
        with pytest.raises(requests.ConnectionError):
            discovery(sandbox, session)
        # The pool notices the dead connection and the next request simply works.
        assert discovery(sandbox, session).status_code == 200
    counters = sandbox.counters()["entra"]
    assert counters["GET openid-configuration"] == 2
    assert counters["status:200"] == 1
    assert "status:500" not in counters


def test_drop_fault_over_plain_http(sandbox: SandboxClient) -> None:
    sandbox.add_fault("identity", drop=True)
    with pytest.raises(requests.ConnectionError):
        msi(sandbox)
    assert msi(sandbox).status_code == 200


def test_delay_fault_slows_a_normal_answer_past_the_client_timeout(sandbox: SandboxClient) -> None:
    sandbox.add_fault("identity", delay=2.0)
    with pytest.raises(requests.ReadTimeout):
        msi(sandbox, timeout=0.3)
    assert msi(sandbox).status_code == 200


def test_latency_applies_to_every_request_until_cleared(sandbox: SandboxClient) -> None:
    sandbox.set_latency("entra", 2.0)
    with pytest.raises(requests.ReadTimeout):
        discovery(sandbox, timeout=0.3)
    sandbox.set_latency("entra", 0)
    assert discovery(sandbox, timeout=5).status_code == 200


def test_sdk_retries_through_a_transient_key_vault_fault(sandbox_env: SandboxClient) -> None:
    sandbox_env.add_fault("keyvault", path="/secrets/webhook-signing-secret", status=500,
                          body={"error": {"code": "InternalServerError", "message": "try again"}})
    client = SecretClient(sandbox_env.env["KEY_VAULT_URL"], DefaultAzureCredential(),
                          verify_challenge_resource=False, retry_backoff_factor=0.01)

    assert client.get_secret("webhook-signing-secret").value
    counters = sandbox_env.counters()["keyvault"]
    assert counters["status:500"] == 1
    assert counters["status:200"] == 1
    assert counters["GET secret"] == 2


def test_a_fault_in_one_sandbox_leaves_another_untouched(stack: Stack, sandbox: SandboxClient) -> None:
    other = stack.create_sandbox(seed="empty")
    try:
        sandbox.add_fault("identity", status=500, times=-1)
        sandbox.set_latency("entra", 5.0)

        assert msi(other).status_code == 200
        assert discovery(other, timeout=2).status_code == 200
        assert msi(sandbox).status_code == 500
        assert other.counters()["identity"] == {"GET msi": 1, "status:200": 1}
        assert sandbox.counters()["entra"] == {}
    finally:
        other.delete()


def test_counters_reset(sandbox: SandboxClient) -> None:
    msi(sandbox)
    assert sandbox.counters()["identity"]["GET msi"] == 1
    sandbox.reset_counters()
    assert sandbox.counters() == {"identity": {}, "entra": {}, "keyvault": {}, "dataverse": {}}


def test_https_connections_are_kept_alive(sandbox: SandboxClient) -> None:
    with requests.Session() as session:
        for _ in range(5):
            assert discovery(sandbox, session).status_code == 200
            assert "close" not in discovery(sandbox, session).headers.get("Connection", "")
        adapter = session.get_adapter(sandbox.env["AZURE_AUTHORITY_HOST"])
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        keys = adapter.poolmanager.pools.keys()  # the container refuses plain iteration
        pools = [adapter.poolmanager.pools[key] for key in keys]
        assert [pool.num_connections for pool in pools] == [1]


def test_unread_request_body_does_not_corrupt_the_next_request(sandbox: SandboxClient) -> None:
    # A fault answers before the form body is read; the server must drain it on the kept-alive connection.
    sandbox.add_fault("entra", method="POST", status=429)
    url = f"{sandbox.env['AZURE_AUTHORITY_HOST']}/{sandbox.tenant_id}/oauth2/v2.0/token"
    with requests.Session() as session:
        assert session.post(url, data={"grant_type": "x" * 5000}, timeout=10).status_code == 429
        assert discovery(sandbox, session).status_code == 200


def test_bad_fault_arguments_are_refused(sandbox: SandboxClient) -> None:
    with pytest.raises(ValueError, match="unknown service"):
        sandbox.add_fault("blob", status=500)
    with pytest.raises(ControlError) as caught:
        sandbox.add_fault("entra", path="(unclosed", status=500)
    assert caught.value.status == 400
    with pytest.raises(ControlError):
        sandbox.add_fault("entra", status=500, times=0)
