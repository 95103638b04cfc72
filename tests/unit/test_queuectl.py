"""queuectl without a storage account: an in-memory queue service stands in for Azure/Azurite."""

from __future__ import annotations

import base64
import io
import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

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
    monkeypatch.delenv("SYNC_QUEUE_NAME", raising=False)
    out = io.StringIO()
    code = queuectl.main(list(argv), out=out)
    return code, out.getvalue()


def dead_letter(job: object, reason: str = "actor_not_found") -> str:
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
    assert [json.loads(t) for t in storage.texts("dynamics-sync")] == [JOB]
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
    assert (message["jobId"], message["reason"], message["job"]) == ("crm-1", "actor_not_found", JOB)
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
    assert [json.loads(t) for t in storage.texts("dynamics-sync")] == [JOB]


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
    for name in ("AzureWebJobsStorage", "DEVSTACK_STATE"):
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
