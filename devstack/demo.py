"""``make run``: the whole product on one machine, end to end, with a summary a person can check.

It starts the local Azure stack (``python -m devstack up``: emulators + Azurite) and the local
Functions host (``python -m devstack.host``) as child processes, sends signed webhook batches on
behalf of several Dynamics users (some of them meant to fail), waits until every job is written or
dead-lettered, runs the reconciliation timer on demand, and prints what Dataverse recorded — on
whose behalf — next to the emulators' request counters.  The exit status says whether every job is
accounted for with the expected outcome, so the same command is an end-to-end check.

Usage: ``python -m devstack.demo [--jobs N] [--serve] [--ports fixed|auto] [--json FILE]``.
Fixed ports (the default) are the ones the README's curl examples use; ``auto`` is for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, TextIO
from urllib.parse import quote, urlsplit

import requests

from devstack import azurite
from devstack.control import SandboxClient, Stack
from devstack.host import DEFAULT_FUNCTION_KEY, DEFAULT_MASTER_KEY
from devstack.processes import spawn
from devstack.sandboxes import CLIENT_SECRET_NAME, CREDENTIAL_MODES, WEBHOOK_SECRET_NAME

if TYPE_CHECKING:
    from azure.storage.queue import QueueServiceClient

ROOT = Path(__file__).resolve().parent.parent
HOST_PORT = 7071
STACK_PORTS = {"managed identity": 7072, "Entra ID": 7073, "Key Vault": 7074, "Dataverse": 7075,
               "control API": 7076}
AZURITE_PORTS = dict(zip(("Azurite blob", "Azurite queue", "Azurite table"), azurite.FIXED_PORTS,
                         strict=True))
SOURCE = "demo"
SYNC_QUEUE = "dynamics-sync"
RECONCILE_SCHEDULE = "0 0 */6 * * *"
MAX_BATCH = 100  # the webhook's limit per request
WRITTEN = "written"
UNKNOWN_ACTOR = "nobody@contoso.com"
MISSING_CONTACT = "never.created@example.com"
GOOD_ACTORS: tuple[str | None, ...] = (
    "jane@contoso.com", "john@contoso.com", "o'brien@contoso.com", "noentra@contoso.com", None,
)
IMPERSONATED = tuple(a for a in GOOD_ACTORS if a is not None)
# (actAs email, expected dead-letter reason) sent in every run, spread through the first batch.
BAD_ACTORS = (
    ("disabled@contoso.com", "actor_disabled"),
    (UNKNOWN_ACTOR, "actor_not_found"),
    ("disabled@contoso.com", "actor_disabled"),
    ("shared@contoso.com", "actor_ambiguous"),
)
MIN_JOBS = 10
MAX_JOBS = 5000
ROSTER = (
    "email,externalId\n"
    "jane@contoso.com,HR-1001\n"
    "john@contoso.com,HR-1002\n"
    "o'brien@contoso.com,HR-1003\n"
    "noentra@contoso.com,HR-1004\n"
    "disabled@contoso.com,HR-1005\n"
    "shared@contoso.com,HR-1006\n"
    "left.company@contoso.com,HR-1007\n"
)
ROSTER_BLOB = ("reconciliation", "roster.csv")
REPORTS_PREFIX = "reports/"
# Settings a developer's shell may hold for real Azure work; the children must not pick them up.
FOREIGN_SETTINGS = (
    "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USERNAME", "AZURE_PASSWORD", "MSI_ENDPOINT", "MSI_SECRET",
    "IDENTITY_SERVER_THUMBPRINT", "DEVSTACK_STATE",
)
FIRST_NAMES = ("Ada", "Grace", "Alan", "Liam", "Mary", "Katherine", "Tim", "Radia", "Barbara", "Edsger")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "O'Neil", "Jackson", "Johnson", "Berners-Lee", "Perlman",
              "Liskov", "Dijkstra")


class DemoError(Exception):
    """The flow cannot go on; the message says what happened and where to look."""


class PortsBusy(DemoError):
    """A fixed port is taken: nothing was started."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, handled like Ctrl-C: stop everything and exit."""


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Planned:
    """One job and what must come of it."""

    job: dict[str, Any]
    phase: int
    actor: str | None  # actAs email; None = the application user itself
    expect: str  # WRITTEN or the dead-letter reason
    contact: str  # emailaddress1 of the contact it targets
    marker: tuple[str, str]  # (field, value) the write leaves on the record

    @property
    def id(self) -> str:
        return str(self.job["id"])


def _contact_email(index: int) -> str:
    first = FIRST_NAMES[index % len(FIRST_NAMES)]
    last = LAST_NAMES[(index // len(FIRST_NAMES) + index) % len(LAST_NAMES)]
    return f"{first}.{last.replace(' ', '')}.{index:04d}@example.com".lower()


def _job(job_id: str, operation: str, contact: str, data: dict[str, Any],
         actor: str | None) -> dict[str, Any]:
    job: dict[str, Any] = {"id": job_id, "entity": "contacts", "operation": operation,
                           "key": {"emailaddress1": contact}, "data": data}
    if actor is not None:
        job["actAs"] = {"email": actor}
    return job


def plan_jobs(total: int) -> list[Planned]:
    """Phase 1 creates and upserts contacts (and a few jobs for actors that must fail); phase 2 has other
    users update some of them, plus one update of a contact that does not exist.

    Two phases because the queue runs jobs concurrently: an update sent with the create of the same
    record could run first.  Every contact is written by one job per phase, so each outcome is checkable.
    """
    if not MIN_JOBS <= total <= MAX_JOBS:
        raise ValueError(f"--jobs must be between {MIN_JOBS} and {MAX_JOBS}")
    updates = max(2, total // 10)
    first = total - updates
    good_count = first - len(BAD_ACTORS)
    operations = ("upsert", "create", "upsert")
    plan: list[Planned] = []
    good: list[Planned] = []
    for n in range(good_count):
        actor = GOOD_ACTORS[n % len(GOOD_ACTORS)]
        contact = _contact_email(n + 1)
        first_name, _, rest = contact.partition(".")
        last_name = rest.split(".")[0]
        job_id = f"{SOURCE}-{n + 1:04d}"
        data = {"firstname": first_name.title(), "lastname": last_name.title(), "description": job_id}
        good.append(Planned(_job(job_id, operations[n % len(operations)], contact, data, actor), 1, actor,
                            WRITTEN, contact, ("description", job_id)))
    step = max(1, len(good) // (len(BAD_ACTORS) + 1))
    bad_at = {step * (i + 1): i for i in range(len(BAD_ACTORS))}
    for position, planned in enumerate(good):
        if position in bad_at:
            plan.append(_bad(len(plan) + 1, *BAD_ACTORS[bad_at.pop(position)]))
        plan.append(planned)
    for index in sorted(bad_at.values()):
        plan.append(_bad(len(plan) + 1, *BAD_ACTORS[index]))
    plan = [_renumber(p, i + 1) for i, p in enumerate(plan)]
    targets = [p for p in plan if p.expect == WRITTEN and p.actor in IMPERSONATED]
    spread = max(1, len(targets) // (updates - 1))
    for u in range(updates - 1):
        target = targets[(u * spread) % len(targets)]
        # Always someone other than the creator, so the record shows two different users.
        offset = 1 + u % (len(IMPERSONATED) - 1)
        updater = IMPERSONATED[(IMPERSONATED.index(str(target.actor)) + offset) % len(IMPERSONATED)]
        job_id = f"{SOURCE}-{first + u + 1:04d}"
        title = f"Reviewed ({job_id})"
        plan.append(Planned(_job(job_id, "update", target.contact, {"jobtitle": title}, updater), 2,
                            updater, WRITTEN, target.contact, ("jobtitle", title)))
    job_id = f"{SOURCE}-{total:04d}"
    title = f"Reviewed ({job_id})"
    plan.append(Planned(_job(job_id, "update", MISSING_CONTACT, {"jobtitle": title}, IMPERSONATED[0]), 2,
                        IMPERSONATED[0], "record_not_found", MISSING_CONTACT, ("jobtitle", title)))
    return plan


def _bad(number: int, actor: str, reason: str) -> Planned:
    contact = f"unwritten.{number:04d}@example.com"
    job_id = f"{SOURCE}-{number:04d}"
    return Planned(_job(job_id, "upsert", contact, {"lastname": "Unwritten", "description": job_id}, actor),
                   1, actor, reason, contact, ("description", job_id))


def _renumber(planned: Planned, number: int) -> Planned:
    job_id = f"{SOURCE}-{number:04d}"
    job = dict(planned.job, id=job_id)
    field_name, _ = planned.marker
    if field_name == "description":
        job["data"] = dict(job["data"], description=job_id)
    return Planned(job, planned.phase, planned.actor, planned.expect, planned.contact, (field_name, job_id))


# --------------------------------------------------------------------------- checking outcomes


@dataclass
class Users:
    """The sandbox's users by id and by email, for naming who Dataverse says wrote a record."""

    rows: list[dict[str, Any]]
    app_id: str

    @classmethod
    def load(cls, sandbox: SandboxClient) -> Users:
        rows = sandbox.list_users()
        client_id = sandbox.client_id.lower()
        app = next((u for u in rows if (u.get("applicationid") or "").lower() == client_id), None)
        if app is None:
            raise DemoError("the default sandbox has no application user")
        return cls(rows, str(app["systemuserid"]).lower())

    def by_id(self, user_id: str | None) -> dict[str, Any] | None:
        wanted = (user_id or "").lower()
        return next((u for u in self.rows if str(u["systemuserid"]).lower() == wanted), None)

    def id_of(self, email: str | None) -> str | None:
        if email is None:
            return self.app_id
        found = [u for u in self.rows if (u.get("internalemailaddress") or "").lower() == email.lower()]
        return str(found[0]["systemuserid"]).lower() if len(found) == 1 else None

    def name(self, user_id: str | None, *, email: bool = True) -> str:
        user = self.by_id(user_id)
        if user is None:
            return f"unknown user {user_id}"
        if str(user["systemuserid"]).lower() == self.app_id:
            return "the application user"
        if not email:
            return str(user.get("fullname"))
        return f"{user.get('fullname')} <{user.get('internalemailaddress')}>"

    def header(self, user_id: str) -> str:
        """The caller header the app sends for this user (CallerObjectId needs an Entra object id)."""
        if user_id == self.app_id:
            return "(none)"
        user = self.by_id(user_id)
        return "CallerObjectId" if user and user.get("azureactivedirectoryobjectid") else "MSCRMCallerID"


@dataclass
class Outcome:
    """Where every sent job stands, from the sources of truth: Dataverse's records and the queues."""

    written: list[Planned] = field(default_factory=list)
    wrong_user: list[tuple[Planned, str]] = field(default_factory=list)
    dead: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> dead-letter record
    dead_total: int = 0
    poison: int = 0
    queued: int = 0

    def accounted(self) -> int:
        return len(self.written) + len(self.wrong_user) + self.dead_total + self.poison


def check_records(plan: Sequence[Planned], records: Sequence[Mapping[str, Any]], users: Users,
                  outcome: Outcome) -> None:
    """A job is written when its marker is on its contact; it is right when Dataverse recorded the actor."""
    by_contact = {str(r.get("emailaddress1") or "").lower(): r for r in records}
    outcome.written.clear()
    outcome.wrong_user.clear()
    for planned in plan:
        record = by_contact.get(planned.contact)
        field_name, value = planned.marker
        if record is None or record.get(field_name) != value:
            continue
        who_field = "_createdby_value" if planned.phase == 1 else "_modifiedby_value"
        recorded = str(record.get(who_field) or "").lower()
        if planned.expect == WRITTEN and recorded == users.id_of(planned.actor):
            outcome.written.append(planned)
        else:
            outcome.wrong_user.append((planned, recorded))


# --------------------------------------------------------------------------- child processes


class Child:
    """A child process whose merged output goes to a log file and is watched for lines.

    Each child gets its own session, so Ctrl-C reaches only the demo, which then stops the children
    in order (the host first, so running invocations finish against a live stack).
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w", encoding="utf-8")
        self._lines: deque[str] = deque(maxlen=4000)
        self._changed = threading.Condition()
        self._exited = False
        self.process = spawn(  # dies with the demo, even on SIGKILL (no orphans holding the ports)
            argv, cwd=ROOT, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._exited = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, *, what: str) -> re.Match[str]:
        """The first line matching ``pattern``; DemoError if the child exits or the time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((m for m in map(regex.search, self._lines) if m), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if self._exited or left <= 0:
                    break
                self._changed.wait(left)
        why = "exited" if self._exited else f"did not get there in {timeout:.0f} s"
        raise DemoError(f"{self.name} {why} while {what}; its last lines ({self.log_path}):\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        with self._changed:
            return "\n".join(f"    {line}" for line in list(self._lines)[-lines:])

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 40.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout=5)
        self._log.close()
        return self.process.returncode


def busy_ports() -> list[str]:
    """The fixed ports something already listens on, named by the service that needs them."""
    wanted = {**STACK_PORTS, **AZURITE_PORTS, "Functions host": HOST_PORT}
    busy = []
    for name, port in wanted.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(f"{port} ({name})")
    return busy


def child_env(values: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_SETTINGS}
    env.update(values)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- output


class Console:
    """Plain lines; a progress line refreshed in place (and a little colour) only on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.colour = self.tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self._progress_shown = False
        self._last_progress = 0.0
        self._last_text = ""
        self.closed = False

    def style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def line(self, text: str = "") -> None:
        if self.closed:
            return
        try:
            self._clear_progress()
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:  # `make run | head`: stop writing, still clean up
            self.closed = True

    def step(self, number: int, text: str) -> None:
        self.line(self.style(f"[{number}/5] {text}", "1"))

    def heading(self, text: str) -> None:
        self.line("      " + self.style(text, "1"))

    def progress(self, text: str) -> None:
        if self.closed:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._progress_shown = True
        elif text != self._last_text and time.monotonic() - self._last_progress >= 3.0:
            print(text, file=self.stream, flush=True)
            self._last_progress = time.monotonic()
        self._last_text = text

    def start_progress(self) -> None:
        """A quick phase then prints only its final line (no progress lines when not on a terminal)."""
        self._last_progress = time.monotonic()
        self._last_text = ""

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self.stream.write("\r\033[K")
            self._progress_shown = False

    def ok(self, good: bool) -> str:
        return self.style("OK", "32") if good else self.style("FAILED", "31;1")


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------- the run


@dataclass
class Options:
    jobs: int = 60
    serve: bool = False
    fixed_ports: bool = True
    timeout: float = 120.0
    json_path: Path | None = None
    credential: str = "secret"  # DATAVERSE_CREDENTIAL: secret | federated | certificate


@dataclass
class Result:
    ok: bool = False
    jobs: int = 0
    outcome: Outcome = field(default_factory=Outcome)
    unexpected: list[str] = field(default_factory=list)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    lookups_expected: int = 0
    reconciliation: dict[str, Any] = field(default_factory=dict)
    report_blob: str = ""
    problems: list[str] = field(default_factory=list)
    state_dir: str = ""
    pids: list[int] = field(default_factory=list)  # the children, so a test can check none survived
    credential: str = "secret"
    client_secrets: list[str] = field(default_factory=list)  # where a client secret exists (should: nowhere)

    def to_json(self) -> dict[str, Any]:
        reasons = Counter(str(d.get("reason")) for d in self.outcome.dead.values())
        return {
            "ok": self.ok,
            "jobs": self.jobs,
            "written": len(self.outcome.written),
            "writtenAsWrongUser": [p.id for p, _ in self.outcome.wrong_user],
            "deadLettered": self.outcome.dead_total,
            "deadLetterReasons": dict(sorted(reasons.items())),
            "poison": self.outcome.poison,
            "queued": self.outcome.queued,
            "unexpected": self.unexpected,
            "counters": self.counters,
            "lookupsExpected": self.lookups_expected,
            "reconciliation": self.reconciliation,
            "reportBlob": self.report_blob,
            "problems": self.problems,
            "stateDir": self.state_dir,
            "pids": self.pids,
            "credential": self.credential,
            "clientSecretsFound": self.client_secrets,
        }


class Demo:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.out = console
        self.children: list[Child] = []
        # Fixed ports: .devstack/, where `python -m devstack up` keeps its CA too (local.settings.json
        # written there stays valid for `func start`).  Auto ports: a directory of this run only.
        self.temporary = not options.fixed_ports
        self.state_dir = (Path(tempfile.mkdtemp(prefix="devstack-demo-")) if self.temporary
                          else ROOT / ".devstack")
        self.log_dir = self.state_dir / "demo"
        self.host_url = ""
        self.stack: Stack | None = None
        self.sandbox: SandboxClient | None = None
        self.host: Child | None = None
        self.settings: dict[str, str] = {}
        self.webhook_key = ""
        self.session = requests.Session()
        self.session.trust_env = False  # loopback only: no proxy

    # -- lifecycle

    def start(self) -> None:
        started = time.monotonic()
        if self.options.fixed_ports:
            busy = busy_ports()
            if busy:
                raise PortsBusy(
                    f"ports already in use: {', '.join(busy)}.\n"
                    "Another `make run` or `python -m devstack up` is probably running: stop it (Ctrl-C), "
                    "or run on free ports with `make run ARGS='--ports auto'` (the README's curl examples "
                    "then need the printed ports)."
                )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        state = self.state_dir / "state.json"
        stack = Child("the local Azure stack", [
            sys.executable, "-m", "devstack", "up", "--state", str(state),
            "--ports", "fixed" if self.options.fixed_ports else "auto",
        ], child_env({}), self.log_dir / "devstack.log")
        self.children.append(stack)
        stack.wait_for(r"^devstack ready ", 90, what="starting")
        self.stack = Stack.from_state(state)
        self.sandbox = self.stack.sandbox("default")
        if self.options.credential != "secret":
            # As an operator would: the federated credential (or a registered certificate in Key Vault)
            # on the app registration, and the client secret deleted from it and from Key Vault.
            self.sandbox.use_credential(self.options.credential)
        urls = self.stack.urls
        ports = " · ".join(f"{label} :{urlsplit(urls[name]).port}" for name, label in (
            ("entra", "Entra"), ("keyvault", "Key Vault"), ("dataverse", "Dataverse"), ("identity", "MSI")))
        seconds = time.monotonic() - started
        self.out.line(f"      emulators ready in {seconds:.1f} s (HTTPS, local CA): {ports}")

        self.settings = {
            "FUNCTIONS_WORKER_RUNTIME": "python",
            "AzureWebJobsStorage": self.stack.azurite["connection_string"],
            **self.sandbox.env,
            "SYNC_QUEUE_NAME": SYNC_QUEUE,
            "RECONCILE_SCHEDULE": RECONCILE_SCHEDULE,
            # as deployed (infra/modules/functionapp.bicep): a worker thread for every concurrent invocation
            "PYTHON_THREADPOOL_THREAD_COUNT": "32",
        }
        settings_file = self.state_dir / "local.settings.json"
        settings_file.write_text(json.dumps({"IsEncrypted": False, "Values": self.settings}, indent=2) + "\n",
                                 encoding="utf-8")
        # The operator's view of the signing key: read from Key Vault with the sandbox's managed identity,
        # before the counters are zeroed so that only the Function App's own requests are counted.
        self.webhook_key = read_secret(self.sandbox.env, self.sandbox.env.get("WEBHOOK_SECRET_NAME")
                                       or WEBHOOK_SECRET_NAME)
        self.sandbox.reset_counters()

        started = time.monotonic()
        host = Child("the Functions host", [
            sys.executable, "-m", "devstack.host", "--app", "function_app", "--script-root", str(ROOT),
            "--port", str(HOST_PORT if self.options.fixed_ports else 0), "--settings", str(settings_file),
        ], child_env({**self.settings, "LOCAL_FUNCTION_KEY": DEFAULT_FUNCTION_KEY,
                      "LOCAL_MASTER_KEY": DEFAULT_MASTER_KEY}), self.log_dir / "host.log")
        self.children.append(host)
        self.host = host
        match = host.wait_for(r"Host started \(port (\d+)|Host failed to start", 90, what="starting")
        if match.group(1) is None:
            raise DemoError(f"the Functions host failed to start ({host.log_path}):\n{host.tail()}")
        self.host_url = f"http://127.0.0.1:{match.group(1)}"
        status = self.admin_get("/admin/host/status")
        if status.get("errors"):
            raise DemoError("the Functions host reports function errors:\n  " + "\n  ".join(status["errors"]))
        azurite_port = urlsplit(self.stack.azurite.get("blob", "")).port
        seconds = time.monotonic() - started
        count = len(status.get("functions", []))
        self.out.line(f"      Azurite :{azurite_port}+ · Functions host ready in {seconds:.1f} s: "
                      f"{self.host_url} ({count} functions)")

    def stop(self, *, keep_logs: bool) -> None:
        """The host first (it lets running invocations finish), then the stack (it stops Azurite)."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for child in reversed(self.children):
                child.stop()
            self.children.clear()
            self.session.close()
            if self.temporary and not keep_logs:
                shutil.rmtree(self.state_dir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- HTTP helpers

    def admin_get(self, path: str) -> dict[str, Any]:
        response = self.session.get(self.host_url + path, headers={"x-functions-key": DEFAULT_MASTER_KEY},
                                    timeout=30)
        if response.status_code != 200:
            raise DemoError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
        result: dict[str, Any] = response.json()
        return result

    def post_batch(self, jobs: Sequence[Mapping[str, Any]]) -> None:
        from shared.webhooks import signature_header

        body = json.dumps({"jobs": list(jobs)}, ensure_ascii=False).encode("utf-8")
        signature = signature_header(self.webhook_key.encode("utf-8"), body, int(time.time()),
                                     source=SOURCE)
        response = self.session.post(
            f"{self.host_url}/api/webhooks/{SOURCE}", data=body, timeout=60,
            headers={"Content-Type": "application/json", "X-Signature": signature,
                     "x-functions-key": DEFAULT_FUNCTION_KEY},
        )
        if response.status_code != 202 or response.json().get("accepted") != len(jobs):
            raise DemoError(f"POST /api/webhooks/{SOURCE} answered {response.status_code}: "
                            f"{response.text[:500]}")

    # -- storage helpers

    def queues(self) -> QueueServiceClient:
        from azure.storage.queue import QueueServiceClient

        assert self.stack is not None
        return QueueServiceClient.from_connection_string(self.stack.azurite["connection_string"])

    @staticmethod
    def queue_count(service: QueueServiceClient, name: str) -> int:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return int(service.get_queue_client(name).get_queue_properties().approximate_message_count or 0)
        except ResourceNotFoundError:
            return 0

    @staticmethod
    def dead_letters(service: QueueServiceClient) -> list[dict[str, Any]]:
        """The dead-letter records (peek shows at most 32; the demo sends fewer bad jobs than that)."""
        import base64

        from azure.core.exceptions import ResourceNotFoundError

        client = service.get_queue_client(f"{SYNC_QUEUE}-deadletter", message_decode_policy=None)
        try:
            messages = client.peek_messages(max_messages=32)
        except ResourceNotFoundError:
            return []
        records = []
        for message in messages:
            with contextlib.suppress(ValueError):
                records.append(json.loads(base64.b64decode(str(message.content)).decode("utf-8")))
        return records

    # -- the flow

    def drain(self, plan: Sequence[Planned], users: Users, deadline: float, label: str) -> Outcome:
        """Poll Dataverse and the queues until every sent job is written or dead-lettered (or time is up)."""
        assert self.sandbox is not None
        service = self.queues()
        started = time.monotonic()
        self.out.start_progress()
        outcome = Outcome()
        while True:
            outcome.queued = self.queue_count(service, SYNC_QUEUE)
            outcome.poison = self.queue_count(service, f"{SYNC_QUEUE}-poison")
            outcome.dead_total = self.queue_count(service, f"{SYNC_QUEUE}-deadletter")
            check_records(plan, self.sandbox.records("contacts"), users, outcome)
            elapsed = time.monotonic() - started
            self.out.progress(
                f"      {label}: queued {outcome.queued} · written {len(outcome.written)} · dead-lettered "
                f"{outcome.dead_total} · poison {outcome.poison} · {elapsed:.1f} s"
            )
            done = outcome.accounted() >= len(plan) and outcome.queued == 0
            if done or outcome.poison or time.monotonic() > deadline:
                break
            time.sleep(0.25)  # polling other processes' state: there is no event to wait on
        outcome.dead = {}
        for record in self.dead_letters(service):
            job = record.get("job")
            outcome.dead[str(job.get("id")) if isinstance(job, dict) else repr(job)[:40]] = record
        timed_out = "" if outcome.accounted() >= len(plan) else " — TIME LIMIT REACHED"
        self.out.line(
            f"      {label}: queued {outcome.queued} · written {len(outcome.written)} · dead-lettered "
            f"{outcome.dead_total} · poison {outcome.poison} · {time.monotonic() - started:.1f} s{timed_out}"
        )
        return outcome

    def lookup(self, email: str) -> str:
        response = self.session.get(f"{self.host_url}/api/users", params={"email": email},
                                    headers={"x-functions-key": DEFAULT_FUNCTION_KEY}, timeout=30)
        if response.status_code != 200:
            return f"{response.status_code} {_short(response.text, 80)}"
        user = response.json()
        header = "CallerObjectId" if user.get("azureAdObjectId") else "MSCRMCallerID"
        return f"200 {user.get('fullName')} {user.get('systemUserId')} {header}"

    def reconcile(self, deadline: float) -> tuple[str, dict[str, Any]]:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        assert self.stack is not None and self.host is not None
        service = BlobServiceClient.from_connection_string(self.stack.azurite["connection_string"])
        container = service.get_container_client(ROSTER_BLOB[0])
        with contextlib.suppress(ResourceExistsError):
            container.create_container()
        container.upload_blob(ROSTER_BLOB[1], ROSTER.encode("utf-8"), overwrite=True)
        response = self.session.post(f"{self.host_url}/admin/functions/reconcile_users", json={"input": ""},
                                     headers={"x-functions-key": DEFAULT_MASTER_KEY}, timeout=30)
        if response.status_code != 202:
            raise DemoError(f"POST /admin/functions/reconcile_users answered {response.status_code}")
        match = self.host.wait_for(r"Executed 'Functions\.reconcile_users' \((Succeeded|Failed)",
                                   max(1.0, deadline - time.monotonic()), what="running reconcile_users")
        if match.group(1) != "Succeeded":
            raise DemoError(f"reconcile_users failed; see {self.host.log_path}:\n{self.host.tail()}")
        names = [b.name for b in container.list_blobs(name_starts_with=REPORTS_PREFIX)]
        if not names:
            raise DemoError("reconcile_users succeeded but wrote no report blob")
        name = sorted(names)[-1]
        report: dict[str, Any] = json.loads(container.download_blob(name).readall())
        return f"{ROSTER_BLOB[0]}/{name}", report

    def run(self) -> Result:
        assert self.sandbox is not None
        result = Result(jobs=self.options.jobs, state_dir=str(self.state_dir),
                        pids=[child.process.pid for child in self.children],
                        credential=self.options.credential)
        plan = plan_jobs(self.options.jobs)
        users = Users.load(self.sandbox)
        deadline = time.monotonic() + self.options.timeout
        phase1 = [p for p in plan if p.phase == 1]
        phase2 = [p for p in plan if p.phase == 2]
        actors = sorted({p.actor for p in plan if p.actor is not None})
        result.lookups_expected = len(actors)

        failing = len({actor for actor, _ in BAD_ACTORS})
        itself = " or as the application user" if any(p.actor is None for p in phase1) else ""
        self.out.step(2, f"Webhook: {len(phase1)} jobs acting as {len(actors)} users "
                         f"({failing} meant to fail){itself}")
        for chunk in _chunks([p.job for p in phase1], MAX_BATCH):
            self.post_batch(chunk)
        self.out.line(f"      POST /api/webhooks/{SOURCE}, X-Signature with the Key Vault key → 202, "
                      f"{len(phase1)} jobs on {SYNC_QUEUE}")
        outcome = self.drain(phase1, users, deadline, "draining")
        if outcome.poison == 0 and outcome.accounted() >= len(phase1):
            self.out.line(f"      then {len(phase2)} updates by other users (one of a contact that does not "
                          f"exist):")
            for chunk in _chunks([p.job for p in phase2], MAX_BATCH):
                self.post_batch(chunk)
            outcome = self.drain(plan, users, deadline, "draining")
        result.outcome = outcome
        result.counters = self.sandbox.counters()

        self.out.step(3, "User lookup and reconciliation")
        before = result.counters.get("dataverse", {}).get("GET systemusers", 0)
        answer = self.lookup(IMPERSONATED[2])
        after = self.sandbox.counters().get("dataverse", {}).get("GET systemusers", 0)
        self.out.line(f"      GET /api/users?email={IMPERSONATED[2]} → {answer} "
                      f"{'(cached)' if after == before else f'({after - before} new lookups)'}")
        before = after
        try:
            result.report_blob, report = self.reconcile(deadline + 30)
            result.reconciliation = dict(report.get("counts", {}))
            queries = self.sandbox.counters().get("dataverse", {}).get("GET systemusers", 0) - before
            rows = ROSTER.count("\n") - 1
            self.out.line(f"      {'/'.join(ROSTER_BLOB)} ({rows} rows) + POST /admin/functions/"
                          f"reconcile_users → report ({queries} paged systemusers query)")
        except DemoError as exc:
            result.problems.append(str(exc))
            self.out.line(f"      reconciliation FAILED: {exc}")

        self.summarise(plan, users, result)
        return result

    # -- the summary

    def summarise(self, plan: Sequence[Planned], users: Users, result: Result) -> None:
        assert self.sandbox is not None
        outcome = result.outcome
        contacts = {p.contact for p in plan if p.expect == WRITTEN}
        records = [r for r in self.sandbox.records("contacts")
                   if str(r.get("emailaddress1") or "").lower() in contacts]
        self.out.step(4, f"What Dataverse recorded on the {len(records)} demo contacts — on whose behalf")
        created = Counter(str(r.get("_createdby_value") or "").lower() for r in records)
        modified = Counter(str(r.get("_modifiedby_value") or "").lower() for r in records)
        self.out.line(f"      {'user':<44} {'caller header':<15} {'created':>7} {'last modified':>14}")
        for user_id in sorted(set(created) | set(modified), key=lambda u: (u == users.app_id, users.name(u))):
            self.out.line(f"      {_short(users.name(user_id), 44):<44} {users.header(user_id):<15} "
                          f"{created[user_id]:>7} {modified[user_id]:>14}")
        impersonated = [r for r in records if str(r.get("_createdby_value") or "").lower() != users.app_id]
        on_behalf = sum(1 for r in impersonated
                        if str(r.get("_createdonbehalfby_value") or "").lower() == users.app_id)
        self.out.line(f"      _createdonbehalfby = the application user on {on_behalf} of "
                      f"{len(impersonated)} impersonated creates")
        example = next((r for r in records if r.get("_createdby_value") != r.get("_modifiedby_value")
                        and r.get("_createdby_value") != users.app_id), None)
        if example is not None:
            self.out.line(f"      e.g. {example.get('emailaddress1')}: created by "
                          f"{users.name(example.get('_createdby_value'), email=False)}, modified by "
                          f"{users.name(example.get('_modifiedby_value'), email=False)}")
        for planned, recorded in outcome.wrong_user:
            self.out.line(f"      WRONG USER: {planned.id} was to act as "
                          f"{planned.actor or 'the application user'}; "
                          f"Dataverse recorded {users.name(recorded)}")

        by_reason: dict[str, list[str]] = {}
        for job_id, record in sorted(outcome.dead.items()):
            by_reason.setdefault(str(record.get("reason")), []).append(job_id)
        self.out.heading(f"Dead-lettered on {SYNC_QUEUE}-deadletter: {outcome.dead_total}")
        for reason, ids in sorted(by_reason.items()):
            detail = str(outcome.dead[ids[0]].get("detail", ""))
            shown = ", ".join(ids[:3]) + (" …" if len(ids) > 3 else "")
            text = f"      {reason:<17} {len(ids):>3}  {shown}: "
            self.out.line(text + _short(detail, max(30, 106 - len(text))))

        self.out.heading("Requests the Function App made for the jobs (emulator counters)")
        c = result.counters
        dataverse = c.get("dataverse", {})
        mode = self.options.credential
        keys = "webhook + queue-message signing keys"
        reads = {"secret": f"client secret + {keys}, once each",
                 "certificate": f"certificate + {keys}, once each",
                 "federated": f"{keys} only: no client secret exists"}[mode]
        exchange = c.get("identity", {}).get("token-exchange", 0)
        rows = [
            ("managed identity tokens", c.get("identity", {}).get("GET msi", 0),
             f"{c.get('identity', {}).get('GET msi', 0) - exchange} for Key Vault + {exchange} for the token "
             "exchange (the client assertion)" if exchange else "for Key Vault"),
            ("Key Vault secret reads", c.get("keyvault", {}).get("GET secret", 0), reads),
            ("Entra token requests", c.get("entra", {}).get("POST token", 0),
             "one token, reused for every call"),
            ("systemusers lookups", dataverse.get("GET systemusers", 0),
             f"one per distinct actor ({result.lookups_expected}), then cached"),
            ("contacts writes", dataverse.get("PATCH contacts", 0) + dataverse.get("POST contacts", 0),
             f"PATCH {dataverse.get('PATCH contacts', 0)} · POST {dataverse.get('POST contacts', 0)} · "
             f"429s {dataverse.get('status:429', 0)}"),
            ("impersonated writes", dataverse.get("caller:CallerObjectId", 0)
             + dataverse.get("caller:MSCRMCallerID", 0),
             f"as received: CallerObjectId {dataverse.get('caller:CallerObjectId', 0)} · "
             f"MSCRMCallerID {dataverse.get('caller:MSCRMCallerID', 0)} · "
             f"silently ignored {dataverse.get('impersonation:ignored', 0)}"),
        ]
        for label, count, note in rows:
            self.out.line(f"      {label:<26} {count:>5}  {note}")
        if mode != "secret":
            result.client_secrets = self.client_secrets_left()
            self.out.line(f"      DATAVERSE_CREDENTIAL={mode}: client secrets on the app registration, "
                          f"in Key Vault, in settings: {', '.join(result.client_secrets) or 'none'} "
                          f"→ {self.out.ok(not result.client_secrets)}")

        if result.reconciliation:
            r = result.reconciliation
            self.out.heading(f"Reconciliation report {result.report_blob}")
            self.out.line(f"      users {r.get('users')} (disabled {r.get('usersDisabled')}, without Entra id"
                          f" {r.get('usersNoEntraId')}) · roster {r.get('rosterEntries')}: missing "
                          f"{r.get('rosterMissing')}, disabled {r.get('rosterDisabled')}, ambiguous "
                          f"{r.get('rosterAmbiguous')}, no Entra id {r.get('rosterNoEntraId')}")

        result.unexpected = unexpected_outcomes(plan, outcome)
        expected_dead = sum(1 for p in plan if p.expect != WRITTEN)
        result.ok = (not result.unexpected and not outcome.wrong_user and outcome.poison == 0
                     and len(outcome.written) == len(plan) - expected_dead
                     and outcome.dead_total == expected_dead and bool(result.reconciliation)
                     and not result.problems and not result.client_secrets)
        as_expected = sum(1 for p in plan if p.expect != WRITTEN
                          and (outcome.dead.get(p.id) or {}).get("reason") == p.expect)
        self.out.step(5, f"Accounting: {len(plan)} jobs = {len(outcome.written)} written as the right user"
                         f" + {as_expected} dead-lettered as expected → {self.out.ok(result.ok)}")
        if outcome.poison:
            self.out.line(f"      {outcome.poison} message(s) ended in {SYNC_QUEUE}-poison: a failure that "
                          f"outlived the retries (see the host log)")
        for problem in result.unexpected[:10]:
            self.out.line(f"      {problem}")

    # -- --serve

    def client_secrets_left(self) -> list[str]:
        """Where a client secret still exists: the app registration, the vault, the app's settings."""
        assert self.sandbox is not None
        view = self.sandbox.show()
        found = []
        if view.get("client_secrets"):
            found.append(f"{view['client_secrets']} on the app registration")
        names = [n for n in view.get("vault_secrets", []) if n.lower() == CLIENT_SECRET_NAME.lower()]
        found += [f"Key Vault secret {n}" for n in names]
        found += [f"setting {k}" for k in self.settings
                  if "CLIENT_SECRET" in k.upper() and k != "DATAVERSE_CLIENT_SECRET_NAME"]
        return found

    def serve(self, stop: threading.Event) -> None:
        assert self.stack is not None
        key = self.webhook_key
        fkey, mkey, url = DEFAULT_FUNCTION_KEY, DEFAULT_MASTER_KEY, self.host_url
        body = ('{"id":"manual-1","entity":"contacts","operation":"upsert","key":{"emailaddress1":'
                '"ada@example.com"},"data":{"firstname":"Ada"},"actAs":{"email":"jane@contoso.com"}}')
        state = self.state_dir / "state.json"
        lines = [
            "",
            self.out.style("Serving until Ctrl-C", "1"),
            f"  Functions host {url}   function key {fkey}   master key {mkey}",
            f"  webhook signing key (Key Vault secret {WEBHOOK_SECRET_NAME}): {key}",
            f"  state file {_display(state)}  ·  settings for `func start` {_display(state.parent)}"
            "/local.settings.json",
            f"  logs {_display(self.log_dir)}/host.log, devstack.log",
            "Try:",
            f"  curl -s {url}/api/health",
            f"  curl -s -H 'x-functions-key: {fkey}' '{url}/api/users?email={quote(IMPERSONATED[2])}'",
            f"  curl -s -H 'x-functions-key: {mkey}' {url}/api/diagnostics",
            f"  curl -s -X POST -H 'x-functions-key: {mkey}' -H 'Content-Type: application/json' -d "
            f"'{{\"input\":\"\"}}' {url}/admin/functions/reconcile_users",
            f"  body={shlex.quote(body)}",
            "  t=$(date +%s); sig=$(printf '%s.manual.%s' \"$t\" \"$body\" | openssl dgst -sha256 -hmac "
            f"{shlex.quote(key)} | sed 's/^.* //')",
            f"  curl -s -H 'x-functions-key: {fkey}' -H 'Content-Type: application/json' "
            f"-H \"X-Signature: t=$t,v1=$sig\" --data-binary \"$body\" {url}/api/webhooks/manual",
            f"  DEVSTACK_STATE={_display(state)} .venv/bin/python -m tools.queuectl peek deadletter",
        ]
        for text in lines:
            self.out.line(text)
        while not stop.wait(1.0):
            if not all(child.running() for child in self.children):
                gone = next(c for c in self.children if not c.running())
                raise DemoError(f"{gone.name} exited; its last lines ({gone.log_path}):\n{gone.tail()}")


def unexpected_outcomes(plan: Sequence[Planned], outcome: Outcome) -> list[str]:
    """Every job whose fate differs from the plan, in words."""
    problems = []
    written = {p.id for p in outcome.written}
    wrong = {p.id for p, _ in outcome.wrong_user}
    planned_ids = {p.id for p in plan}
    for planned in plan:
        dead = outcome.dead.get(planned.id)
        if planned.expect == WRITTEN:
            if dead is not None:
                problems.append(f"{planned.id}: dead-lettered ({dead.get('reason')}: "
                                f"{_short(str(dead.get('detail')), 60)}), expected written")
            elif planned.id not in written and planned.id not in wrong:
                problems.append(f"{planned.id}: not written (still queued, retried or in -poison)")
        elif dead is None:
            state = "written" if planned.id in written | wrong else "neither written nor dead-lettered"
            problems.append(f"{planned.id}: {state}, expected dead-letter {planned.expect}")
        elif dead.get("reason") != planned.expect:
            problems.append(f"{planned.id}: dead-lettered as {dead.get('reason')}, expected {planned.expect}")
    for job_id in outcome.dead:
        if job_id not in planned_ids:
            problems.append(f"dead-letter for a job the demo did not send: {job_id}")
    return problems


def read_secret(env: Mapping[str, str], name: str) -> str:
    """Read a secret the way an operator with the app's identity would: the real SDK, managed identity."""
    from azure.identity import ManagedIdentityCredential

    from shared.secrets import SecretStore

    for setting in FOREIGN_SETTINGS:
        os.environ.pop(setting, None)
    for setting in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "REQUESTS_CA_BUNDLE"):
        if env.get(setting):
            os.environ[setting] = env[setting]
    credential = ManagedIdentityCredential()
    store = SecretStore(env["KEY_VAULT_URL"], credential)
    try:
        return store.get(name)
    finally:
        store.close()
        credential.close()


def _chunks(items: Sequence[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _display(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _install_signals(stop: threading.Event) -> Callable[[], None]:
    """Ctrl-C raises KeyboardInterrupt as usual; SIGTERM/SIGHUP raise Interrupted, so cleanup runs."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        stop.set()
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60,
                        help=f"jobs to send ({MIN_JOBS}-{MAX_JOBS}, default 60)")
    parser.add_argument("--serve", action="store_true", help="keep everything running after the summary")
    parser.add_argument("--ports", choices=("fixed", "auto"), default="fixed",
                        help="fixed: 7071-7076 and Azurite's 10000-10002 (default); auto: free ports")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the queue to drain")
    parser.add_argument("--json", type=Path, default=None, help="also write the accounting as JSON here")
    parser.add_argument("--credential", choices=CREDENTIAL_MODES, default="secret",
                        help="how the app proves itself to Entra ID (DATAVERSE_CREDENTIAL): secret "
                             "(default), federated (managed identity, no secret anywhere) or certificate "
                             "(Key Vault)")
    args = parser.parse_args(argv)
    if not MIN_JOBS <= args.jobs <= MAX_JOBS:
        parser.error(f"--jobs must be between {MIN_JOBS} and {MAX_JOBS}")
    return Options(jobs=args.jobs, serve=args.serve, fixed_ports=args.ports == "fixed", timeout=args.timeout,
                   json_path=args.json, credential=args.credential)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    out = Console(sys.stdout)
    stop = threading.Event()
    restore = _install_signals(stop)
    demo = Demo(options, out)
    result: Result | None = None
    code = 1
    try:
        out.line("make run — the Functions app on the local stack: emulators, Azurite, local Functions host")
        out.step(1, "Starting the local Azure stack and the Functions host")
        demo.start()
        result = demo.run()
        code = 0 if result.ok else 1
        if options.serve:
            demo.serve(stop)
    except PortsBusy as exc:
        out.line(f"make run: {exc}")
        code = 2
    except DemoError as exc:
        out.line(f"make run FAILED: {exc}")
        code = 1
    except (KeyboardInterrupt, Interrupted):
        out.line("")
        out.line("Interrupted: stopping everything")
        code = 130 if result is None or not options.serve else code
    finally:
        keep = code not in (0, 130) or not demo.temporary
        demo.stop(keep_logs=keep)
        restore()
    if result is not None and options.json_path is not None:
        options.json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    if code != 2:
        logs = f" (logs: {_display(demo.log_dir)}/)" if keep else ""
        out.line(f"Stopped the Functions host, the emulators and Azurite{logs}.")
    return code


if __name__ == "__main__":
    sys.exit(main())
