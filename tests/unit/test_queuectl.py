"""queuectl without a storage account: an in-memory queue service stands in for Azure/Azurite."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shared.messages import strip, verify
from tests.signing import UNIT_MESSAGE_KEY, sign_job
from tools import queuectl

JOB = {"id": "crm-1", "entity": "contacts", "operation": "upsert",
       "key": {"emailaddress1": "ada@example.com"}, "data": {"firstname": "Ada"},
       "actAs": {"email": "jane@contoso.com"}}
_ids = itertools.count(1)


class FakeQueue:
    def __init__(self) -> None:
        self.messages: list[SimpleNamespace] = []

    def add(self, wire: str) -> None:
        n = next(_ids)
        self.messages.append(SimpleNamespace(id=f"m{n}", pop_receipt=f"p{n}", content=wire, dequeue_count=0,
                                             inserted_on=None, visible=True))

    def receive_messages(self, *, messages_per_page: int, max_messages: int,
                         visibility_timeout: int) -> list[SimpleNamespace]:
        batch = [m for m in self.messages if m.visible][:max_messages]
        for message in batch:
            message.visible = False
            message.dequeue_count += 1
        return batch

    def peek_messages(self, max_messages: int) -> list[SimpleNamespace]:
        return [m for m in self.messages if m.visible][:max_messages]

    def get_queue_properties(self) -> SimpleNamespace:
        return SimpleNamespace(approximate_message_count=len(self.messages))

    def delete_message(self, message_id: str, pop_receipt: str) -> None:
        self.messages = [m for m in self.messages if m.id != message_id]

    def update_message(self, message_id: str, pop_receipt: str, visibility_timeout: int) -> None:
        for message in self.messages:
            if message.id == message_id:
                message.visible = visibility_timeout == 0


class FakeStorage(queuectl.Storage):
    def __init__(self, fail_sends: bool = False) -> None:
        self.queues: dict[str, FakeQueue] = {}
        self.fail_sends = fail_sends
        self.where = "memory"

    def queue(self, name: str) -> Any:
        return self.queues.setdefault(name, FakeQueue())

    def send(self, name: str, body: str) -> None:
        if self.fail_sends:
            from azure.core.exceptions import ServiceRequestError

            raise ServiceRequestError("connection refused")
        self.queue(name).add(queuectl.encode(body))

    def texts(self, name: str) -> list[str]:
        return [queuectl.decode(m.content)[0] for m in self.queue(name).messages]


def run(storage: FakeStorage, *argv: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(queuectl, "open_storage", lambda args: storage)
    monkeypatch.setattr(queuectl, "read_signing_key", lambda args: UNIT_MESSAGE_KEY)
    monkeypatch.delenv("SYNC_QUEUE_NAME", raising=False)
    out = io.StringIO()
    code = queuectl.main(list(argv), out=out)
    return code, out.getvalue()


def dead_letter(job: object, reason: str = "actor_not_found", *, signed: bool = True) -> str:
    """A dead-letter record as sync_job writes it: the message as it came, signed (dicts only)."""
    if signed and isinstance(job, dict):
        job = sign_job(job, UNIT_MESSAGE_KEY)
    return json.dumps({"job": job, "reason": reason, "detail": "no user jane@contoso.com",
                       "failedAt": "2024-05-01T06:00:00Z"})


def test_base64_round_trip_and_raw_text() -> None:
    assert queuectl.decode(queuectl.encode("héllo")) == ("héllo", True)
    assert queuectl.decode('{"not": "base64"}') == ('{"not": "base64"}', False)
    assert base64.b64decode(queuectl.encode("x")) == b"x"


def test_replay_deadletter_requeues_the_original_job_and_deletes_after_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = FakeStorage()
    storage.queue("dynamics-sync-deadletter").add(queuectl.encode(dead_letter(JOB)))
    code, out = run(storage, "replay", "deadletter", monkeypatch=monkeypatch)
    assert code == 0
    (sent,) = [json.loads(t) for t in storage.texts("dynamics-sync")]
    assert sent == sign_job(JOB, UNIT_MESSAGE_KEY, now=sent["_auth"]["t"])  # the signed original, unchanged
    assert storage.queue("dynamics-sync-deadletter").messages == []
    assert "replayed 1 message(s)" in out


def test_a_failed_send_deletes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage(fail_sends=True)
    storage.queue("dynamics-sync-deadletter").add(queuectl.encode(dead_letter(JOB)))
    code, _ = run(storage, "replay", "deadletter", monkeypatch=monkeypatch)
    assert code == queuectl.EXIT_STORAGE
    [kept] = storage.queue("dynamics-sync-deadletter").messages
    assert kept.visible  # released straight away for the next attempt


def test_replay_by_id_leaves_the_others_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    dead = storage.queue("dynamics-sync-deadletter")
    for job_id in ("a", "b", "c"):
        dead.add(queuectl.encode(dead_letter(JOB | {"id": job_id})))
    code, _ = run(storage, "replay", "deadletter", "--id", "b", monkeypatch=monkeypatch)
    assert code == 0
    assert [json.loads(t)["id"] for t in storage.texts("dynamics-sync")] == ["b"]
    assert [json.loads(queuectl.decode(m.content)[0])["job"]["id"] for m in dead.messages] == ["a", "c"]
    assert all(m.visible for m in dead.messages)
    code, out = run(storage, "replay", "deadletter", "--id", "zzz", monkeypatch=monkeypatch)
    assert code == 1 and "no message with job id zzz" in out


def test_replay_max(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    for job_id in ("a", "b", "c"):
        storage.queue("dynamics-sync-deadletter").add(queuectl.encode(dead_letter(JOB | {"id": job_id})))
    code, _ = run(storage, "replay", "deadletter", "--max", "2", monkeypatch=monkeypatch)
    assert code == 0
    assert len(storage.texts("dynamics-sync")) == 2
    assert len(storage.queue("dynamics-sync-deadletter").messages) == 1


def test_records_that_cannot_be_replayed_stay_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    dead = storage.queue("dynamics-sync-deadletter")
    dead.add(queuectl.encode(dead_letter("{not json", reason="invalid_json")))
    dead.add(queuectl.encode(dead_letter(JOB | {"operation": "merge"}, reason="invalid_job")))
    code, out = run(storage, "replay", "deadletter", monkeypatch=monkeypatch)
    assert code == 1
    assert storage.texts("dynamics-sync") == []
    assert len(dead.messages) == 2 and all(m.visible for m in dead.messages)
    assert "was not a JSON job" in out and "still invalid (operation)" in out


def test_replay_poison_sends_the_body_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    body = json.dumps(JOB)
    storage.queue("orders-poison").add(queuectl.encode(body))
    storage.queue("orders-poison").add('{"id": "raw-text"}')  # a sender that forgot base64
    code, _ = run(storage, "--queue", "orders", "replay", "poison", monkeypatch=monkeypatch)
    assert code == 0
    assert storage.texts("orders") == [body, '{"id": "raw-text"}']
    assert all(queuectl.decode(m.content)[1] for m in storage.queue("orders").messages)  # now base64


def test_dry_run_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    storage.queue("dynamics-sync-poison").add(queuectl.encode(json.dumps(JOB)))
    code, out = run(storage, "replay", "poison", "--dry-run", monkeypatch=monkeypatch)
    assert code == 0 and "would replay" in out
    assert storage.texts("dynamics-sync") == []
    poison = storage.queue("dynamics-sync-poison").messages
    assert len(poison) == 1
    assert poison[0].dequeue_count == 0 and poison[0].visible  # peeked, not received


def test_peek_shows_reasons_without_taking(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    storage.queue("dynamics-sync-deadletter").add(queuectl.encode(dead_letter(JOB)))
    code, out = run(storage, "peek", "deadletter", monkeypatch=monkeypatch)
    assert code == 0
    assert "crm-1  actor_not_found: no user jane@contoso.com" in out
    code, out = run(storage, "peek", "deadletter", "--json", monkeypatch=monkeypatch)
    [message] = json.loads(out)["messages"]
    assert (message["jobId"], message["reason"]) == ("crm-1", "actor_not_found")
    assert strip(message["job"]) == {**JOB, "source": "tests"}
    assert storage.queue("dynamics-sync-deadletter").messages[0].dequeue_count == 0


def test_send_validates_every_job_before_sending_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    bad = tmp_path / "jobs.json"
    bad.write_text(json.dumps({"jobs": [JOB, JOB | {"entity": "Bad Name", "colour": "red"}]}))
    code, out = run(storage, "send", str(bad), monkeypatch=monkeypatch)
    assert code == 1
    assert "nothing sent" in out and "jobs[1].entity" in out and "jobs[1].colour" in out
    assert storage.texts("dynamics-sync") == []
    good = tmp_path / "job.json"
    good.write_text(json.dumps(JOB))
    code, out = run(storage, "send", str(good), monkeypatch=monkeypatch)
    assert code == 0 and "sent crm-1 -> dynamics-sync" in out
    (sent,) = [json.loads(t) for t in storage.texts("dynamics-sync")]
    assert strip(sent) == {**JOB, "source": "queuectl"} and verify(sent, [UNIT_MESSAGE_KEY])


def test_send_refuses_a_job_over_the_queue_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    big = tmp_path / "big.json"
    big.write_text(json.dumps(JOB | {"data": {"description": "x" * 50_000}}))
    code, out = run(storage, "send", str(big), monkeypatch=monkeypatch)
    assert code == 1 and "more than 49152" in out


def test_send_reports_unreadable_files_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queuectl.main(["send", str(tmp_path / "missing.json")]) == queuectl.EXIT_USAGE
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert queuectl.main(["send", str(broken)]) == queuectl.EXIT_USAGE
    assert "not valid JSON" in capsys.readouterr().err


def test_connection_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STORAGE_ENV:
        monkeypatch.delenv(name, raising=False)
    args = queuectl.build_parser().parse_args(["peek", "poison"])
    with pytest.raises(queuectl.UsageError, match="no storage account"):
        queuectl.open_storage(args)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"azurite": {"connection_string": "UseDevelopmentStorage=true"}}))
    monkeypatch.setenv("DEVSTACK_STATE", str(state))
    assert "127.0.0.1:10001" in queuectl.open_storage(args).where
    args = queuectl.build_parser().parse_args(["--account-url", "http://acct", "peek", "poison"])
    with pytest.raises(queuectl.UsageError, match="must be https://"):
        queuectl.open_storage(args)
    argv = ["--connection-string", "UseDevelopmentStorage=true", "peek", "x"]
    args = queuectl.build_parser().parse_args(argv)
    assert "127.0.0.1:10001" in queuectl.open_storage(args).where


# --------------------------------------------------------------------------- issue 11

REPO = Path(__file__).resolve().parents[2]
STORAGE_ENV = ("AzureWebJobsStorage", "AzureWebJobsStorage__queueServiceUri",
               "AzureWebJobsStorage__accountName", "AZURE_STORAGE_CONNECTION_STRING", "DEVSTACK_STATE")


def parse(*argv: str) -> Any:
    return queuectl.build_parser().parse_args([*argv, "peek", "poison"])


def test_send_dash_reads_the_jobs_from_stdin_once(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"jobs": [JOB, JOB | {"id": "crm-2"}]})))
    code, out = run(storage, "send", "-", monkeypatch=monkeypatch)
    assert code == 0, out
    assert [json.loads(t)["id"] for t in storage.texts("dynamics-sync")] == ["crm-1", "crm-2"]


def test_flags_beat_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AzureWebJobsStorage": "UseDevelopmentStorage=true",
           "AzureWebJobsStorage__accountName": "fromenv", "AZURE_STORAGE_CONNECTION_STRING": "x=y"}
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"azurite": {"connection_string": "from-state"}}))
    assert queuectl.resolve_storage(parse("--state", str(state)), env) == queuectl.Target(
        connection_string="from-state", source="--state")
    assert queuectl.resolve_storage(parse("--connection-string", "flag"), env).connection_string == "flag"
    target = queuectl.resolve_storage(parse("--account-url", "https://flag.queue.core.windows.net/"), env)
    assert (target.account_url, target.connection_string) == ("https://flag.queue.core.windows.net", None)
    with pytest.raises(queuectl.UsageError, match="not both"):
        queuectl.resolve_storage(parse("--connection-string", "a", "--account-url", "https://b"), env)
    # --queue beats SYNC_QUEUE_NAME
    storage = FakeStorage()
    monkeypatch.setattr(queuectl, "open_storage", lambda args: storage)
    monkeypatch.setenv("SYNC_QUEUE_NAME", "from-env")
    storage.queue("from-flag-poison").add(queuectl.encode(json.dumps(JOB)))
    out = io.StringIO()
    assert queuectl.main(["--queue", "from-flag", "peek", "poison"], out=out) == 0
    assert out.getvalue().startswith("from-flag-poison: about 1 message(s)")


def test_the_deployed_apps_settings_resolve_in_order(tmp_path: Path) -> None:
    args = parse()
    account = {"AzureWebJobsStorage__accountName": "prodacct"}
    assert queuectl.resolve_storage(args, account) == queuectl.Target(
        account_url="https://prodacct.queue.core.windows.net", source="AzureWebJobsStorage__accountName")
    uri = {"AzureWebJobsStorage__queueServiceUri": "https://other.queue.core.windows.net/"} | account
    assert queuectl.resolve_storage(args, uri).account_url == "https://other.queue.core.windows.net"
    with pytest.raises(queuectl.UsageError, match="queueServiceUri must be https://"):
        queuectl.resolve_storage(args, {"AzureWebJobsStorage__queueServiceUri": "http://x"})
    generic = {"AZURE_STORAGE_CONNECTION_STRING": "generic"}
    assert queuectl.resolve_storage(args, generic).source == "AZURE_STORAGE_CONNECTION_STRING"
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"azurite": {"connection_string": "from-state"}}))
    assert queuectl.resolve_storage(args, {"DEVSTACK_STATE": str(state)}).source == "DEVSTACK_STATE"
    assert queuectl.resolve_storage(args, generic | {"DEVSTACK_STATE": str(state)}).source == \
        "AZURE_STORAGE_CONNECTION_STRING"
    everything = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"} | uri | generic
    assert queuectl.resolve_storage(args, everything).source == "AzureWebJobsStorage"
    with pytest.raises(queuectl.UsageError, match="no storage account"):
        queuectl.resolve_storage(args, {})


def _connection(port: int) -> str:
    key = base64.b64encode(b"k" * 32).decode()
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};"
            f"QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1")


def _unreachable(port: int, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, float, str, str]:
    out = io.StringIO()
    started = time.monotonic()
    code = queuectl.main(["--connection-string", _connection(port), "--timeout", "1", *extra,
                          "peek", "poison"], out=out)
    return code, time.monotonic() - started, capsys.readouterr().err, out.getvalue()


def test_a_closed_port_fails_in_seconds_naming_the_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    code, elapsed, err, _ = _unreachable(port, capsys)
    assert code == queuectl.EXIT_STORAGE
    assert elapsed < 8
    assert f"storage unreachable: no answer from http://127.0.0.1:{port}/devstoreaccount1" in err
    assert "within 1 s" in err


def test_a_silent_server_times_out_in_seconds_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        code, elapsed, _, out = _unreachable(silent.getsockname()[1], capsys, "--json")
    assert code == queuectl.EXIT_STORAGE
    assert elapsed < 10
    error = json.loads(out)["error"]
    assert error["code"] == "storage_unreachable" and "127.0.0.1" in error["message"]


def test_runs_as_a_script_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *STORAGE_ENV)}
    script = str(REPO / "tools" / "queuectl.py")
    done = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: queuectl" in done.stdout and "exit status:" in done.stdout
    for code in queuectl.EXIT_CODES:
        assert f"  {code}  " in done.stdout
    broken = tmp_path / "broken.json"
    broken.write_text("{")  # needs shared.contract: proves the checkout's packages are importable
    done = subprocess.run([sys.executable, script, "send", str(broken)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == queuectl.EXIT_USAGE and "not valid JSON" in done.stderr, done.stderr


def test_pyproject_installs_a_queuectl_command() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["queuectl"] == "tools.queuectl:main"
    assert "tools" in project["tool"]["setuptools"]["packages"]


def test_json_on_every_subcommand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    dead = storage.queue("dynamics-sync-deadletter")
    dead.add(queuectl.encode(dead_letter(JOB)))
    dead.add(queuectl.encode(dead_letter("{not json", reason="invalid_json")))
    code, out = run(storage, "replay", "deadletter", "--dry-run", "--json", monkeypatch=monkeypatch)
    document = json.loads(out)
    assert code == 1 and document["dryRun"] is True
    assert [e["jobId"] for e in document["replayed"]] == ["crm-1"]
    assert "not a JSON job" in document["left"][0]["problem"]
    code, out = run(storage, "--json", "replay", "deadletter", monkeypatch=monkeypatch)
    assert code == 1 and [e["jobId"] for e in json.loads(out)["replayed"]] == ["crm-1"]
    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB | {"id": "crm-9"}))
    code, out = run(storage, "send", str(job), "--json", monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out) == {"queue": "dynamics-sync", "sent": ["crm-9"], "problems": []}
    job.write_text(json.dumps(JOB | {"operation": "merge"}))
    code, out = run(storage, "send", str(job), "--json", monkeypatch=monkeypatch)
    assert code == 1 and json.loads(out)["sent"] == [] and json.loads(out)["problems"]
    code, out = run(storage, "send", str(tmp_path / "missing.json"), "--json", monkeypatch=monkeypatch)
    assert code == 2 and json.loads(out)["error"]["code"] == "usage"


def _fill(storage: FakeStorage, name: str, count: int) -> FakeQueue:
    queue = storage.queue(name)
    for index in range(count):
        queue.add(queuectl.encode(json.dumps(JOB | {"id": f"j{index}"})))
    return queue


def test_peek_says_why_messages_are_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    queue = _fill(storage, "dynamics-sync", 40)
    _, out = run(storage, "peek", "sync", "-n", "5", monkeypatch=monkeypatch)
    assert "35 more not shown because of the -n 5 limit" in out
    _, out = run(storage, "peek", "sync", "-n", "50", monkeypatch=monkeypatch)
    assert "-n 50 was capped at 32" in out and "8 more not shown: the Queue service peeks at most 32" in out
    for message in queue.messages[:38]:
        message.visible = False  # received by the host, being retried
    code, out = run(storage, "peek", "sync", "--json", monkeypatch=monkeypatch)
    document = json.loads(out)
    assert code == 0 and len(document["messages"]) == 2
    assert any("38 message(s) invisible right now" in note for note in document["notes"])


def test_peek_poison_says_where_the_reason_is(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    _fill(storage, "dynamics-sync-poison", 1)
    _, out = run(storage, "peek", "poison", monkeypatch=monkeypatch)
    assert "Application Insights: traces | where message has \"job=<jobId>\"" in out
    _, out = run(storage, "peek", "poison", "--json", monkeypatch=monkeypatch)
    assert json.loads(out)["messages"][0]["logQuery"] == 'traces | where message has "job=j0"'
    _, out = run(storage, "peek", "deadletter", monkeypatch=monkeypatch)
    assert "Application Insights" not in out


def test_long_lines_are_cut_between_words(monkeypatch: pytest.MonkeyPatch) -> None:
    assert queuectl.shorten("alpha beta gamma", 12) == "alpha beta…"
    assert queuectl.shorten("short", 12) == "short"
    assert queuectl.shorten("x" * 30, 10) == "x" * 9 + "…"
    storage = FakeStorage()
    detail = "the user jane@contoso.com is disabled in Dataverse " * 5
    storage.queue("dynamics-sync-deadletter").add(queuectl.encode(json.dumps(
        {"job": JOB, "reason": "actor_disabled", "detail": detail, "failedAt": "2024-05-01T06:00:00Z"})))
    _, out = run(storage, "peek", "deadletter", monkeypatch=monkeypatch)
    [line] = [text for text in out.splitlines() if "actor_disabled" in text and "[failed" in text]
    shown = line.split("actor_disabled: ")[1].split("…")[0]
    assert detail.startswith(shown) and detail[len(shown)] == " "  # ends on a whole word
    assert "[failed 2024-05-01T06:00:00Z]" in line


def test_dry_run_says_when_it_could_not_see_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    _fill(storage, "dynamics-sync-poison", 40)
    code, out = run(storage, "replay", "poison", "--dry-run", monkeypatch=monkeypatch)
    assert code == 0 and "would replay 32 message(s)" in out
    assert "about 40 message(s) but a dry run peeked only 32" in out
    storage = FakeStorage()
    _fill(storage, "dynamics-sync-poison", 3)
    _, out = run(storage, "replay", "poison", "--dry-run", monkeypatch=monkeypatch)
    assert "peeked only" not in out


def test_the_installed_layout_runs_from_any_directory(tmp_path: Path) -> None:
    """What `pip install .` puts on sys.path — exactly the packages pyproject lists — is enough for the
    `queuectl` entry point, run from a directory that is not the checkout.  (pip itself is not run: it
    would need the network for its build backend; pyproject's entry is checked above.)"""
    import shutil
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    site = tmp_path / "site-packages"
    for package in project["tool"]["setuptools"]["packages"]:
        shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    module, _, function = project["project"]["scripts"]["queuectl"].partition(":")
    # the wrapper pip writes into bin/queuectl
    launcher = f"import sys; from {module} import {function}; sys.exit({function}())"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *STORAGE_ENV)}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, "-c", launcher, "--help"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: queuectl" in done.stdout, done.stderr
    broken = elsewhere / "broken.json"
    broken.write_text("{")
    done = subprocess.run([sys.executable, "-c", launcher, "send", "broken.json"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == queuectl.EXIT_USAGE and "not valid JSON" in done.stderr, done.stderr
    probe = "import tools.queuectl, shared.jobs; print(tools.queuectl.__file__, shared.jobs.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == [str(site / "tools" / "queuectl.py"), str(site / "shared" / "jobs.py")]


def test_peek_deadletter_says_what_to_do_about_each_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.errors import fix_for

    storage = FakeStorage()
    dead = storage.queue("dynamics-sync-deadletter")
    for index in range(2):
        dead.add(queuectl.encode(dead_letter(JOB | {"id": f"c{index}"}, reason="invalid_column")))
    dead.add(queuectl.encode(dead_letter(JOB, reason="not_a_known_code")))
    _, out = run(storage, "peek", "deadletter", monkeypatch=monkeypatch)
    assert out.count("fix for invalid_column: ") == 1  # once per reason, not per message
    assert fix_for("invalid_column") in out
    assert "fix for not_a_known_code" not in out
    _, out = run(storage, "peek", "deadletter", "--json", monkeypatch=monkeypatch)
    messages = json.loads(out)["messages"]
    assert [m.get("fix") for m in messages] == [fix_for("invalid_column")] * 2 + [None]


def test_send_signs_for_the_given_source_and_refuses_a_job_of_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FakeStorage()
    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB | {"_auth": {"source": "x", "t": 1, "sig": "0" * 64}}))  # stale: replaced
    code, out = run(storage, "send", str(job), "--source", "crm", monkeypatch=monkeypatch)
    assert code == 0, out
    (sent,) = [json.loads(t) for t in storage.texts("dynamics-sync")]
    assert sent["_auth"]["source"] == "crm" and sent["source"] == "crm" and verify(sent, [UNIT_MESSAGE_KEY])
    job.write_text(json.dumps(JOB | {"source": "erp"}))
    code, out = run(storage, "send", str(job), "--source", "crm", monkeypatch=monkeypatch)
    assert code == 1 and "names source 'erp'" in out


def test_replay_keeps_the_signed_message_and_leaves_unsigned_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FakeStorage()
    dead = storage.queue("dynamics-sync-deadletter")
    signed = sign_job(JOB, UNIT_MESSAGE_KEY, source="crm")
    dead.add(queuectl.encode(json.dumps({"job": signed, "reason": "actor_not_found", "detail": "x",
                                         "failedAt": "2024-05-01T06:00:00Z"})))
    dead.add(queuectl.encode(dead_letter(JOB | {"id": "forged"}, "unauthenticated_message", signed=False)))
    code, out = run(storage, "replay", "deadletter", monkeypatch=monkeypatch)
    assert code == 1 and "not signed" in out
    assert [json.loads(t) for t in storage.texts("dynamics-sync")] == [signed]  # byte-for-byte the same job


def test_read_signing_key_needs_a_vault_or_the_devstack(monkeypatch: pytest.MonkeyPatch) -> None:
    args = queuectl.build_parser().parse_args(["send", "x.json"])
    with pytest.raises(queuectl.UsageError, match="--key-vault-url"):
        queuectl.read_signing_key(args, environ={})
