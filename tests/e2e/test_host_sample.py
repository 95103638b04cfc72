"""The local host's trigger and binding semantics, end to end over Azurite, with tests/e2e/sample_app.py."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.e2e.conftest import (
    MASTER_KEY,
    HostProcess,
    StartHost,
    blob_names,
    blob_text,
    put_blob,
    queue_texts,
    send_raw,
)

pytestmark = pytest.mark.e2e
FAST_RETRY = {"AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:00"}


def sample_env(queue_name: str, **extra: str) -> dict[str, str]:
    return {"SYNC_QUEUE_NAME": queue_name, "RESULTS_CONTAINER": queue_name, "TICK_SCHEDULE": "0 0 0 1 1 *",
            **extra}


def start_sample(start_host: StartHost, queue_name: str, **extra: str) -> HostProcess:
    return start_host(env=sample_env(queue_name, **extra))


def test_http_output_feeds_the_queue_trigger_and_its_blob_output(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name)
    jobs = [{"id": "a1", "action": "ok"}, {"id": "a2", "action": "ok"}]
    response = host.call("POST", "/api/enqueue/crm", json=jobs)
    assert response.status_code == 202
    assert response.json() == {"accepted": 2, "source": "crm"}
    host.wait_for(r"Executed 'Functions.process' \(Succeeded", count=2)
    for job_id in ("a1", "a2"):
        result = json.loads(blob_text(azurite_connection, queue_name, f"{job_id}.json") or "null")
        assert result["id"] == job_id
        assert result["dequeueCount"] == 1
    assert queue_texts(azurite_connection, queue_name) == []  # deleted on success


def test_queue_output_messages_are_base64_on_the_wire(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name)
    send_raw(azurite_connection, queue_name, base64.b64encode(b'{"id": "d1", "action": "dead"}').decode())
    host.wait_for(r"Executed 'Functions.process' \(Succeeded")
    wire = queue_texts(azurite_connection, f"{queue_name}-deadletter", encoded=False)
    assert len(wire) == 1
    assert json.loads(base64.b64decode(wire[0], validate=True)) == {
        "job": {"id": "d1", "action": "dead"}, "reason": "invalid_job"
    }


def test_a_failing_message_is_retried_then_moved_to_poison(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name, **FAST_RETRY)
    body = b'{"id": "f1", "action": "fail"}'
    send_raw(azurite_connection, queue_name, base64.b64encode(body).decode())
    host.wait_for(rf"Moved message \S+ to queue '{queue_name}-poison'")
    assert host.count(r"Executed 'Functions.process' \(Failed") == 5
    for attempt in range(1, 6):
        assert f"transient failure of f1 (dequeue {attempt})" in host.log
    assert queue_texts(azurite_connection, f"{queue_name}-poison") == [body.decode()]
    assert queue_texts(azurite_connection, queue_name) == []


def test_max_dequeue_count_override(start_host: StartHost, queue_name: str, azurite_connection: str) -> None:
    host = start_sample(start_host, queue_name, **FAST_RETRY,
                        AzureFunctionsJobHost__extensions__queues__maxDequeueCount="2")
    send_raw(azurite_connection, queue_name, base64.b64encode(b'{"id": "f2", "action": "fail"}').decode())
    host.wait_for(rf"Moved message \S+ to queue '{queue_name}-poison'")
    assert host.count(r"Executed 'Functions.process' \(Failed") == 2


def test_text_that_is_not_base64_goes_straight_to_poison_as_it_is(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name)
    send_raw(azurite_connection, queue_name, '{"id": "raw", "action": "ok"}')
    host.wait_for(rf"is not valid base64: moved it to '{queue_name}-poison'")
    assert host.count(r"Executing 'Functions.process'") == 0
    poison = queue_texts(azurite_connection, f"{queue_name}-poison", encoded=False)
    assert poison == ['{"id": "raw", "action": "ok"}']


def test_outputs_are_not_written_when_the_function_raises(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name)
    response = host.call("GET", "/api/boom", key=None)
    assert (response.status_code, response.content) == (500, b"")
    host.wait_for(r"Executed 'Functions.boom' \(Failed")
    assert queue_texts(azurite_connection, queue_name) == []


def test_concurrency_is_batch_size_plus_new_batch_threshold(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(
        start_host, queue_name,
        AzureFunctionsJobHost__extensions__queues__batchSize="2",
        AzureFunctionsJobHost__extensions__queues__newBatchThreshold="1",
        PYTHON_THREADPOOL_THREAD_COUNT="8",
    )
    jobs = [{"id": f"s{i}", "action": "slow"} for i in range(8)]
    assert host.call("POST", "/api/enqueue/bulk", json=jobs).status_code == 202
    host.wait_for(r"Executed 'Functions.process' \(Succeeded", count=8)
    stats = host.call("GET", "/api/stats", key=MASTER_KEY).json()
    assert 2 <= stats["maxRunning"] <= 3
    assert sorted(blob_names(azurite_connection, queue_name)) == sorted(f"s{i}.json" for i in range(8))


def test_timer_on_demand_reads_and_writes_blobs(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name)
    assert host.call("POST", "/admin/functions/tick", key=None, json={"input": ""}).status_code == 401
    assert host.run_function("tick").status_code == 202
    host.wait_for(r"Executed 'Functions.tick' \(Succeeded")
    [first] = blob_names(azurite_connection, queue_name, "reports/")
    assert re.fullmatch(r"reports/\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ\.json", first)
    report = json.loads(blob_text(azurite_connection, queue_name, first) or "{}")
    assert report == {"pastDue": False, "rows": [], "rosterMissing": True}

    put_blob(azurite_connection, queue_name, "roster.csv", "email\nada@example.com\nbob@example.com\n")
    assert host.run_function("tick").status_code == 202
    host.wait_for(r"Executed 'Functions.tick' \(Succeeded", count=2)
    # Two runs within one second write the same {DateTime} path, as in Azure: read the newest.
    newest = sorted(blob_names(azurite_connection, queue_name, "reports/"))[-1]
    report = json.loads(blob_text(azurite_connection, queue_name, newest) or "{}")
    assert report["rows"] == ["ada@example.com", "bob@example.com"]
    assert report["rosterMissing"] is False


def test_timer_fires_on_its_schedule(start_host: StartHost, queue_name: str) -> None:
    host = start_host(env=sample_env(queue_name) | {"TICK_SCHEDULE": "* * * * * *"})
    host.wait_for(r"Executing 'Functions.tick' \(Reason='Timer fired at", count=2, timeout=10)


def test_graceful_shutdown_lets_running_invocations_finish(
    start_host: StartHost, queue_name: str, azurite_connection: str
) -> None:
    host = start_sample(start_host, queue_name)
    send_raw(azurite_connection, queue_name, base64.b64encode(b'{"id": "g1", "action": "slow"}').decode())
    host.wait_for(r"Executing 'Functions.process'")
    assert host.stop() == 0
    lines = host.lines
    finished = next(i for i, line in enumerate(lines) if "Executed 'Functions.process' (Succeeded" in line)
    stopped = next(i for i, line in enumerate(lines) if "Host stopped" in line)
    assert finished < stopped
    assert blob_text(azurite_connection, queue_name, "g1.json") is not None


def test_unresolved_setting_puts_only_that_function_in_error(start_host: StartHost, queue_name: str) -> None:
    env = sample_env(queue_name)
    del env["TICK_SCHEDULE"]
    host = start_host(env=env)
    status = host.call("GET", "/admin/host/status", key=MASTER_KEY).json()
    assert status["state"] == "Running"
    assert "tick" not in status["functions"] and "process" in status["functions"]
    assert any("'%TICK_SCHEDULE%' does not resolve to a value" in error for error in status["errors"])
    assert host.call("GET", "/api/echo/x", key=None).status_code == 200
