"""Operator CLI for the sync queues: look at dead-lettered and poison messages, replay them, send jobs.

    queuectl peek deadletter|poison|sync|QUEUE [-n N] [--json]
    queuectl replay deadletter|poison [--max N] [--id JOBID] [--dry-run] [--json]
    queuectl send FILE.json [--json]         (one job, or {"jobs": [...]}; "-" reads stdin)

``queuectl`` is installed by ``pip install .``; ``python path/to/tools/queuectl.py`` works from any
directory, and ``python -m tools.queuectl`` from the checkout's root.

Storage (the first that is set wins; flags always beat the environment): ``--connection-string``
(Azurite or a key-based account), ``--account-url https://<account>.queue.core.windows.net`` with
DefaultAzureCredential (the identity needs Storage Queue Data Contributor), ``--state`` (a devstack
state file); then the deployed app's settings ``AzureWebJobsStorage`` (a connection string),
``AzureWebJobsStorage__queueServiceUri`` or ``AzureWebJobsStorage__accountName`` (identity-based),
then ``AZURE_STORAGE_CONNECTION_STRING``, then ``DEVSTACK_STATE``.  Queue names derive from
``--queue`` / ``SYNC_QUEUE_NAME`` (default ``dynamics-sync``): ``<q>-deadletter`` and ``<q>-poison``.
Every storage call gives up after ``--timeout`` seconds (default 10) and one retry, so an unreachable
account fails in seconds instead of the SDK's default of minutes.

``send`` signs each job as the webhook does (``shared.messages``: ``sync_job`` refuses unsigned
messages) with the app's queue message key: read from Key Vault (``--key-vault-url`` or ``KEY_VAULT_URL``,
secret ``MESSAGE_SIGNING_SECRET_NAME``, DefaultAzureCredential: the operator needs Key Vault Secrets User)
or, on the devstack (``--state`` / ``DEVSTACK_STATE``), from the sandbox ``--sandbox`` (default
``default``).  ``--source`` names the sender the jobs are signed for (default: a job's own ``source``,
else ``queuectl``).  ``replay`` puts back the original signed message unchanged.

Messages are base64 on the wire, as the Functions host expects.  ``replay`` deletes a message only
after its copy is on the sync queue, so a crash in between duplicates a job (jobs are idempotent)
and never loses one.  Exit status: see ``EXIT_CODES``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (python tools/queuectl.py, from any directory): make `tools` and `shared`
    # importable from the checkout this file is in, not from wherever the shell happens to be.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import base64
import binascii
import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from azure.storage.queue import QueueClient, QueueMessage

DEFAULT_QUEUE = "dynamics-sync"
PEEK_LIMIT = 32  # the Queue service returns at most 32 messages per peek or get
REPLAY_VISIBILITY = 120  # seconds a message stays hidden while it is being replayed
DEFAULT_TIMEOUT = 10.0  # seconds per storage call (connect and read)
EXIT_OK, EXIT_LEFT, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_LEFT: "something was left in place, refused or not found (see the output)",
    EXIT_USAGE: "usage or configuration error (bad arguments, unreadable file, no storage account)",
    EXIT_STORAGE: "storage unreachable or refused the request (timeout, DNS, auth, ...)",
}


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


@dataclass(frozen=True)
class Target:
    """Where the queues are, and which flag or setting said so (for messages; never the secret)."""

    connection_string: str | None = None
    account_url: str | None = None
    source: str = ""


class Storage:
    """Raw-text queue clients (this tool does the base64 itself, so undecodable messages stay visible)."""

    def __init__(self, target: Target, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        from azure.storage.queue import LinearRetry, QueueServiceClient

        # The SDK's default is 3 retries 15 s apart on top of long socket timeouts: minutes of
        # silence when the account is unreachable.  An operator wants an answer in seconds.
        options: dict[str, Any] = {
            "connection_timeout": timeout, "read_timeout": timeout,
            "retry_policy": LinearRetry(backoff=1, retry_total=1, random_jitter_range=0),
        }
        self.timeout = timeout
        if target.connection_string:
            # The SDK itself expands UseDevelopmentStorage=true to Azurite's well-known account.
            self.service = QueueServiceClient.from_connection_string(target.connection_string, **options)
            self.where = self.service.url
        elif target.account_url:
            from azure.identity import DefaultAzureCredential

            self.service = QueueServiceClient(target.account_url, credential=DefaultAzureCredential(),
                                              **options)
            self.where = target.account_url
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


def _https_url(url: str, source: str) -> str:
    if not url.startswith("https://"):
        raise UsageError(f"{source} must be https://<account>.queue.core.windows.net, got {url}")
    return url.rstrip("/")


def resolve_storage(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Target:
    """Which account to use.  Flags first (what the operator typed beats whatever the shell or the
    app settings happen to export), then the deployed app's own settings, so the tool can run with
    the same configuration as the Function App, then the generic SDK variable, then the devstack."""
    env = os.environ if environ is None else environ
    if args.connection_string and args.account_url:
        raise UsageError("give --connection-string or --account-url, not both")
    if args.connection_string:
        return Target(connection_string=args.connection_string, source="--connection-string")
    if args.account_url:
        return Target(account_url=_https_url(args.account_url, "--account-url"), source="--account-url")
    if args.state:
        return Target(connection_string=_state_connection(args.state), source="--state")
    if env.get("AzureWebJobsStorage"):
        return Target(connection_string=env["AzureWebJobsStorage"], source="AzureWebJobsStorage")
    uri = env.get("AzureWebJobsStorage__queueServiceUri")
    if uri:
        source = "AzureWebJobsStorage__queueServiceUri"
        return Target(account_url=_https_url(uri, source), source=source)
    account = env.get("AzureWebJobsStorage__accountName")
    if account:
        return Target(account_url=f"https://{account}.queue.core.windows.net",
                      source="AzureWebJobsStorage__accountName")
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return Target(connection_string=env["AZURE_STORAGE_CONNECTION_STRING"],
                      source="AZURE_STORAGE_CONNECTION_STRING")
    state = _state_connection(env.get("DEVSTACK_STATE"))
    if state:
        return Target(connection_string=state, source="DEVSTACK_STATE")
    raise UsageError(
        "no storage account: pass --connection-string, --account-url or --state, set AzureWebJobsStorage "
        "(or AzureWebJobsStorage__queueServiceUri / __accountName, or AZURE_STORAGE_CONNECTION_STRING), "
        "or run inside `python -m devstack exec --` (DEVSTACK_STATE)"
    )


def open_storage(args: argparse.Namespace) -> Storage:
    return Storage(resolve_storage(args), timeout=args.timeout)


# --------------------------------------------------------------------------- message views


def describe(queue_kind: str, body: str) -> dict[str, Any]:
    """What an operator needs to see about one message body."""
    from shared.contract import loads

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


def shorten(text: str, width: int) -> str:
    """At most ``width`` characters, cut at a word boundary (a half word reads as a different word)."""
    text = " ".join(text.splitlines())  # one line per message; spacing inside a line is kept
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width)
    if cut < width // 2:  # one long token (an id, a URL): cutting inside it is the lesser evil
        cut = width - 1
    return text[:cut].rstrip() + "…"


def _line(view: dict[str, Any], width: int = 100) -> str:
    if "reason" in view:
        text = f"{view.get('jobId') or '(no id)'}  {view['reason']}: {view.get('detail') or ''}"
        return f"{shorten(text, width + 10)}  [failed {view.get('failedAt')}]"
    if view.get("job") is not None:
        summary = json.dumps(view["job"], ensure_ascii=False)
        return f"{view.get('jobId') or '(no id)'}  {shorten(summary, width)}"
    return f"(not JSON)  {shorten(repr(view['text']), width)}"


class Report:
    """Human lines as the work happens, or one JSON document at the end (``--json``)."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out, self.as_json = out, as_json

    def say(self, text: str) -> None:
        if not self.as_json:
            print(text, file=self.out)

    def result(self, document: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(document, indent=2, ensure_ascii=False, default=str), file=self.out)


def peek_notes(*, name: str, kind: str, total: int | None, shown: int, asked: int) -> list[str]:
    """Why the operator sees fewer messages than the queue holds: each cause needs a different fix
    (a bigger -n, waiting for retries to finish, or replaying/draining past the service's limit)."""
    notes: list[str] = []
    limit = min(asked, PEEK_LIMIT)
    if asked > PEEK_LIMIT:
        notes.append(f"-n {asked} was capped at {PEEK_LIMIT}: the Queue service peeks at most {PEEK_LIMIT} "
                     "messages")
    hidden = (total or 0) - shown
    if hidden > 0 and shown >= limit:
        if limit < PEEK_LIMIT:
            notes.append(f"{hidden} more not shown because of the -n {asked} limit (at most {PEEK_LIMIT})")
        else:
            notes.append(f"{hidden} more not shown: the Queue service peeks at most {PEEK_LIMIT} messages")
    elif hidden > 0:
        notes.append(f"{hidden} message(s) invisible right now: being processed or waiting for a retry; "
                     "they show up again when their visibility timeout ends (the count is approximate)")
    if kind == "poison" and shown:
        notes.append("the failure reason is not in a poison message: the host logged it with each attempt. "
                     "In Application Insights: traces | where message has \"job=<jobId>\" (this app's job "
                     "log lines), or exceptions | where operation_Name == \"sync_job\" around insertedOn; "
                     "locally, in the host's console log")
    return notes


def cmd_peek(storage: Storage, queues: Queues, args: argparse.Namespace, out: TextIO) -> int:
    from azure.core.exceptions import ResourceNotFoundError

    from shared.errors import FIXES, fix_for

    report = Report(out, args.json)
    name = queues.named(args.queue)
    kind = args.queue if args.queue in ("deadletter", "poison", "sync") else "other"
    client = storage.queue(name)
    try:
        total = client.get_queue_properties().approximate_message_count
        messages = list(client.peek_messages(max_messages=min(args.n, PEEK_LIMIT)))
    except ResourceNotFoundError:
        report.say(f"queue {name} does not exist (nothing has been sent to it yet)")
        report.result({"queue": name, "exists": False, "approximateCount": 0, "messages": [], "notes": []})
        return EXIT_OK
    views = []
    for message in messages:
        body, was_base64 = decode(str(message.content or ""))
        view = describe(kind, body) | {
            "messageId": message.id, "dequeueCount": message.dequeue_count,
            "insertedOn": message.inserted_on.isoformat() if message.inserted_on else None,
            "base64": was_base64,
        }
        if kind == "poison" and view.get("jobId"):
            view["logQuery"] = f'traces | where message has "job={view["jobId"]}"'
        if isinstance(view.get("reason"), str) and view["reason"] in FIXES:
            view["fix"] = fix_for(view["reason"])  # the text /api/diagnostics gives for the same code
        views.append(view)
    notes = peek_notes(name=name, kind=kind, total=total, shown=len(views), asked=args.n)
    report.result({"queue": name, "exists": True, "approximateCount": total, "messages": views,
                   "notes": notes})
    report.say(f"{name}: about {total} message(s); showing {len(views)}")
    for view in views:
        note = "" if view["base64"] else "  (not base64: the host sends this to -poison untouched)"
        report.say(f"  {view['messageId']}  x{view['dequeueCount']}  {_line(view)}{note}")
    fixes = {view["reason"]: view["fix"] for view in views if "fix" in view}
    for reason, text in sorted(fixes.items()):
        report.say(f"  fix for {reason}: {text}")
    for text in notes:
        report.say(f"  note: {text}")
    return EXIT_OK


@dataclass
class ReplayItem:
    message: QueueMessage
    body: str  # what goes back onto the sync queue
    job_id: str | None
    problem: str | None = None


def _replay_item(kind: str, message: QueueMessage) -> ReplayItem:
    from shared.contract import dumps, loads, parse_job
    from shared.errors import InvalidJob
    from shared.messages import AUTH_FIELD, strip

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
    job_id = job.get("id") if isinstance(job.get("id"), str) else None
    if AUTH_FIELD not in job:
        return ReplayItem(message, body, job_id,
                          "the message is not signed: check its origin, then use `send`")
    try:
        parse_job(strip(job))
    except InvalidJob as exc:
        fields = ", ".join(d.get("field", "") for d in exc.details) or exc.message
        return ReplayItem(message, body, job_id,
                          f"the job is still invalid ({fields}): fix it and use `send`")
    return ReplayItem(message, dumps(job), str(job["id"]))  # with its _auth: it verifies as before


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


@dataclass
class ReplayResult:
    replayed: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cmd_replay(storage: Storage, queues: Queues, args: argparse.Namespace, out: TextIO) -> int:
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    report = Report(out, args.json)
    source = queues.named(args.queue)
    client = storage.queue(source)
    result = ReplayResult()
    held: list[QueueMessage] = []  # received but not replayed: made visible again at the end
    peeked = 0
    try:
        # A dry run peeks (at most 32 messages, the service's limit) so it changes nothing, not even
        # the dequeue count; a real replay receives, which hides each message while it is copied.
        if args.dry_run:
            total = client.get_queue_properties().approximate_message_count
            messages: Iterator[QueueMessage] = iter(client.peek_messages(max_messages=PEEK_LIMIT))
        else:
            messages = _receive(client, PEEK_LIMIT)
        for message in messages:
            peeked += 1
            if args.max is not None and len(result.replayed) >= args.max:
                if not args.dry_run:
                    held.append(message)
                break
            item = _replay_item(args.queue, message)
            if args.id and item.job_id != args.id:
                if not args.dry_run:
                    held.append(message)
                continue
            entry = {"messageId": message.id, "jobId": item.job_id}
            if item.problem:
                report.say(f"  left    {message.id}  {item.job_id or '(no id)'}: {item.problem}")
                result.left.append(entry | {"problem": item.problem})
                if not args.dry_run:
                    held.append(message)
                continue
            if args.dry_run:
                report.say(f"  would replay {message.id}  {item.job_id or '(no id)'} -> {queues.sync}")
                result.replayed.append(entry)
                continue
            held.append(message)  # until its copy is on the sync queue
            storage.send(queues.sync, item.body)
            held.pop()
            try:
                client.delete_message(message.id, message.pop_receipt)
            except HttpResponseError as exc:
                warning = (f"{message.id}: sent to {queues.sync} but not deleted from {source} ({exc}); it "
                           "will show up here again: replaying it twice writes the same job twice")
                report.say(f"  WARNING {warning}")
                result.warnings.append(warning)
            report.say(f"  replayed {message.id}  {item.job_id or '(no id)'} -> {queues.sync}")
            result.replayed.append(entry)
    except ResourceNotFoundError:
        report.say(f"queue {source} does not exist: nothing to replay")
        report.result({"queue": source, "target": queues.sync, "dryRun": args.dry_run, "exists": False,
                       "replayed": [], "left": [], "warnings": [], "notes": []})
        return EXIT_OK
    finally:
        for message in held:
            # On failure it becomes visible again by itself when its hidden time runs out.
            with contextlib.suppress(HttpResponseError):
                client.update_message(message.id, message.pop_receipt, visibility_timeout=0)
    if args.dry_run and total and total > peeked and (args.max is None or len(result.replayed) < args.max):
        result.notes.append(
            f"the queue holds about {total} message(s) but a dry run peeked only {peeked}: it sees at most "
            f"{PEEK_LIMIT} (the service's peek limit) and none that are invisible right now; "
            "a real replay goes on until the queue is empty")
    verb = "would replay" if args.dry_run else "replayed"
    report.say(f"{verb} {len(result.replayed)} message(s) from {source} to {queues.sync}; "
               f"{len(result.left)} left in place")
    for note in result.notes:
        report.say(f"  note: {note}")
    missing = bool(args.id) and not result.replayed
    if missing:
        report.say(f"no message with job id {args.id} in {source}")
    report.result({"queue": source, "target": queues.sync, "dryRun": args.dry_run, "exists": True,
                   "replayed": result.replayed, "left": result.left, "warnings": result.warnings,
                   "notes": result.notes})
    return EXIT_LEFT if missing or result.left else EXIT_OK


def load_jobs(path: str, stdin: TextIO | None = None) -> list[Any]:
    """The jobs in a file or on stdin.  Called once per run: stdin can only be read once."""
    from shared.contract import loads

    try:
        text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
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


DEFAULT_SOURCE = "queuectl"
MESSAGE_SECRET_DEFAULT = "queue-message-signing-key"  # noqa: S105 (a Key Vault secret's name)


def read_signing_key(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """The app's queue message key: from Key Vault, or from the devstack sandbox with ``--state``."""
    env = os.environ if environ is None else environ
    name = env.get("MESSAGE_SIGNING_SECRET_NAME") or MESSAGE_SECRET_DEFAULT
    vault = getattr(args, "key_vault_url", None) or env.get("KEY_VAULT_URL")
    state = args.state or (None if vault else env.get("DEVSTACK_STATE"))
    if state and not getattr(args, "key_vault_url", None):
        from devstack.control import Stack  # the local stack only: never in a deployed package

        return Stack.from_state(state).sandbox(getattr(args, "sandbox", None) or "default").secret(name)
    if vault:
        from shared.errors import SyncError
        from shared.secrets import SecretStore

        store = SecretStore(vault)
        try:
            return store.get(name)
        except SyncError as exc:
            raise UsageError(
                f"cannot read the message signing key {name} from {vault}: {exc.message}"
            ) from None
        finally:
            store.close()
    raise UsageError("send signs every job with the app's message key: pass --key-vault-url (or set "
                     "KEY_VAULT_URL), or --state on the devstack")


def cmd_send(storage: Storage, queues: Queues, args: argparse.Namespace, out: TextIO) -> int:
    from shared.contract import MAX_JOB_BYTES, dumps, parse_job, text_size
    from shared.errors import InvalidJob
    from shared.messages import sign, strip

    report = Report(out, args.json)
    jobs: list[Any] = args.jobs if getattr(args, "jobs", None) is not None else load_jobs(args.file)
    batch = len(jobs) > 1 or args.file == "-"
    problems: list[str] = []
    texts: list[tuple[str, str]] = []
    for index, job in enumerate(jobs):
        where = f"jobs[{index}]" if batch else ""
        if isinstance(job, dict):
            job = strip(job)  # a stale _auth is replaced, never trusted
        try:
            parsed = parse_job(job, where=where)
            source = args.source or parsed.source or DEFAULT_SOURCE
            text = dumps(sign(job, source, args.signing_key))
        except InvalidJob as exc:
            problems.extend(f"{d.get('field')}: {d.get('message')}" for d in exc.details)
            continue
        except ValueError as exc:  # a job naming another source than --source
            problems.append(f"{where or 'job'}: {exc}")
            continue
        if text_size(text) > MAX_JOB_BYTES:
            size = text_size(text)
            problems.append(f"{where or 'job'}: {size} bytes, more than {MAX_JOB_BYTES} (queue limit)")
            continue
        texts.append((parsed.id, text))
    if problems:
        report.say(f"nothing sent: {len(problems)} problem(s) in {args.file}")
        for problem in problems:
            report.say(f"  {problem}")
        report.result({"queue": queues.sync, "sent": [], "problems": problems})
        return EXIT_LEFT
    sent: list[str] = []
    for job_id, text in texts:
        storage.send(queues.sync, text)
        sent.append(job_id)
        report.say(f"  sent {job_id} -> {queues.sync}")
    report.say(f"sent {len(texts)} job(s) to {queues.sync}")
    report.result({"queue": queues.sync, "sent": sent, "problems": []})
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="queuectl", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Peek, replay and send sync jobs on the Functions queues.",
        epilog=f"exit status:\n{codes}\n\nWith --json, errors are a JSON object "
               '{"error": {"code", "message"}} on stdout as well.')
    parser.add_argument("--connection-string",
                        help="storage connection string (or UseDevelopmentStorage=true)")
    parser.add_argument("--account-url",
                        help="https://<account>.queue.core.windows.net (DefaultAzureCredential)")
    parser.add_argument("--state", help="devstack state file (default $DEVSTACK_STATE): use its Azurite")
    parser.add_argument("--queue", dest="sync_queue", help="sync queue name (default $SYNC_QUEUE_NAME or "
                        f"{DEFAULT_QUEUE})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per storage call before giving up (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `queuectl --json peek x` and `queuectl peek x --json` both work.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (one JSON document on stdout)")
    commands = parser.add_subparsers(dest="command", required=True)
    peek = commands.add_parser("peek", parents=[common], help="show messages without taking them")
    peek.add_argument("queue", help="deadletter, poison, sync, or a queue name")
    peek.add_argument("-n", type=int, default=10, help=f"how many (at most {PEEK_LIMIT})")
    replay = commands.add_parser("replay", parents=[common], help="move messages back onto the sync queue")
    replay.add_argument("queue", choices=["deadletter", "poison"])
    replay.add_argument("--max", type=int, default=None, help="replay at most N messages")
    replay.add_argument("--id", help="replay only the job with this id")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed, change nothing")
    send = commands.add_parser("send", parents=[common], help="validate and enqueue jobs from a JSON file")
    send.add_argument("file", help='one job, or {"jobs": [...]}; "-" for stdin')
    send.add_argument("--source", help="the sender the jobs are signed for (default: each job's "
                      f"own source, else {DEFAULT_SOURCE})")
    send.add_argument("--key-vault-url",
                      help="vault with the app's message signing key (default $KEY_VAULT_URL)")
    send.add_argument("--sandbox", default="default", help="devstack sandbox whose key signs (with --state)")
    return parser


def _fail(args: argparse.Namespace, out: TextIO, code: int, kind: str, message: str) -> int:
    print(message, file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": kind, "message": message}, "exit": code}), file=out)
    return code


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from azure.core.exceptions import AzureError, ServiceRequestError, ServiceResponseError

    stream = out or sys.stdout
    args = build_parser().parse_args(argv)
    queues = Queues(args.sync_queue or os.environ.get("SYNC_QUEUE_NAME") or DEFAULT_QUEUE)
    if getattr(args, "n", 1) < 1 or (getattr(args, "max", None) is not None and args.max < 1):
        return _fail(args, stream, EXIT_USAGE, "usage", "error: -n and --max must be at least 1")
    if args.timeout <= 0:
        return _fail(args, stream, EXIT_USAGE, "usage", "error: --timeout must be more than 0 seconds")
    storage: Storage | None = None
    try:
        if args.command == "send":
            args.jobs = load_jobs(args.file)  # a bad file is reported before any storage is touched
            args.signing_key = read_signing_key(args)
        storage = open_storage(args)
        command = {"peek": cmd_peek, "replay": cmd_replay, "send": cmd_send}[args.command]
        return command(storage, queues, args, stream)
    except UsageError as exc:
        return _fail(args, stream, EXIT_USAGE, "usage", f"error: {exc}")
    except (ServiceRequestError, ServiceResponseError) as exc:
        where = getattr(storage, "where", "the storage account")
        seconds = getattr(storage, "timeout", args.timeout)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(args, stream, EXIT_STORAGE, "storage_unreachable",
                     f"storage unreachable: no answer from {where} within {seconds:g} s "
                     f"(after one retry): {first}")
    except AzureError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = getattr(storage, "where", "the storage account")
        return _fail(args, stream, EXIT_STORAGE, "storage_error", f"storage error from {where}: {first}")


if __name__ == "__main__":
    sys.exit(main())
