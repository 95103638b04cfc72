"""Operator CLI for the sync queues: look at dead-lettered and poison messages, replay them, send jobs.

    python -m tools.queuectl peek deadletter|poison|sync|QUEUE [-n N] [--json]
    python -m tools.queuectl replay deadletter|poison [--max N] [--id JOBID] [--dry-run]
    python -m tools.queuectl send FILE.json            (one job, or {"jobs": [...]}; "-" reads stdin)

Storage: ``--connection-string`` (Azurite or a key-based account), ``--account-url
https://<account>.queue.core.windows.net`` with DefaultAzureCredential (a real account; the identity
needs Storage Queue Data Contributor), else ``AzureWebJobsStorage``, else the devstack state file
(``--state`` or ``DEVSTACK_STATE``).  Queue names derive from ``--queue`` / ``SYNC_QUEUE_NAME``
(default ``dynamics-sync``): ``<q>-deadletter`` and ``<q>-poison``.

Messages are base64 on the wire, as the Functions host expects.  ``replay`` deletes a message only
after its copy is on the sync queue, so a crash in between duplicates a job (jobs are idempotent)
and never loses one.  Exit status: 0 done, 1 something was left or refused, 2 usage or
configuration error, 3 storage error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from azure.storage.queue import QueueClient, QueueMessage

DEFAULT_QUEUE = "dynamics-sync"
PEEK_LIMIT = 32  # the Queue service returns at most 32 messages per peek or get
REPLAY_VISIBILITY = 120  # seconds a message stays hidden while it is being replayed
EXIT_OK, EXIT_LEFT, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3


class UsageError(Exception):
    """Bad arguments or configuration (exit 2)."""


def encode(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode(wire: str) -> tuple[str, bool]:
    """(body text, was_base64).  Text that is not base64 is returned as it is."""
    try:
        return base64.b64decode(wire.encode("ascii"), validate=True).decode("utf-8"), True
    except (binascii.Error, UnicodeError, ValueError):
        return wire, False


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class Queues:
    sync: str

    @property
    def deadletter(self) -> str:
        return f"{self.sync}-deadletter"

    @property
    def poison(self) -> str:
        return f"{self.sync}-poison"

    def named(self, which: str) -> str:
        return {"sync": self.sync, "deadletter": self.deadletter, "poison": self.poison}.get(which, which)


class Storage:
    """Raw-text queue clients (this tool does the base64 itself, so undecodable messages stay visible)."""

    def __init__(self, *, connection_string: str | None = None, account_url: str | None = None) -> None:
        from azure.storage.queue import QueueServiceClient

        if connection_string:
            # The SDK itself expands UseDevelopmentStorage=true to Azurite's well-known account.
            self.service = QueueServiceClient.from_connection_string(connection_string)
            self.where = self.service.url
        elif account_url:
            from azure.identity import DefaultAzureCredential

            self.service = QueueServiceClient(account_url, credential=DefaultAzureCredential())
            self.where = account_url
        else:
            raise UsageError("no storage account given")

    def queue(self, name: str) -> QueueClient:
        return self.service.get_queue_client(name, message_encode_policy=None, message_decode_policy=None)

    def send(self, name: str, body: str) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        client = self.queue(name)
        try:
            client.send_message(encode(body))
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
            client.send_message(encode(body))


def _state_connection(path: str | None) -> str | None:
    if not path:
        return None
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        value = state["azurite"]["connection_string"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read Azurite's connection from the devstack state {path}: {exc}") from None
    return str(value)


def open_storage(args: argparse.Namespace) -> Storage:
    if args.connection_string and args.account_url:
        raise UsageError("give --connection-string or --account-url, not both")
    if args.connection_string:
        return Storage(connection_string=args.connection_string)
    if args.account_url:
        if not args.account_url.startswith("https://"):
            raise UsageError(
                f"--account-url must be https://<account>.queue.core.windows.net, got {args.account_url}"
            )
        return Storage(account_url=args.account_url)
    environment = os.environ.get("AzureWebJobsStorage")  # noqa: SIM112 - the Functions setting's name
    if environment:
        return Storage(connection_string=environment)
    state = _state_connection(args.state or os.environ.get("DEVSTACK_STATE"))
    if state:
        return Storage(connection_string=state)
    raise UsageError(
        "no storage account: pass --connection-string or --account-url, set AzureWebJobsStorage, "
        "or run inside `python -m devstack exec --` (DEVSTACK_STATE)"
    )


# --------------------------------------------------------------------------- message views


def describe(queue_kind: str, body: str) -> dict[str, Any]:
    """What an operator needs to see about one message body."""
    from shared.jobs import loads

    try:
        obj = loads(body)
    except ValueError:
        return {"jobId": None, "text": body}
    if queue_kind == "deadletter" and isinstance(obj, dict) and "reason" in obj:
        job = obj.get("job")
        return {
            "jobId": job.get("id") if isinstance(job, dict) else None,
            "reason": obj.get("reason"),
            "detail": obj.get("detail"),
            "failedAt": obj.get("failedAt"),
            "job": job,
        }
    return {"jobId": obj.get("id") if isinstance(obj, dict) else None, "job": obj}


def _line(view: dict[str, Any], width: int = 100) -> str:
    if "reason" in view:
        text = f"{view.get('jobId') or '(no id)'}  {view['reason']}: {view.get('detail') or ''}"
        return f"{text}  [failed {view.get('failedAt')}]"[: width + 40]
    if view.get("job") is not None:
        job = view["job"]
        summary = json.dumps(job, ensure_ascii=False)
        return f"{view.get('jobId') or '(no id)'}  {summary[:width]}"
    return f"(not JSON)  {view['text'][:width]!r}"


# --------------------------------------------------------------------------- commands


def cmd_peek(storage: Storage, queues: Queues, args: argparse.Namespace, out: TextIO) -> int:
    from azure.core.exceptions import ResourceNotFoundError

    name = queues.named(args.queue)
    kind = args.queue if args.queue in ("deadletter", "poison", "sync") else "other"
    client = storage.queue(name)
    try:
        total = client.get_queue_properties().approximate_message_count
        messages = list(client.peek_messages(max_messages=min(args.n, PEEK_LIMIT)))
    except ResourceNotFoundError:
        print(f"queue {name} does not exist (nothing has been sent to it yet)", file=out)
        return EXIT_OK
    views = []
    for message in messages:
        body, was_base64 = decode(str(message.content or ""))
        view = describe(kind, body) | {
            "messageId": message.id, "dequeueCount": message.dequeue_count,
            "insertedOn": message.inserted_on.isoformat() if message.inserted_on else None,
            "base64": was_base64,
        }
        views.append(view)
    if args.json:
        print(json.dumps({"queue": name, "approximateCount": total, "messages": views}, indent=2,
                         ensure_ascii=False, default=str), file=out)
        return EXIT_OK
    print(f"{name}: about {total} message(s); showing {len(views)}", file=out)
    for view in views:
        note = "" if view["base64"] else "  (not base64: the host sends this to -poison untouched)"
        print(f"  {view['messageId']}  x{view['dequeueCount']}  {_line(view)}{note}", file=out)
    if total and total > len(views):
        print(f"  ... {total - len(views)} more (a peek shows at most {PEEK_LIMIT})", file=out)
    return EXIT_OK


@dataclass
class ReplayItem:
    message: QueueMessage
    body: str  # what goes back onto the sync queue
    job_id: str | None
    problem: str | None = None


def _replay_item(kind: str, message: QueueMessage) -> ReplayItem:
    from shared.errors import InvalidJob
    from shared.jobs import dumps, loads, parse_job

    body, _ = decode(str(message.content or ""))
    if kind == "poison":
        view = describe("poison", body)
        return ReplayItem(message, body, view.get("jobId"))
    try:
        record = loads(body)
    except ValueError:
        return ReplayItem(message, body, None, "not a dead-letter record (not JSON)")
    job = record.get("job") if isinstance(record, dict) else None
    if not isinstance(job, dict):
        return ReplayItem(message, body, None,
                          "the dead-lettered message was not a JSON job: fix it and use `send`")
    try:
        parse_job(job)
    except InvalidJob as exc:
        fields = ", ".join(d.get("field", "") for d in exc.details) or exc.message
        return ReplayItem(message, body, job.get("id") if isinstance(job.get("id"), str) else None,
                          f"the job is still invalid ({fields}): fix it and use `send`")
    return ReplayItem(message, dumps(job), str(job["id"]))


def _receive(client: QueueClient, wanted: int) -> Iterator[QueueMessage]:
    seen: set[str] = set()
    while True:
        batch = list(client.receive_messages(
            messages_per_page=PEEK_LIMIT, max_messages=min(wanted, PEEK_LIMIT),
            visibility_timeout=REPLAY_VISIBILITY,
        ))
        fresh = [m for m in batch if m.id not in seen]
        if not fresh:
            return
        for message in fresh:
            seen.add(message.id)
            yield message


def cmd_replay(storage: Storage, queues: Queues, args: argparse.Namespace, out: TextIO) -> int:
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    source = queues.named(args.queue)
    client = storage.queue(source)
    replayed = left = 0
    held: list[QueueMessage] = []  # received but not replayed: made visible again at the end
    # A dry run peeks (at most 32 messages, the service's limit) so it changes nothing, not even
    # the dequeue count; a real replay receives, which hides each message while it is copied.
    messages = client.peek_messages(max_messages=PEEK_LIMIT) if args.dry_run else _receive(client, PEEK_LIMIT)
    try:
        for message in messages:
            if args.max is not None and replayed >= args.max:
                if not args.dry_run:
                    held.append(message)
                break
            item = _replay_item(args.queue, message)
            if args.id and item.job_id != args.id:
                if not args.dry_run:
                    held.append(message)
                continue
            if item.problem:
                print(f"  left    {message.id}  {item.job_id or '(no id)'}: {item.problem}", file=out)
                if not args.dry_run:
                    held.append(message)
                left += 1
                continue
            if args.dry_run:
                print(f"  would replay {message.id}  {item.job_id or '(no id)'} -> {queues.sync}", file=out)
                replayed += 1
                continue
            held.append(message)  # until its copy is on the sync queue
            storage.send(queues.sync, item.body)
            held.pop()
            try:
                client.delete_message(message.id, message.pop_receipt)
            except HttpResponseError as exc:
                print(f"  WARNING {message.id}: sent to {queues.sync} but not deleted from {source} ({exc}); "
                      "it will show up here again: replaying it twice writes the same job twice", file=out)
            print(f"  replayed {message.id}  {item.job_id or '(no id)'} -> {queues.sync}", file=out)
            replayed += 1
    except ResourceNotFoundError:
        print(f"queue {source} does not exist: nothing to replay", file=out)
        return EXIT_OK
    finally:
        for message in held:
            # On failure it becomes visible again by itself when its hidden time runs out.
            with contextlib.suppress(HttpResponseError):
                client.update_message(message.id, message.pop_receipt, visibility_timeout=0)
    verb = "would replay" if args.dry_run else "replayed"
    print(f"{verb} {replayed} message(s) from {source} to {queues.sync}; {left} left in place", file=out)
    if args.id and replayed == 0:
        print(f"no message with job id {args.id} in {source}", file=out)
        return EXIT_LEFT
    return EXIT_LEFT if left else EXIT_OK


def load_jobs(path: str) -> list[Any]:
    from shared.jobs import loads

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        document = loads(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(document, dict) and set(document) == {"jobs"}:
        jobs = document["jobs"]
        if not isinstance(jobs, list) or not jobs:
            raise UsageError(f"{path}: \"jobs\" must be a non-empty list")
        return jobs
    return [document]


def cmd_send(storage: Storage, queues: Queues, args: argparse.Namespace, out: TextIO) -> int:
    from shared.errors import InvalidJob
    from shared.jobs import MAX_JOB_BYTES, dumps, parse_job, text_size

    jobs = load_jobs(args.file)
    batch = len(jobs) > 1 or args.file == "-"
    problems: list[str] = []
    texts: list[tuple[str, str]] = []
    for index, job in enumerate(jobs):
        where = f"jobs[{index}]" if batch else ""
        try:
            parsed = parse_job(job, where=where)
        except InvalidJob as exc:
            problems.extend(f"{d.get('field')}: {d.get('message')}" for d in exc.details)
            continue
        text = dumps(job)
        if text_size(text) > MAX_JOB_BYTES:
            size = text_size(text)
            problems.append(f"{where or 'job'}: {size} bytes, more than {MAX_JOB_BYTES} (queue limit)")
            continue
        texts.append((parsed.id, text))
    if problems:
        print(f"nothing sent: {len(problems)} problem(s) in {args.file}", file=out)
        for problem in problems:
            print(f"  {problem}", file=out)
        return EXIT_LEFT
    for job_id, text in texts:
        storage.send(queues.sync, text)
        print(f"  sent {job_id} -> {queues.sync}", file=out)
    print(f"sent {len(texts)} job(s) to {queues.sync}", file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.queuectl",
                                     description="Peek, replay and send sync jobs on the Functions queues.")
    parser.add_argument("--connection-string",
                        help="storage connection string (or UseDevelopmentStorage=true)")
    parser.add_argument("--account-url",
                        help="https://<account>.queue.core.windows.net (DefaultAzureCredential)")
    parser.add_argument("--state", help="devstack state file (default $DEVSTACK_STATE): use its Azurite")
    parser.add_argument("--queue", dest="sync_queue", help="sync queue name (default $SYNC_QUEUE_NAME or "
                        f"{DEFAULT_QUEUE})")
    commands = parser.add_subparsers(dest="command", required=True)
    peek = commands.add_parser("peek", help="show messages without taking them")
    peek.add_argument("queue", help="deadletter, poison, sync, or a queue name")
    peek.add_argument("-n", type=int, default=10, help=f"how many (at most {PEEK_LIMIT})")
    peek.add_argument("--json", action="store_true", help="machine-readable output")
    replay = commands.add_parser("replay", help="move messages back onto the sync queue")
    replay.add_argument("queue", choices=["deadletter", "poison"])
    replay.add_argument("--max", type=int, default=None, help="replay at most N messages")
    replay.add_argument("--id", help="replay only the job with this id")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed, change nothing")
    send = commands.add_parser("send", help="validate and enqueue jobs from a JSON file")
    send.add_argument("file", help='one job, or {"jobs": [...]}; "-" for stdin')
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from azure.core.exceptions import AzureError

    stream = out or sys.stdout
    args = build_parser().parse_args(argv)
    queues = Queues(args.sync_queue or os.environ.get("SYNC_QUEUE_NAME") or DEFAULT_QUEUE)
    if getattr(args, "n", 1) < 1 or (getattr(args, "max", None) is not None and args.max < 1):
        print("error: -n and --max must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "send":
            load_jobs(args.file)  # a bad file is reported before any storage is touched
        storage = open_storage(args)
        command = {"peek": cmd_peek, "replay": cmd_replay, "send": cmd_send}[args.command]
        return command(storage, queues, args, stream)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AzureError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"storage error: {first}", file=sys.stderr)
        return EXIT_STORAGE


if __name__ == "__main__":
    sys.exit(main())
