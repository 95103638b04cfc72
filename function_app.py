"""The Function App's table of contents: each trigger adapts its input, calls one function in shared/,
and maps the outcome onto the binding or the HTTP response.

Importing this module must never touch the network or read a setting (a failing import shows in Azure
only as "0 functions found"): the runtime is built lazily, inside the first trigger that needs it.

No ``from __future__ import annotations`` here: the Functions worker reads these annotations at
runtime to pick its converters.  For the same reason ``Out[typing.List[str]]`` is spelled with
``typing.List`` — azure-functions 1.26 does not recognise ``list[str]`` as an iterable output type.
"""

import json
import logging
import math
import typing
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import azure.functions as func

import shared
from shared import deadline, logs
from shared.contract import dumps, error_body, is_email_address
from shared.diagnostics import run_diagnostics
from shared.errors import ActorError, ConfigurationError, SyncError
from shared.jobs import process_message
from shared.reconciliation import ROSTER_PATH, SNAPSHOT_PATH, run_reconciliation
from shared.settings import http_max_wait_seconds
from shared.webhooks import declared_too_large, receive_webhook

if TYPE_CHECKING:
    from collections.abc import Sequence

    from shared.contract import Job
    from shared.runtime import Runtime

logs.install()
log = logging.getLogger("function_app")

STORAGE = "AzureWebJobsStorage"
SYNC_QUEUE = "%SYNC_QUEUE_NAME%"
DEAD_LETTER_QUEUE = "%SYNC_QUEUE_NAME%-deadletter"

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


# --- helpers -----------------------------------------------------------------------------------


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        mimetype="application/json",
        charset="utf-8",
        headers=headers,
    )


def _error(
    status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> func.HttpResponse:
    return _json(status, error_body(code, message, details))


def _invalid_email() -> func.HttpResponse:
    return _error(400, "invalid_email", "the email query parameter must be an email address",
                  [{"field": "email", "message": "must be an email address"}])


def _guarded(name: str, handler: Callable[[], func.HttpResponse]) -> func.HttpResponse:
    """Every failure becomes the documented error body; a traceback never reaches the caller."""
    try:
        return handler()
    except ConfigurationError as exc:
        log.error("%s: %s", name, exc)
        return _json(500, {"error": exc.to_dict()})
    except SyncError as exc:
        log.warning("%s: %s", name, exc)
        if exc.transient:
            return _json(503, {"error": exc.to_dict()}, {"Retry-After": _retry_after(exc)})
        return _json(502, {"error": exc.to_dict()})
    except Exception:
        incident = str(uuid.uuid4())
        log.exception("%s: unexpected error (incident %s)", name, incident)
        return _error(500, "internal_error", f"unexpected error; the function's log has incident {incident}")


def _retry_after(error: SyncError, default: str = "5") -> str:
    """The seconds Dataverse asked for (rounded up), when the error carries them."""
    seconds = getattr(error, "retry_after", None)
    if isinstance(seconds, int | float) and math.isfinite(seconds):
        return str(max(1, math.ceil(seconds)))
    return default


def _http_wait_limit() -> typing.ContextManager[object]:
    """Inside it, a Dataverse wait longer than HTTP_MAX_WAIT_SECONDS becomes a 503 with Retry-After."""
    return deadline.within(http_max_wait_seconds(), kind=deadline.HTTP, setting="HTTP_MAX_WAIT_SECONDS")


def _runtime() -> "Runtime":
    from shared.runtime import get_runtime

    return get_runtime()


def _authorize(source: str, jobs: "Sequence[tuple[str, Job]]") -> "list[dict[str, Any]]":
    """The source's authorization policy applied to a valid batch (refusals; empty: all allowed)."""
    with _http_wait_limit():  # it may look actors up: throttling past the limit is a 503, not a wait
        refused: list[dict[str, Any]] = _runtime().policy.check_batch(source, jobs)
    return refused


def _blob_bytes(blob: Any) -> bytes | str | None:
    """A missing input blob arrives as None; otherwise an InputStream (or str/bytes from a local host)."""
    if blob is None or isinstance(blob, str | bytes):
        return blob
    data: bytes = blob.read()
    return data


# --- queue: sync jobs ----------------------------------------------------------------------------


@app.function_name("sync_job")
@app.queue_trigger(arg_name="msg", queue_name=SYNC_QUEUE, connection=STORAGE)
@app.queue_output(arg_name="deadletter", queue_name=DEAD_LETTER_QUEUE, connection=STORAGE)
def sync_job(msg: func.QueueMessage, deadletter: func.Out[typing.List[str]]) -> None:  # noqa: UP006
    """Write one job; a permanent failure -> -deadletter, a transient one raises (retry, then -poison).

    A bulk job dead-letters one record per failed record (the others are written)."""
    log.info("job message %s dequeue_count=%s", msg.id, msg.dequeue_count)
    outcome = process_message(msg.get_body(), _runtime)
    letters = outcome.dead_letters()
    if letters:
        deadletter.set([dumps(x) for x in letters])  # the texts whose size process_message checked


# --- HTTP ----------------------------------------------------------------------------------------


@app.function_name("webhook")
@app.route(route="webhooks/{source}", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@app.queue_output(arg_name="jobs", queue_name=SYNC_QUEUE, connection=STORAGE)
def webhook(req: func.HttpRequest, jobs: func.Out[typing.List[str]]) -> func.HttpResponse:  # noqa: UP006
    """Signed batch of jobs -> one sealed queue message per job, all or nothing; a replay is 409."""

    def handle() -> func.HttpResponse:
        declared = declared_too_large(req.headers)
        if declared is not None:  # answered before req.get_body(): a huge body is never read
            return _json(declared.status, declared.body)
        source = req.route_params.get("source", "")
        result = receive_webhook(source, req.headers, req.get_body(), _runtime, authorize=_authorize)
        if result.status == 202:
            jobs.set(result.messages)
        return _json(result.status, result.body, result.headers or None)

    return _guarded("webhook", handle)


def _user_by_email(req: func.HttpRequest, *, everyone: bool) -> func.HttpResponse:
    def handle() -> func.HttpResponse:
        from shared.users import find_user  # imports requests: not at import time
        email = (req.params.get("email") or "").strip()
        if not is_email_address(email):
            return _invalid_email()
        try:
            with _http_wait_limit():
                user = find_user(_runtime().users, email, everyone=everyone)
        except ActorError as exc:
            status = 409 if exc.code == "actor_ambiguous" else 404 if exc.code == "actor_not_found" else 422
            return _json(status, {"error": exc.to_dict()})
        return _json(200, user.to_api())

    return _guarded("lookup_user_any" if everyone else "lookup_user", handle)


@app.function_name("lookup_user")
@app.route(route="users", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def lookup_user(req: func.HttpRequest) -> func.HttpResponse:
    """``GET /api/users?email=``: 200 the user, 404 none, 409 several share the address, 400 not an email.
    Disabled, application and non-interactive users answer 404, as if there were none."""
    return _user_by_email(req, everyone=False)


@app.function_name("lookup_user_any")
@app.route(route="users/any", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def lookup_user_any(req: func.HttpRequest) -> func.HttpResponse:
    """``GET /api/users/any?email=`` (admin key): like ``/api/users`` but shows every user.  A separate
    route because a function is not told which key was used (and routes starting ``admin`` are the host's)."""
    return _user_by_email(req, everyone=True)


@app.function_name("health")
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    """Liveness only: no dependency is called, so it answers even when the settings are wrong."""
    return _json(200, {"status": "ok", "version": shared.__version__})


@app.function_name("diagnostics")
@app.route(route="diagnostics", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def diagnostics(req: func.HttpRequest) -> func.HttpResponse:
    """Walk identity -> Key Vault -> Entra -> Dataverse -> impersonation; 200 when all pass, else 503."""

    def handle() -> func.HttpResponse:
        email = (req.params.get("email") or "").strip()
        if email and not is_email_address(email):
            return _invalid_email()
        credential = (req.params.get("credential") or "").strip().lower() or None  # try a mode first
        with _http_wait_limit():
            report = run_diagnostics(act_as={"email": email} if email else None, credential=credential)
        retry = {"Retry-After": str(report["retryAfter"])} if report.get("retryAfter") else None
        return _json(200 if report["ok"] else 503, report, retry)

    return _guarded("diagnostics", handle)


# --- timer: reconciliation -----------------------------------------------------------------------


@app.function_name("reconcile_users")
@app.timer_trigger(arg_name="timer", schedule="%RECONCILE_SCHEDULE%", run_on_startup=False, use_monitor=True)
@app.blob_input(arg_name="roster", path=ROSTER_PATH, connection=STORAGE, data_type=func.DataType.STRING)
@app.blob_input(arg_name="previous", path=SNAPSHOT_PATH, connection=STORAGE, data_type=func.DataType.STRING)
@app.blob_output(arg_name="snapshot", path=SNAPSHOT_PATH, connection=STORAGE, data_type=func.DataType.STRING)
@app.blob_output(
    arg_name="report", path="reconciliation/reports/{DateTime}.json", connection=STORAGE,
    data_type=func.DataType.STRING,
)
def reconcile_users(
    timer: func.TimerRequest,
    roster: func.InputStream,
    previous: func.InputStream,
    snapshot: func.Out[str],
    report: func.Out[str],
) -> None:
    """All users once -> new snapshot + report; the instance's user cache is refreshed on the way."""
    if timer.past_due:
        log.warning("reconcile_users is running late (past_due)")
    new_snapshot, new_report = run_reconciliation(
        _runtime(), _blob_bytes(roster), _blob_bytes(previous), now=datetime.now(UTC)
    )
    snapshot.set(new_snapshot)
    report.set(json.dumps(new_report, indent=2, ensure_ascii=False) + "\n")
