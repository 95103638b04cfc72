"""The fault matrix: every fault the local stack can inject, driven through the real queue entry point.

Each row runs ``function_app.sync_job`` (the queue trigger, with an ``azure.functions`` QueueMessage and
a small ``Out`` for the dead-letter binding) against a fresh sandbox and a fresh runtime, once per
delivery the host would make, and checks the three promises of the queue path:

* the outcome of each delivery: written (the trigger completes), dead-lettered with the documented
  ``reason``, or raised for the host to retry (a SyncError whose ``transient`` flag says whether a
  retry can help; permanent environment faults raise too, so the job ends in ``-poison`` and is
  replayed once the configuration is fixed);
* Dataverse holds exactly the records it should — never a duplicate — written by the actor on behalf
  of the application user (``_createdby_value``/``_modifiedby_value``/``_createdonbehalfby_value``);
* no secret and no token reaches any log record, at DEBUG, of any logger.

"Transient once" rows end with one more delivery that succeeds when the host's retry is what heals
them; "persistent" rows show what the host sees after the in-process retry budget is spent.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets as random_secrets
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
import requests
from azure.functions.queue import QueueMessage
from requests.adapters import HTTPAdapter

import function_app
import shared.contract
import shared.jobs
import shared.runtime
import shared.tokens
from devstack.control import SandboxClient
from shared import logs
from shared.contract import MAX_JOB_BYTES
from shared.dataverse import WriteResult
from shared.errors import SyncError
from shared.runtime import get_runtime, reset_runtime
from shared.secrets import SecretStore
from tests.bindings import Out
from tests.signing import message_key, sign_job, signed_text

pytestmark = pytest.mark.integration

CLIENT_SECRET_NAME = "dataverse-client-secret"
WEBHOOK_SECRET_NAME = "webhook-signing-secret"
APP = "<application user>"
ACTOR = "jane@contoso.com"
EMAIL = "ada@example.com"
RECORD_ID = "5f2b3c1e-1111-4222-8333-944455556666"

# Short budgets keep the persistent rows quick: 3 attempts per Dataverse request, 4 s of waiting at most.
SETTINGS = {
    "DATAVERSE_TIMEOUT_SECONDS": "3",
    "DATAVERSE_MAX_RETRIES": "2",
    "DATAVERSE_MAX_RETRY_SECONDS": "4",
}
# Timeout rows only: short enough to be quick, long enough that a loaded CI box answers in time.
TIMEOUT_SETTINGS = {**SETTINGS, "DATAVERSE_TIMEOUT_SECONDS": "1.5"}
AUTH_TIMEOUT_SECONDS = 1.5  # Entra / Key Vault / identity timeouts are constants, not settings
SLOW = 4.0  # seconds a "timeout" fault holds the answer back: well over the shortened timeouts


# --- outcomes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """The trigger completed and dead-lettered nothing; ``noop``: the write found nothing to do."""

    noop: bool = False


@dataclass(frozen=True)
class DeadLettered:
    reason: str


@dataclass(frozen=True)
class Raised:
    """The trigger raised a SyncError: the host retries after the visibility timeout, then -poison."""

    code: str
    transient: bool


Outcome = Written | DeadLettered | Raised


# --- the job messages --------------------------------------------------------------------------


def job(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "evt-1",
        "entity": "contacts",
        "operation": "upsert",
        "key": {"emailaddress1": EMAIL},
        "data": {"firstname": "Ada", "lastname": "Lovelace"},
        "actAs": {"email": ACTOR},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


MESSAGE_KEY = [""]
"""The sandbox's queue message key, set by the test: a job (mapping) is delivered signed with it."""

Message = Mapping[str, Any] | bytes | Callable[[str], bytes]
"""A job, signed at delivery as the webhook signs it; raw bytes, sent as they are; or a function of the
message key, for the rows about signatures themselves."""


def encode(message: Message) -> bytes:
    if isinstance(message, bytes):
        return message
    if callable(message):
        return message(MESSAGE_KEY[0])
    return signed_text(message, MESSAGE_KEY[0]).encode("utf-8")


def unsigned(key: str) -> bytes:
    return json.dumps(job()).encode()


def tampered(key: str) -> bytes:
    """Signed, then the actor swapped: the write the attacker wants, under a signature made for another."""
    message = sign_job(job(), key)
    return json.dumps({**message, "actAs": {"email": "john@contoso.com"}}).encode()


def wrong_key(key: str) -> bytes:
    """Signed with the webhook key (which senders hold), not the app's message key."""
    return signed_text(job(), "a-sender-knows-the-webhook-key").encode()


def other_source(key: str) -> bytes:
    """Signed for source crm, relabelled as billing's (job source and _auth.source both changed)."""
    message = sign_job(job(), key, source="crm")
    return json.dumps({**message, "source": "billing",
                       "_auth": {**message["_auth"], "source": "billing"}}).encode()


# --- a row ---------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a row's ``arrange`` may touch: its sandbox, and the app's runtime (built on demand)."""

    sandbox: SandboxClient
    monkeypatch: pytest.MonkeyPatch

    def user_id(self, email: str) -> str:
        if email == APP:
            return self.app_user_id
        found = [u for u in self.sandbox.list_users() if (u["internalemailaddress"] or "") == email]
        assert len(found) == 1, f"{email}: {len(found)} users"
        return str(found[0]["systemuserid"])

    @functools.cached_property
    def app_user_id(self) -> str:
        return str(next(u for u in self.sandbox.list_users() if u["applicationid"])["systemuserid"])

    def warm(self) -> None:
        """A warm instance: the secret read and a token cached, as after earlier jobs."""
        get_runtime().tokens.get_token()

    def deliver(self, message: Message, dequeue_count: int = 1) -> Outcome:
        return deliver(message, dequeue_count)


def nothing(ctx: Ctx) -> None:
    return None


@dataclass(frozen=True)
class Row:
    """One fault: how to arrange it, the message, what each delivery must end in, what Dataverse holds."""

    id: str
    outcomes: tuple[Outcome, ...]
    message: Message = field(default_factory=job)
    arrange: Callable[[Ctx], None] = nothing
    settings: Mapping[str, str] = field(default_factory=lambda: SETTINGS)
    records: int = 1  # contacts in Dataverse at the end
    author: str | None = ACTOR  # who created and last modified them (email, or APP)
    check: Callable[[Ctx, dict[str, dict[str, int]]], None] = lambda ctx, counters: None


def fault(service: str, **kwargs: Any) -> Callable[[Ctx], None]:
    def arrange(ctx: Ctx) -> None:
        ctx.sandbox.add_fault(service, **kwargs)

    return arrange


def dv_write_fault(**kwargs: Any) -> Callable[[Ctx], None]:
    return fault("dataverse", method="PATCH", path=r"/contacts\(", **kwargs)


def dv_lookup_fault(**kwargs: Any) -> Callable[[Ctx], None]:
    return fault("dataverse", method="GET", path=r"/systemusers$", **kwargs)


def short_auth_timeouts(arrange: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    """Key Vault, managed identity and Entra give up after 1.5 s instead of 10 (patched constants)."""

    def shortened(ctx: Ctx) -> None:
        ctx.monkeypatch.setattr(shared.tokens, "AUTH_TIMEOUT_SECONDS", AUTH_TIMEOUT_SECONDS)
        store = functools.partial(SecretStore, timeout=AUTH_TIMEOUT_SECONDS)
        ctx.monkeypatch.setattr(shared.runtime, "SecretStore", store)
        arrange(ctx)

    return shortened


def entra_token_fault(**kwargs: Any) -> Callable[[Ctx], None]:
    return fault("entra", method="POST", path=r"/oauth2/v2\.0/token$", **kwargs)


def kv_fault(**kwargs: Any) -> Callable[[Ctx], None]:
    return fault("keyvault", method="GET", path=rf"/secrets/{CLIENT_SECRET_NAME}", **kwargs)


def env(**values: str) -> Callable[[Ctx], None]:
    def arrange(ctx: Ctx) -> None:
        for name, value in values.items():
            ctx.monkeypatch.setenv(name, value)
        reset_runtime()

    return arrange


def existing_contact(email: str = EMAIL, record_id: str | None = None) -> Callable[[Ctx], None]:
    """A contact written beforehand by the same instance (which warms it up on the way)."""

    def arrange(ctx: Ctx) -> None:
        setup = job(id="setup-1", operation="create", key=record_id, data={"emailaddress1": email,
                                                                          "firstname": "Ada"})
        assert ctx.deliver(setup) == Written()

    return arrange


def rotate_client_secret(ctx: Ctx) -> None:
    """The secret is rotated in the app registration and Key Vault while the instance is warm."""
    ctx.warm()
    new = random_secrets.token_urlsafe(30)
    ctx.sandbox.set_client_secret(new)
    ctx.sandbox.set_secret(CLIENT_SECRET_NAME, new)
    ctx.sandbox.revoke_tokens()  # the cached token dies with the old secret: forces a new one


def stale_actor(ctx: Ctx) -> None:
    """A user whose caller id Dataverse does not recognise: it writes as the application user instead."""
    ctx.sandbox.add_user("stale@contoso.com", ignore_impersonation=True)


def warm_then_revoke(ctx: Ctx) -> None:
    ctx.warm()
    ctx.sandbox.revoke_tokens()


def no_write_sent(ctx: Ctx, counters: dict[str, dict[str, int]]) -> None:
    writes = {k: v for k, v in counters["dataverse"].items() if k.split()[0] in ("PATCH", "POST", "DELETE")}
    assert writes == {}, "refused before any write"


def token_requests(n: int) -> Callable[[Ctx, dict[str, dict[str, int]]], None]:
    def check(ctx: Ctx, counters: dict[str, dict[str, int]]) -> None:
        assert counters["entra"].get("POST token", 0) == n

    return check


def secret_reads(n: int) -> Callable[[Ctx, dict[str, dict[str, int]]], None]:
    """``n`` reads of the client secret, plus the one read of the queue message key per instance."""

    def check(ctx: Ctx, counters: dict[str, dict[str, int]]) -> None:
        assert counters["keyvault"].get("GET secret", 0) == n + 1

    return check


def dead_letter_says(fragment: str) -> Callable[[Ctx, dict[str, dict[str, int]]], None]:
    def check(ctx: Ctx, counters: dict[str, dict[str, int]]) -> None:
        record = DELIVERIES[-1].dead_letter
        assert record is not None and fragment in record["detail"], record

    return check


def writes_sent(n: int) -> Callable[[Ctx, dict[str, dict[str, int]]], None]:
    def check(ctx: Ctx, counters: dict[str, dict[str, int]]) -> None:
        assert counters["dataverse"].get("PATCH contacts", 0) == n

    return check


W, W0 = Written(), Written(noop=True)
ONCE, FOREVER = 1, -1

ROWS: list[Row] = [
    # --- Entra ID -------------------------------------------------------------------------------
    Row("entra-500-once", (W,), arrange=entra_token_fault(status=500, times=ONCE), check=token_requests(2)),
    Row("entra-500-persistent", (Raised("entra_unavailable", True),),
        arrange=entra_token_fault(status=500, times=FOREVER), records=0, author=None),
    Row("entra-timeout-once", (W,), arrange=short_auth_timeouts(entra_token_fault(delay=SLOW, times=ONCE)),
        check=token_requests(2)),
    Row("entra-timeout-persistent", (Raised("entra_unavailable", True),),
        arrange=short_auth_timeouts(entra_token_fault(delay=SLOW, times=FOREVER)), records=0, author=None),
    Row("entra-invalid-client", (Raised("entra_invalid_client", False),),
        arrange=lambda ctx: ctx.sandbox.set_client_secret(random_secrets.token_urlsafe(30)),
        records=0, author=None, check=secret_reads(2)),
    Row("entra-expired-secret", (Raised("entra_invalid_client", False),),
        arrange=lambda ctx: ctx.sandbox.expire_client_secret(), records=0, author=None),
    Row("entra-invalid-client-after-rotation", (W,), arrange=rotate_client_secret,
        check=secret_reads(2)),
    Row("entra-unknown-tenant", (Raised("entra_invalid_tenant", False),),
        arrange=env(DATAVERSE_TENANT_ID=str(uuid.uuid4())), records=0, author=None),
    Row("entra-unknown-client", (Raised("entra_unauthorized_client", False),),
        arrange=env(DATAVERSE_CLIENT_ID=str(uuid.uuid4())), records=0, author=None),
    # --- managed identity -----------------------------------------------------------------------
    Row("identity-500-once", (W,), arrange=fault("identity", status=500, times=ONCE)),
    Row("identity-500-persistent", (Raised("managed_identity_unavailable", True),),
        arrange=fault("identity", status=500, times=FOREVER), records=0, author=None),
    # --- Key Vault ------------------------------------------------------------------------------
    Row("keyvault-403", (Raised("keyvault_forbidden", False),),
        arrange=lambda ctx: ctx.sandbox.set_keyvault_access(False), records=0, author=None),
    Row("keyvault-404", (Raised("keyvault_secret_not_found", False),),
        arrange=env(DATAVERSE_CLIENT_SECRET_NAME="no-such-secret"), records=0, author=None),
    Row("keyvault-503-once", (W,), arrange=kv_fault(status=503, times=ONCE)),
    Row("keyvault-503-persistent", (Raised("keyvault_unavailable", True),),
        arrange=kv_fault(status=503, times=FOREVER), records=0, author=None),
    Row("keyvault-timeout-once", (W,), arrange=short_auth_timeouts(kv_fault(delay=SLOW, times=ONCE))),
    Row("keyvault-timeout-persistent", (Raised("keyvault_unavailable", True),),
        arrange=short_auth_timeouts(kv_fault(delay=SLOW, times=FOREVER)), records=0, author=None),
    # --- Dataverse: authentication --------------------------------------------------------------
    Row("dataverse-401-once", (W,), arrange=dv_write_fault(status=401, times=ONCE), check=token_requests(2)),
    Row("dataverse-401-revoked-token", (W,), arrange=warm_then_revoke, check=token_requests(2)),
    Row("dataverse-401-persistent", (Raised("dataverse_unauthorized", False),),
        arrange=dv_write_fault(status=401, times=FOREVER), records=0, author=None),
    # --- Dataverse: permanent answers -----------------------------------------------------------
    Row("dataverse-403-impersonation-privilege", (DeadLettered("impersonation_privilege_missing"),),
        arrange=lambda ctx: ctx.sandbox.set_privilege(impersonation=False), records=0, author=None),
    Row("dataverse-404-update-missing", (DeadLettered("record_not_found"),),
        message=job(operation="update", key=RECORD_ID), records=0, author=None),
    # A job naming a table or a column that does not exist: its own reason, naming what is missing.
    # (the authorization policy must let the table through to reach Dataverse: otherwise forbidden_by_policy)
    Row("dataverse-404-entity-not-found", (DeadLettered("entity_not_found"),),
        message=job(entity="contactz"), records=0, author=None, check=dead_letter_says("'contactz'"),
        arrange=env(ALLOWED_ENTITY_SETS="contacts,contactz")),
    Row("dataverse-400-unknown-column", (DeadLettered("invalid_column"),),
        message=job(data={"firstname": "Ada", "colour": "red"}), records=0, author=None,
        check=dead_letter_says("data.colour: ")),
    Row("dataverse-404-delete-already-gone", (W0,),
        message=job(operation="delete", key=RECORD_ID, data=None), records=0, author=None),
    Row("dataverse-412-create-exists", (W, W0),
        message=job(operation="create", key=RECORD_ID, data={"emailaddress1": EMAIL, "firstname": "Ada"})),
    # A create whose alternate-key value belongs to ANOTHER record (412 0x80060892) wrote nothing: passing
    # it off as "already there" (the replay no-op, 412 0x80040237) would lose the write without a trace.
    Row("dataverse-412-alternate-key-taken", (DeadLettered("precondition_failed"),),
        message=job(id="evt-2", operation="create", key=None,
                    data={"emailaddress1": EMAIL, "firstname": "Bo"}),
        arrange=existing_contact()),
    Row("dataverse-412-upsert-alternate-key-taken", (DeadLettered("precondition_failed"),),
        message=job(key=RECORD_ID, data={"emailaddress1": EMAIL, "firstname": "Bo"}),
        arrange=existing_contact()),
    # --- Dataverse: throttling and server errors ------------------------------------------------
    Row("dataverse-429-once", (W,), arrange=dv_write_fault(
        status=429, headers={"Retry-After": "1"}, times=ONCE,
        body={"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit"}}),
        check=writes_sent(2)),
    Row("dataverse-429-persistent", (Raised("dataverse_throttled", True),), arrange=dv_write_fault(
        status=429, headers={"Retry-After": "1"}, times=FOREVER,
        body={"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit"}}),
        records=0, author=None, check=writes_sent(3)),
    Row("dataverse-500-once", (Raised("dataverse_unavailable", True), W),
        arrange=dv_write_fault(status=500, times=ONCE)),
    Row("dataverse-500-persistent", (Raised("dataverse_unavailable", True),),
        arrange=dv_write_fault(status=500, times=FOREVER), records=0, author=None),
    *[
        row
        for status in (502, 503, 504)
        for row in (
            Row(f"dataverse-{status}-once", (W,), arrange=dv_write_fault(status=status, times=ONCE),
                check=writes_sent(2)),
            Row(f"dataverse-{status}-persistent", (Raised("dataverse_unavailable", True),),
                arrange=dv_write_fault(status=status, times=FOREVER), records=0, author=None,
                check=writes_sent(3)),
        )
    ],
    Row("dataverse-503-on-lookup-once", (W,), arrange=dv_lookup_fault(status=503, times=ONCE)),
    # --- Dataverse: transport -------------------------------------------------------------------
    # the slow first PATCH is applied late, after the client resent it: still one record
    Row("dataverse-timeout-once", (W,), arrange=dv_write_fault(delay=SLOW, times=ONCE),
        settings=TIMEOUT_SETTINGS, check=writes_sent(2)),
    Row("dataverse-timeout-persistent", (Raised("dataverse_unreachable", True),),
        # the answer (a 504, so nothing is written late) comes only after the client gave up
        arrange=dv_write_fault(status=504, delay=SLOW, times=FOREVER), settings=TIMEOUT_SETTINGS,
        records=0, author=None),
    Row("dataverse-dropped-once", (W,), arrange=dv_write_fault(drop=True, times=ONCE), check=writes_sent(2)),
    Row("dataverse-dropped-persistent", (Raised("dataverse_unreachable", True),),
        arrange=dv_write_fault(drop=True, times=FOREVER), records=0, author=None),
    Row("dataverse-200-malformed-write", (Raised("dataverse_malformed_response", True), W),
        arrange=dv_write_fault(status=200, raw_body="<html>gateway</html>", times=ONCE)),
    Row("dataverse-200-malformed-lookup", (Raised("dataverse_malformed_response", True), W),
        arrange=dv_lookup_fault(status=200, raw_body="<html>gateway</html>", times=ONCE)),
    # --- the actor ------------------------------------------------------------------------------
    Row("actor-missing", (DeadLettered("actor_not_found"),),
        message=job(actAs={"email": "nobody@contoso.com"}), records=0, author=None, check=no_write_sent),
    Row("actor-disabled", (DeadLettered("actor_disabled"),),
        message=job(actAs={"email": "disabled@contoso.com"}), records=0, author=None, check=no_write_sent),
    Row("actor-ambiguous", (DeadLettered("actor_ambiguous"),),
        message=job(actAs={"email": "shared@contoso.com"}), records=0, author=None, check=no_write_sent),
    # WhoAmI with the caller header answers the application user: refused before any write (issue 8).
    Row("actor-silently-not-impersonated", (DeadLettered("impersonation_not_applied"),),
        message=job(actAs={"email": "stale@contoso.com"}),
        arrange=stale_actor, records=0, author=None),
    Row("actor-without-entra-id", (W,), message=job(actAs={"email": "noentra@contoso.com"}),
        author="noentra@contoso.com"),
    Row("actor-o'brien", (W,), message=job(actAs={"email": "o'brien@contoso.com"}),
        author="o'brien@contoso.com"),
    Row("no-actor-application-user", (W,), message=job(actAs=None), author=APP),
    # --- the message ----------------------------------------------------------------------------
    Row("message-not-json", (DeadLettered("invalid_json"),), message=b"{not json", records=0, author=None),
    Row("message-not-utf8", (DeadLettered("invalid_json"),), message=b'{"id": "\xff"}', records=0,
        author=None),
    Row("message-breaks-schema", (DeadLettered("invalid_job"),),
        message={k if k != "actAs" else "actas": v for k, v in job().items()}, records=0, author=None),
    # A record embedding a job over the limit can never fit on a queue either: the original goes to -poison.
    Row("message-over-size-limit", (Raised("dead_letter_too_large", False),),
        message=job(data={"description": "x" * MAX_JOB_BYTES}), records=0, author=None),
    Row("message-dead-letter-would-not-fit", (Raised("dead_letter_too_large", False),),
        message=b"\x01" * (MAX_JOB_BYTES - 10), records=0, author=None),
    # --- who put the message on the queue (issue 8): only what the webhook (or queuectl) signed ---
    Row("message-unsigned", (DeadLettered("unauthenticated_message"),), message=unsigned, records=0,
        author=None, check=no_write_sent),
    Row("message-tampered", (DeadLettered("unauthenticated_message"),), message=tampered, records=0,
        author=None, check=no_write_sent),
    Row("message-wrong-key", (DeadLettered("unauthenticated_message"),), message=wrong_key, records=0,
        author=None, check=no_write_sent),
    Row("message-signed-for-another-source", (DeadLettered("unauthenticated_message"),),
        message=other_source, records=0, author=None, check=no_write_sent),
    # --- at-least-once delivery -----------------------------------------------------------------
    Row("duplicate-upsert", (W, W), check=writes_sent(2)),
    Row("duplicate-keyless-create", (W, W0), message=job(operation="create", key=None)),
    Row("duplicate-delete", (W, W0), message=job(operation="delete", key=RECORD_ID, data=None),
        arrange=existing_contact(record_id=RECORD_ID), records=0, author=None),
]


# --- secrets and tokens seen on the wire --------------------------------------------------------


class WireSecrets:
    """Every credential that crossed the wire: bearer tokens sent, tokens and secrets received."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.secrets: set[str] = set()

    def send(self, original: Callable[..., requests.Response], adapter: HTTPAdapter,
             request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        auth = request.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            self.tokens.add(auth[7:].strip())
        identity = request.headers.get("X-IDENTITY-HEADER")
        if identity:
            self.secrets.add(identity)
        response = original(adapter, request, *args, **kwargs)
        if not kwargs.get("stream") and "json" in response.headers.get("Content-Type", ""):
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                if isinstance(body.get("access_token"), str):
                    self.tokens.add(body["access_token"])
                if "/secrets/" in (request.url or "") and isinstance(body.get("value"), str):
                    self.secrets.add(body["value"])
        return response

    def all(self) -> set[str]:
        return {v for v in self.tokens | self.secrets if len(v) >= 8}


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> WireSecrets:
    seen = WireSecrets()
    original = HTTPAdapter.send

    def send(adapter: HTTPAdapter, request: requests.PreparedRequest, *args: Any,
             **kwargs: Any) -> requests.Response:
        return seen.send(original, adapter, request, *args, **kwargs)

    monkeypatch.setattr(HTTPAdapter, "send", send)
    return seen


def record_texts(record: logging.LogRecord) -> Iterator[str]:
    yield record.getMessage()
    if record.exc_text:
        yield record.exc_text
    if record.exc_info:
        yield logging.Formatter().formatException(record.exc_info)
    if record.stack_info:
        yield record.stack_info


# --- the queue trigger, as the host calls it ----------------------------------------------------


@dataclass
class Delivery:
    message: bytes
    outcome: Outcome
    dead_letter: dict[str, Any] | None


DELIVERIES: list[Delivery] = []
RESULTS: list[WriteResult] = []


def deliver(message: Message, dequeue_count: int = 1) -> Outcome:
    body = encode(message)
    out = Out()
    msg = QueueMessage(  # type: ignore[no-untyped-call]
        id=f"msg-{uuid.uuid4().hex[:8]}", body=body, dequeue_count=dequeue_count)
    written_before = len(RESULTS)
    try:
        function_app.sync_job(msg, out)
    except SyncError as exc:
        assert out.sets == [], "a delivery that raises must not dead-letter as well"
        outcome: Outcome = Raised(exc.code, exc.transient)
        DELIVERIES.append(Delivery(body, outcome, None))
        return outcome
    if not out.sets:
        assert len(RESULTS) == written_before + 1, "a completed delivery wrote exactly once"
        written = Written(noop=RESULTS[-1].noop)
        DELIVERIES.append(Delivery(body, written, None))
        return written
    assert len(out.sets) == 1, "one dead-letter message per delivery"
    (text,) = out.sets[0]
    record = json.loads(text)
    DELIVERIES.append(Delivery(body, DeadLettered(record["reason"]), record))
    return DeadLettered(record["reason"])


# --- the matrix ---------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps each WriteResult, to tell a write from a no-op (a replayed create, a delete of nothing)."""
    original = shared.jobs.run_job

    def run_job(job: shared.contract.Job, runtime: shared.runtime.Runtime) -> WriteResult:
        result = original(job, runtime)
        RESULTS.append(result)
        return result

    monkeypatch.setattr(shared.jobs, "run_job", run_job)
    RESULTS.clear()
    DELIVERIES.clear()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_fault_matrix(
    row: Row,
    sandbox_env: SandboxClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    wire: WireSecrets,
    spy: None,
) -> None:
    sbx = sandbox_env
    for name, value in row.settings.items():
        monkeypatch.setenv(name, value)
    reset_runtime()
    webhook_key = random_secrets.token_urlsafe(32)
    sbx.set_secret(WEBHOOK_SECRET_NAME, webhook_key)
    MESSAGE_KEY[0] = message_key(sbx)
    for name in ("", "shared", "azure", "msal", "urllib3", "function_app"):
        caplog.set_level(logging.DEBUG, logger=name or None)
    logs.install()  # as in Azure, where the worker's handler exists when the app is imported
    ctx = Ctx(sbx, monkeypatch)

    row.arrange(ctx)
    arranged = len(DELIVERIES)
    message = encode(row.message)
    outcomes = tuple(deliver(message, n) for n in range(1, len(row.outcomes) + 1))

    # 1. the outcome of every delivery
    assert outcomes == row.outcomes
    for delivery in DELIVERIES[arranged:]:
        if delivery.dead_letter is not None:
            check_dead_letter(delivery.dead_letter, delivery.message)

    # 2. Dataverse: exactly the expected records, none duplicated, written by the actor
    records = sbx.records("contacts")
    assert len(records) == row.records, records
    assert len({r["contactid"] for r in records}) == len(records)
    emails = [r.get("emailaddress1") for r in records if r.get("emailaddress1")]
    assert len(set(emails)) == len(emails), "duplicate alternate key"
    if row.author is not None:
        author = ctx.user_id(row.author)
        on_behalf_of = None if row.author == APP else ctx.app_user_id
        for record in records:
            assert record["_createdby_value"] == author
            assert record["_modifiedby_value"] == author
            assert record["_createdonbehalfby_value"] == on_behalf_of
            assert record["_modifiedonbehalfby_value"] == on_behalf_of
    data = row.message.get("data") if isinstance(row.message, Mapping) else None
    if data and isinstance(outcomes[-1], Written) and records:
        (record,) = records
        assert {name: record.get(name) for name in data} == data
    row.check(ctx, sbx.counters())

    # 3. no secret, no token in any log record (nor in a dead-letter message)
    credentials = wire.all() | {webhook_key, sbx.identity_header, MESSAGE_KEY[0]}
    if any(isinstance(o, Written) for o in outcomes):
        assert wire.tokens and wire.secrets, "the leak check saw no credential: it would prove nothing"
    for log_record in caplog.get_records("call"):
        for text in record_texts(log_record):
            for credential in credentials:
                assert credential not in text, f"{log_record.name} logged a credential: {text[:300]!r}"
    for delivery in DELIVERIES:
        for credential in credentials:
            assert credential not in json.dumps(delivery.dead_letter or {})


def check_dead_letter(record: dict[str, Any], message: bytes) -> None:
    """The documented dead-letter shape, carrying the job exactly as it arrived."""
    assert set(record) == {"job", "reason", "detail", "failedAt"}
    assert isinstance(record["detail"], str) and record["detail"]
    assert datetime.fromisoformat(record["failedAt"].replace("Z", "+00:00")).tzinfo is not None
    text = message.decode("utf-8", errors="replace")
    try:
        original: Any = json.loads(text.removeprefix("\ufeff"))
    except ValueError:
        original = text
    assert record["job"] == original
