"""Local host configuration: settings precedence, host.json overrides, binding expressions, base64, keys."""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstack import host

NOW = datetime(2024, 2, 16, 17, 59, 55, 123456, tzinfo=UTC)


# -- settings


def test_local_settings_fill_only_what_the_environment_leaves_empty(tmp_path: Path) -> None:
    settings = tmp_path / "local.settings.json"
    values = {"A": "from-file", "B": "from-file", "C": "x"}
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    environ = {"A": "from-env", "B": ""}
    skipped = host.apply_local_settings(host.read_local_settings(settings), environ)
    assert environ == {"A": "from-env", "B": "from-file", "C": "x"}
    assert skipped == ["A"]


def test_missing_local_settings_file_is_empty(tmp_path: Path) -> None:
    assert host.read_local_settings(tmp_path / "nope.json") == {}


def test_broken_local_settings_name_the_file(tmp_path: Path) -> None:
    settings = tmp_path / "local.settings.json"
    settings.write_text("{not json")
    with pytest.raises(host.HostError, match=r"local\.settings\.json: not valid JSON"):
        host.read_local_settings(settings)


# -- host.json


def test_app_settings_override_host_json_ignoring_case() -> None:
    host_json = {"extensions": {"queues": {"visibilityTimeout": "00:00:30", "batchSize": 16}}}
    environ = {
        "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:00",
        "AzureFunctionsJobHost__Extensions__Queues__MaxDequeueCount": "2",
        "AzureFunctionsJobHost__functionTimeout": "00:01:00",
        "UNRELATED": "1",
    }
    config = host.host_configuration(host_json, environ)
    queues = config["extensions"]["queues"]
    assert queues["visibilityTimeout"] == "00:00:00"
    assert queues["MaxDequeueCount"] == "2"
    assert queues["batchSize"] == 16
    assert config["functionTimeout"] == "00:01:00"
    options = host.QueueOptions.from_config(config)
    assert (options.visibility_timeout, options.max_dequeue_count, options.batch_size) == (0.0, 2, 16)
    assert host_json["extensions"]["queues"]["visibilityTimeout"] == "00:00:30"  # input untouched


def test_queue_defaults_follow_the_storage_extension() -> None:
    options = host.QueueOptions.from_config({}, cpu_count=2)
    assert options.batch_size == 16
    assert options.new_batch_threshold == 16  # batchSize/2 x processors
    assert options.max_concurrency == 32
    assert options.max_dequeue_count == 5
    assert options.visibility_timeout == 0.0
    assert options.max_polling_interval == 60.0
    assert options.message_encoding == "base64"


def test_project_host_json_values() -> None:
    config = {"extensions": {"queues": {"batchSize": 16, "newBatchThreshold": 8, "maxDequeueCount": 5,
                                        "visibilityTimeout": "00:00:30", "messageEncoding": "base64"}}}
    options = host.QueueOptions.from_config(config, cpu_count=4)
    assert (options.max_concurrency, options.visibility_timeout) == (24, 30.0)


@pytest.mark.parametrize(
    ("queues", "message"),
    [
        ({"batchSize": 33}, "batchSize must be 1..32"),
        ({"batchSize": "many"}, "batchSize: 'many' is not a whole number"),
        ({"maxDequeueCount": 0}, "maxDequeueCount must be at least 1"),
        ({"messageEncoding": "utf8"}, "messageEncoding must be base64 or none"),
        ({"visibilityTimeout": "30s"}, "is not a TimeSpan"),
    ],
)
def test_bad_queue_options_are_named(queues: dict[str, object], message: str) -> None:
    with pytest.raises(host.HostError, match=message):
        host.QueueOptions.from_config({"extensions": {"queues": queues}})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:00:30", 30.0), ("00:05:00", 300.0), ("01:00:00", 3600.0), ("1.00:00:01", 86401.0),
     ("00:00:00.5", 0.5)],
)
def test_timespans(text: str, seconds: float) -> None:
    assert host.parse_timespan(text) == seconds


# -- binding expressions


def test_settings_expressions_resolve_inside_longer_strings() -> None:
    environ = {"SYNC_QUEUE_NAME": "dynamics-sync"}
    assert host.resolve_settings("%SYNC_QUEUE_NAME%-deadletter", environ) == "dynamics-sync-deadletter"
    assert host.resolve_settings("plain", environ) == "plain"


def test_unresolved_setting_is_an_error_like_the_host() -> None:
    expected = re.escape("'%RECONCILE_SCHEDULE%' does not resolve to a value.")
    with pytest.raises(host.BindingExpressionError, match=expected):
        host.resolve_settings("%RECONCILE_SCHEDULE%", {})


def test_datetime_uses_the_hosts_default_format() -> None:
    path = host.resolve_runtime("reconciliation/reports/{DateTime}.json", now=NOW)
    assert path == "reconciliation/reports/2024-02-16T17-59-55Z.json"


def test_datetime_with_a_dotnet_format() -> None:
    assert host.resolve_runtime("{DateTime:yyyy/MM/dd}/x", now=NOW) == "2024/02/16/x"
    assert host.resolve_runtime("{datetime:yyyyMMddHHmmssfff}", now=NOW) == "20240216175955123"


def test_rand_guid_is_new_each_time_and_formats() -> None:
    first = host.resolve_runtime("out/{rand-guid}.json")
    second = host.resolve_runtime("out/{rand-guid}.json")
    assert first != second
    uuid.UUID(first[4:-5])
    assert re.fullmatch(r"[0-9a-f]{32}", host.resolve_runtime("{rand-guid:N}"))


def test_trigger_data_and_missing_names() -> None:
    data = {"id": "job-1", "Query": {"code": "k"}, "DequeueCount": 3}
    assert host.resolve_runtime("results/{Id}/{query.code}/{DequeueCount}", data) == "results/job-1/k/3"
    assert host.resolve_runtime("{sys.MethodName}", function_name="f") == "f"
    with pytest.raises(host.BindingExpressionError, match="No value for named parameter 'missing'"):
        host.resolve_runtime("x/{missing}", data)


# -- base64


@given(st.text())
def test_queue_messages_round_trip_as_base64(body: str) -> None:
    wire = host.encode_message(body)
    assert base64.b64decode(wire, validate=True).decode("utf-8") == body
    assert host.decode_message(wire) == body.encode("utf-8")


def test_text_that_is_not_base64_is_poison_and_none_encoding_passes_it() -> None:
    assert host.decode_message('{"id": "x"}') is None
    assert host.decode_message("not base64!!") is None
    assert host.decode_message("é") is None
    assert host.decode_message('{"id": "x"}', "none") == b'{"id": "x"}'
    assert host.encode_message('{"id": "x"}', "none") == '{"id": "x"}'


# -- keys


def test_keys_default_to_documented_dev_values_and_come_from_settings() -> None:
    assert host.Keys.from_env({}) == host.Keys(host.DEFAULT_FUNCTION_KEY, host.DEFAULT_MASTER_KEY)
    keys = host.Keys.from_env({"LOCAL_FUNCTION_KEY": "fk", "LOCAL_MASTER_KEY": "mk"})
    assert keys == host.Keys("fk", "mk")


@pytest.mark.parametrize(
    ("level", "presented", "allowed"),
    [
        ("ANONYMOUS", None, True),
        ("FUNCTION", None, False),
        ("FUNCTION", "", False),
        ("FUNCTION", "wrong", False),
        ("FUNCTION", "fk", True),
        ("FUNCTION", "mk", True),
        ("ADMIN", "fk", False),
        ("ADMIN", "mk", True),
        ("ADMIN", None, False),
    ],
)
def test_auth_levels(level: str, presented: str | None, allowed: bool) -> None:
    assert host.Keys("fk", "mk").allows(level, presented) is allowed


# -- storage connections


def test_development_storage_means_azurite() -> None:
    environ = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}
    account = host.StorageAccount("AzureWebJobsStorage", environ)
    assert account.connection_string == host.AZURITE_CONNECTION_STRING


def test_identity_based_connection() -> None:
    environ = {
        "AzureWebJobsStorage__queueServiceUri": "https://acct.queue.core.windows.net",
        "AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-000000000001",
    }
    account = host.StorageAccount("AzureWebJobsStorage", environ)
    assert account.connection_string is None
    assert account.queue_url == "https://acct.queue.core.windows.net"
    assert account.blob_url == "https://acct.blob.core.windows.net"
    assert account.client_id == "00000000-0000-0000-0000-000000000001"


def test_account_name_connection_builds_endpoints() -> None:
    account = host.StorageAccount("Store", {"Store__accountName": "acct"})
    assert account.queue_url == "https://acct.queue.core.windows.net"


def test_unconfigured_connection_says_what_to_set() -> None:
    with pytest.raises(host.HostError, match="set AzureWebJobsStorage to a connection string"):
        host.StorageAccount("AzureWebJobsStorage", {})


@pytest.mark.parametrize("name", ["Dynamics-sync", "ab", "a--b", "-ab", "ab-", "a_b"])
def test_invalid_queue_names(name: str) -> None:
    with pytest.raises(host.HostError, match="invalid queue name"):
        host.validate_queue_name(name, "binding 'msg'")


def test_valid_queue_name() -> None:
    assert host.validate_queue_name("dynamics-sync-deadletter", "x") == "dynamics-sync-deadletter"


# -- routes


def test_route_templates() -> None:
    pattern = host.compile_route("webhooks/{source}")
    match = pattern.match("Webhooks/crm")
    assert match is not None and match.group("source") == "crm"
    assert pattern.match("webhooks/crm/extra") is None
    optional = host.compile_route("echo/{name?}")
    assert optional.match("echo") and optional.match("echo/x")
    catch_all = host.compile_route("files/{*rest}")
    rest = catch_all.match("files/a/b")
    assert rest is not None and rest.group("rest") == "a/b"
