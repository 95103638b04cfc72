"""The Dataverse Web API client: one pooled session, bounded retries, errors as data, safe writes.

Why each rule is here:

* One ``requests.Session`` per instance with a pool of 64: a warm instance runs 24+ jobs at
  once and a new TLS connection per call would cost more than the call.
* No cookies: Dataverse sets an ``ARRAffinity`` cookie that pins a client to one web server;
  service-protection limits are per server, so dropping it spreads the load (Microsoft's advice).
* Retries: 429 and 503 carry ``Retry-After`` and it is obeyed; 502/503/504, timeouts and broken
  connections back off exponentially with full jitter.  Both stop at ``DATAVERSE_MAX_RETRIES``
  retries and ``DATAVERSE_MAX_RETRY_SECONDS`` of waiting: the last error is raised as transient,
  and the queue's own retry takes over.  A wait that would pass the invocation's deadline
  (``shared.deadline``: a job's ``JOB_DEADLINE_SECONDS``, an HTTP trigger's ``HTTP_MAX_WAIT_SECONDS``)
  is not started at all.  A request that may have reached the server is resent
  only when it is idempotent; a keyless ``POST`` (create) is not, so a timeout or a gateway's
  502/503/504 never creates a record twice (a 429 is safe: throttling refuses before running).
* Every send goes through the deployment's throttle (:mod:`shared.throttle`): all instances wait
  out a 429 window one of them was given, and in-flight requests per instance adapt (AIMD).
* 401: the token is dropped and the request sent once more with a new one.
* Impersonated writes ask for ``_modifiedby_value`` back and compare it with the actor:
  Dataverse silently runs a write as the application user when it does not recognise the caller.
* Every value put into a URL is an escaped OData literal, percent-encoded; query strings are
  built here (``requests``' ``params=`` would write a space as ``+``).
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json as jsonlib
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from shared.deadline import budget as wait_budget
from shared.deadline import current as current_deadline
from shared.errors import DataverseError, ImpersonationNotApplied, fix_for, unknown_column
from shared.logs import job_logger
from shared.odatabatch import BatchFormatError, BatchOperation, BatchPart
from shared.odatabatch import build as build_batch
from shared.odatabatch import parse as parse_batch
from shared.singleflight import SingleFlight
from shared.throttle import DeploymentThrottle, NoThrottle

if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.tokens import TokenProvider

logger = logging.getLogger("shared.dataverse")

POOL_CONNECTIONS = 4
POOL_MAXSIZE = 64
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
# 429 is service protection refusing the request before running it; a 502/503/504 from a gateway
# may come after the server applied it, so a non-idempotent request is not resent after one.
NOT_EXECUTED_STATUSES = frozenset({429})
RECORD_NOT_FOUND_CODE = "0x80040217"
KEY_NOT_FOUND_CODE = "0x80060891"  # no record has these alternate key values
GONE_CODES = frozenset({RECORD_NOT_FOUND_CODE, KEY_NOT_FOUND_CODE})
DUPLICATE_RECORD_CODE = "0x80040237"  # If-None-Match: * and the target record exists
MODIFIED_BY = "_modifiedby_value"

_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_GUID_IN_URL_RE = re.compile(r"\((" + _GUID_PATTERN + r")\)\s*$")


@dataclass(frozen=True)
class Caller:
    """Who a write is on behalf of."""

    systemuserid: str
    azure_ad_object_id: str | None = None  # -> CallerObjectId when set, else MSCRMCallerID

    def headers(self) -> dict[str, str]:
        if self.azure_ad_object_id:
            return {"CallerObjectId": self.azure_ad_object_id}
        return {"MSCRMCallerID": self.systemuserid}


@dataclass(frozen=True)
class WriteResult:
    operation: str  # create | update | upsert | delete
    entity_set: str
    record_id: str | None
    status: int  # HTTP status Dataverse answered (e.g. 204, 201, 200, 412, 404)
    created: bool | None  # upsert/create: True if created
    noop: bool  # 412 on keyed create (already there) / 404 on delete (already gone)
    modified_by: str | None  # _modifiedby_value read back on impersonated writes

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "entitySet": self.entity_set,
            "recordId": self.record_id,
            "status": self.status,
            "created": self.created,
            "noop": self.noop,
            "modifiedBy": self.modified_by,
        }


@dataclass(frozen=True)
class TableInfo:
    """What the bulk writes need to know of a table besides its entity set."""

    entity_set: str
    logical_name: str
    primary_id: str


# --- URL building -------------------------------------------------------------------------------


def _bad_request(message: str) -> DataverseError:
    return DataverseError(message, code="dataverse_bad_request", transient=False)


def _guid(value: object) -> str | None:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            parsed = uuid.UUID(value.strip())
        except ValueError:
            return None
        # uuid.UUID also takes braces, "urn:uuid:" and bare hex: Dataverse only the 8-4-4-4-12 form
        if str(parsed) == value.strip().lower():
            return str(parsed)
    return None


def odata_literal(value: str | int | float | bool | uuid.UUID | None) -> str:
    """The OData literal for ``value``: ``'O''Brien'``, ``42``, ``true``, ``null``, a bare GUID.

    Not URL-encoded: that is a separate step (:func:`encode_query`, :func:`entity_path`).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _bad_request(f"{value!r} has no OData literal")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise _bad_request(f"a {type(value).__name__} cannot be written as an OData literal")


def _key_literal(value: object) -> str:
    if isinstance(value, str):
        return "'" + quote(value.replace("'", "''"), safe="") + "'"
    return quote(odata_literal(value), safe="")  # type: ignore[arg-type]


def entity_path(entity_set: str, key: str | uuid.UUID | Mapping[str, object]) -> str:
    """``contacts(<guid>)`` or ``contacts(emailaddress1='o''brien%40example.com')``, ready for a URL."""
    if not _IDENTIFIER_RE.match(entity_set):
        raise _bad_request(f"{entity_set!r} is not an entity set name")
    if isinstance(key, str | uuid.UUID):
        guid = _guid(key)
        if guid is None:
            raise _bad_request(f"the primary key of {entity_set} must be a GUID, got {key!r}")
        return f"{entity_set}({guid})"
    if not isinstance(key, Mapping) or not key:
        raise _bad_request(f"the alternate key of {entity_set} must be a non-empty object")
    parts = []
    for name, value in key.items():
        if not isinstance(name, str) or not _IDENTIFIER_RE.match(name):
            raise _bad_request(f"{name!r} is not an attribute name")
        if isinstance(value, dict | list | tuple):
            raise _bad_request(f"the key value of {name} must be a string, number, boolean or null")
        parts.append(f"{name}={_key_literal(value)}")
    return f"{entity_set}({','.join(parts)})"


def encode_query(params: Mapping[str, str]) -> str:
    """``$filter=internalemailaddress%20eq%20'…'`` style: every reserved character percent-encoded."""
    return "&".join(f"{quote(str(k), safe='$')}={quote(str(v), safe='')}" for k, v in params.items())


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Accept no cookie and send none (the ARRAffinity cookie pins us to one web server)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def new_session() -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=POOL_CONNECTIONS, pool_maxsize=POOL_MAXSIZE, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.cookies.set_policy(_NoCookies())
    return session


# --- the client ---------------------------------------------------------------------------------


class DataverseClient:
    """Dataverse Web API calls as the application user, optionally on behalf of a ``Caller``."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenProvider,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        throttle: DeploymentThrottle | NoThrottle | None = None,
    ) -> None:
        self._settings = settings
        self.throttle = throttle if throttle is not None else NoThrottle()
        self._tokens = tokens
        self._session = session if session is not None else new_session()
        if session is not None:
            self._session.cookies.set_policy(_NoCookies())
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._base = settings.api_base
        self._origin = settings.dataverse_url + "/"
        self.dop_hint: int | None = None
        self._tables: dict[str, TableInfo] = {}
        self._table_flight: SingleFlight[TableInfo] = SingleFlight()
        self._support_flight: SingleFlight[bool] = SingleFlight()
        self._message_support: dict[tuple[str, str], bool] = {}

    def close(self) -> None:
        self._session.close()

    # -- low level --------------------------------------------------------------------------------

    def url(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """Absolute URL of ``path`` (relative to the API base, or a ``@odata.nextLink``)."""
        if "://" in path:
            if not path.startswith(self._origin):
                # never send the bearer token anywhere but the environment
                raise DataverseError(
                    f"Dataverse returned a link outside {self._settings.dataverse_url}: {path[:200]!r}",
                    code="dataverse_malformed_response",
                    transient=True,
                )
            url = path
        else:
            url = self._base + path.lstrip("/")
        if params:
            url += ("&" if "?" in url else "?") + encode_query(params)
        return url

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: object = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        correlation_id: str | None = None,
        body: bytes | None = None,
    ) -> requests.Response:
        """Send one logical request (with its retries); a 2xx response or a :class:`DataverseError`.

        ``body`` sends raw bytes instead of ``json`` (``$batch``); its Content-Type comes in ``headers``.
        """
        method = method.upper()
        url = self.url(path, params)
        label = f"{method} {urlsplit(url).path.removeprefix('/api/data/' + self._settings.api_version + '/')}"
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        if json is not None:
            body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        log = job_logger(logger, correlation_id)
        settings = self._settings
        started = self._clock()
        retries = 0
        refreshed_token = False
        deadline = current_deadline()  # the invocation's (shared.deadline): waits never outlive it
        while True:
            if deadline is not None:
                deadline.check_start(label)
            token = self._tokens.get_token()
            if deadline is not None:  # the token fetch may itself have waited (Entra, Key Vault) past it
                deadline.check_start(label)
            sent_headers = self._headers(token, body is not None, headers)
            wait: float
            try:
                # The deployment's throttle: waits out a shared 429 window and for a concurrency
                # slot (bounded by what is left of the retry budget; beyond it: throttled, unsent).
                waited = self._clock() - started
                with self.throttle.slot(wait_budget(settings.max_retry_seconds - waited), label):
                    response = self._session.request(
                        method,
                        url,
                        data=body,
                        headers=sent_headers,
                        timeout=settings.timeout_seconds,
                        allow_redirects=False,
                    )
            except requests.RequestException as exc:
                error, may_have_arrived, retryable = self._transport_error(exc, label)
                if not retryable or (may_have_arrived and not idempotent):
                    if may_have_arrived and not idempotent:
                        log.warning("%s: %s; not resent: not idempotent, may have been applied", label, error)
                    raise error from exc
                wait = self._backoff(retries)
                status_text, code = type(exc).__name__, None
            else:
                self._note_dop_hint(response)
                status = response.status_code
                stated = _error_body(response) if status == 429 else (None, None)
                self.throttle.observe(status, parse_retry_after(response.headers.get("Retry-After")),
                                      self.dop_hint, *stated)
                if 200 <= status < 300:
                    return response
                if status == 401 and not refreshed_token:
                    refreshed_token = True
                    self._tokens.invalidate(token)
                    log.info("%s answered 401: fetching a new token and sending once more", label)
                    continue
                error = self._http_error(response, label)
                if status not in RETRY_STATUSES:
                    raise error
                if not idempotent and status not in NOT_EXECUTED_STATUSES:
                    log.warning("%s answered %s; not resent: not idempotent, may have been applied",
                                label, status)
                    raise error
                if status in RETRY_AFTER_STATUSES and error.retry_after is not None:
                    wait = error.retry_after
                else:
                    wait = self._backoff(retries)
                status_text, code = str(status), error.dataverse_code
            elapsed = self._clock() - started
            if retries >= settings.max_retries or elapsed + wait > settings.max_retry_seconds:
                log.warning(
                    "%s: %s (%s); giving up after %d retries and %.1fs (next wait %.2fs exceeds the budget)",
                    label,
                    status_text,
                    code,
                    retries,
                    elapsed,
                    wait,
                )
                raise error
            if deadline is not None:
                deadline.check_wait(wait, f"{label} answered {status_text} ({code})", error)
            retries += 1
            log.warning(
                "%s answered %s (code %s); retry %d/%d in %.2fs",
                label,
                status_text,
                code,
                retries,
                settings.max_retries,
                wait,
            )
            self._sleep(wait)

    def _headers(self, token: str, has_body: bool, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
            "Authorization": f"Bearer {token}",
        }
        if has_body:
            headers["Content-Type"] = "application/json; charset=utf-8"
        if extra:
            headers.update(extra)
        return headers

    def _backoff(self, retries: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^retries))."""
        return float(self._jitter() * min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0**retries))

    def _note_dop_hint(self, response: requests.Response) -> None:
        hint = response.headers.get("x-ms-dop-hint")
        if hint:
            with contextlib.suppress(ValueError):
                self.dop_hint = int(hint)

    def _transport_error(
        self, exc: requests.RequestException, label: str
    ) -> tuple[DataverseError, bool, bool]:
        """(error, may the request have reached the server, worth retrying in process)."""
        import urllib3.exceptions as u3

        timeout = self._settings.timeout_seconds
        if isinstance(exc, requests.exceptions.SSLError) and _certificate_problem(exc):
            message = f"{label}: the TLS certificate of {self._settings.dataverse_url} is not trusted"
            return DataverseError(message, code="dataverse_unreachable", transient=True), False, False
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            message = f"{label}: could not connect within {timeout:g}s"
            return DataverseError(message, code="dataverse_unreachable", transient=True), False, True
        if isinstance(exc, requests.exceptions.ReadTimeout):
            message = f"{label}: no answer within {timeout:g}s"
            return DataverseError(message, code="dataverse_unreachable", transient=True), True, True
        reason: object = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
        if isinstance(exc, requests.exceptions.ConnectionError) and isinstance(
            reason, u3.NewConnectionError | u3.ConnectTimeoutError
        ):
            message = f"{label}: could not connect to {self._settings.dataverse_url}"
            return DataverseError(message, code="dataverse_unreachable", transient=True), False, True
        message = f"{label}: the connection broke ({type(exc).__name__})"
        return DataverseError(message, code="dataverse_unreachable", transient=True), True, True

    def _fix(self, code: str) -> str:
        """The one fix text of ``code`` (shared.errors.FIXES), as /api/diagnostics shows it."""
        s = self._settings
        return fix_for(code, client_id=s.client_id, tenant_id=s.tenant_id, url=s.dataverse_url)

    def _http_error(self, response: requests.Response, label: str) -> DataverseError:
        status = response.status_code
        dataverse_code, text = _error_body(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        code = DataverseError.code_for(status, dataverse_code, text)
        details: list[dict[str, Any]] | None = None
        if text:
            detail = text
        elif response.content:
            kind = response.headers.get("Content-Type", "no content type")
            detail = f"a body that is not a Dataverse error ({kind})"
        else:
            detail = "an empty body"
        message = f"{label} answered {status} {response.reason or ''}".rstrip() + f": {detail}"
        if code == "impersonation_privilege_missing":
            message = (
                f"{label} answered 403 {dataverse_code}: the application user may not act on behalf of "
                f"other users. {self._fix(code)}"
            )
        elif code == "entity_not_found":
            entity_set = label.split(" ", 1)[-1].split("(", 1)[0]
            message = (
                f"{label} answered 404 {dataverse_code}: the environment has no entity set "
                f"'{entity_set}'. {self._fix(code)} Dataverse said: {detail}"
            )
        elif code == "invalid_column":
            column, type_name = unknown_column(text) or ("?", "?")
            message = (
                f"data.{column}: {label} answered 400: table {type_name} has no column '{column}'. "
                f"{self._fix(code)} Dataverse said: {detail}"
            )
            details = [{"field": f"data.{column}", "message": f"{type_name} has no column '{column}'"}]
        elif status == 401:
            message = (
                f"{label} answered 401 twice, the second time with a new token: Dataverse does not "
                f"accept the application. {self._fix('dataverse_unauthorized')}"
                + (f" {detail}" if text else "")
            )
        return DataverseError(
            message, status=status, dataverse_code=dataverse_code, code=code, retry_after=retry_after,
            details=details,
        )

    @staticmethod
    def _json(response: requests.Response, label: str) -> Any:
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type")
            raise DataverseError(
                f"{label} answered {response.status_code} with a body that is not JSON ({kind}, "
                f"{len(response.content)} bytes)",
                status=response.status_code,
                code="dataverse_malformed_response",
                transient=True,
            ) from None

    # -- reads ------------------------------------------------------------------------------------

    def get_json(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> dict[str, Any]:
        response = self.request("GET", path, params=params, headers=headers, correlation_id=correlation_id)
        label = f"GET {path.split('?')[0][:100]}"
        data = self._json(response, label)
        if not isinstance(data, dict):
            raise DataverseError(
                f"{label} answered JSON that is not an object",
                status=response.status_code,
                code="dataverse_malformed_response",
                transient=True,
            )
        return data

    def iter_pages(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        page_size: int = 5000,
        correlation_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Each page (``{"value": [...], "@odata.nextLink": ...}``), following nextLink verbatim."""
        headers = {"Prefer": f"odata.maxpagesize={int(page_size)}"}
        url = self.url(path, params)
        seen: set[str] = set()
        while True:
            seen.add(url)
            page = self.get_json(url, headers=headers, correlation_id=correlation_id)
            if not isinstance(page.get("value", []), list):
                raise DataverseError(
                    f"GET {path}: 'value' is not a list", code="dataverse_malformed_response", transient=True
                )
            yield page
            next_link = page.get("@odata.nextLink")
            if not next_link:
                return
            if not isinstance(next_link, str) or next_link in seen:
                raise DataverseError(
                    f"GET {path}: @odata.nextLink repeats or is not a URL",
                    code="dataverse_malformed_response",
                    transient=True,
                )
            url = next_link

    def whoami(self, *, correlation_id: str | None = None) -> dict[str, Any]:
        return self.get_json("WhoAmI", correlation_id=correlation_id)

    # -- writes -----------------------------------------------------------------------------------

    def create(
        self,
        entity_set: str,
        data: Mapping[str, Any],
        *,
        key: str | Mapping[str, object] | None = None,
        caller: Caller | None = None,
        correlation_id: str | None = None,
    ) -> WriteResult:
        """With a key: PATCH + If-None-Match (412 = already there, a no-op). Without: POST, never resent."""
        if key is None:
            return self._write(
                "create",
                "POST",
                entity_set,
                entity_set,
                None,
                data,
                {},
                caller,
                correlation_id,
                idempotent=False,
            )
        path = entity_path(entity_set, key)
        try:
            return self._write(
                "create", "PATCH", entity_set, path, key, data, {"If-None-Match": "*"}, caller, correlation_id
            )
        except DataverseError as exc:
            # Only "the target record exists" is a replay. A 412 for an alternate key held by
            # ANOTHER record (0x80060892) wrote nothing and must not pass for "already there", nor
            # may a 412 without Dataverse's code (a proxy's answer proves nothing about the record).
            if exc.status != 412 or (exc.dataverse_code or "").lower() != DUPLICATE_RECORD_CODE:
                raise
            job_logger(logger, correlation_id).info("%s already exists: nothing created", path)
            return WriteResult("create", entity_set, _guid(key), 412, False, True, None)

    def update(
        self,
        entity_set: str,
        key: str | Mapping[str, object],
        data: Mapping[str, Any],
        *,
        caller: Caller | None = None,
        correlation_id: str | None = None,
        if_match: str | None = None,
    ) -> WriteResult:
        """PATCH + If-Match: * — never creates; a missing record is a permanent ``record_not_found``.

        ``if_match`` (an ETag) instead: only that version is overwritten; a newer one answers 412
        (``precondition_failed``, permanent).
        """
        path = entity_path(entity_set, key)
        headers = {"If-Match": if_match or "*"}
        return self._write("update", "PATCH", entity_set, path, key, data, headers, caller, correlation_id)

    def upsert(
        self,
        entity_set: str,
        key: str | Mapping[str, object],
        data: Mapping[str, Any],
        *,
        caller: Caller | None = None,
        correlation_id: str | None = None,
        if_match: str | None = None,
    ) -> WriteResult:
        """PATCH; with ``if_match`` (an ETag) only that version is overwritten (412 otherwise)."""
        path = entity_path(entity_set, key)
        headers = {"If-Match": if_match} if if_match else {}
        return self._write("upsert", "PATCH", entity_set, path, key, data, headers, caller, correlation_id)

    def delete(
        self,
        entity_set: str,
        key: str | Mapping[str, object],
        *,
        caller: Caller | None = None,
        correlation_id: str | None = None,
        if_match: str | None = None,
    ) -> WriteResult:
        """DELETE; a record that is already gone (404 record not found) is a success, ``noop=True``.

        With ``if_match`` (an ETag) only that version is deleted; a newer one answers 412.
        """
        path = entity_path(entity_set, key)
        headers = caller.headers() if caller else {}
        if if_match:
            headers = {**headers, "If-Match": if_match}
        try:
            response = self.request("DELETE", path, headers=headers, correlation_id=correlation_id)
        except DataverseError as exc:
            # Only Dataverse's own "no such record" is "already gone": a 404 without its code (a wrong
            # path, a gateway's page) says nothing about the record, and taking it as done would
            # lose the delete without a trace.
            if exc.status != 404 or (exc.dataverse_code or "").lower() not in GONE_CODES:
                raise
            job_logger(logger, correlation_id).info("%s was already gone", path)
            return WriteResult("delete", entity_set, _guid(key), 404, None, True, None)
        return WriteResult("delete", entity_set, _guid(key), response.status_code, None, False, None)

    def _write(
        self,
        operation: str,
        method: str,
        entity_set: str,
        path: str,
        key: str | Mapping[str, object] | None,
        data: Mapping[str, Any],
        headers: dict[str, str],
        caller: Caller | None,
        correlation_id: str | None,
        *,
        idempotent: bool | None = None,
    ) -> WriteResult:
        params = None
        if caller is not None:
            headers = {**headers, **caller.headers(), "Prefer": "return=representation"}
            params = {"$select": MODIFIED_BY}
        response = self.request(
            method,
            path,
            params=params,
            json=dict(data),
            headers=headers,
            idempotent=idempotent,
            correlation_id=correlation_id,
        )
        status = response.status_code
        body: dict[str, Any] | None = None
        if response.content:
            parsed = self._json(response, f"{method} {path}")
            body = parsed if isinstance(parsed, dict) else None
        record_id = _guid(key) if key is not None else None
        record_id = record_id or _id_from_headers(response) or _id_from_body(body, entity_set)
        created: bool | None
        if operation == "create":
            created = True
        elif operation == "upsert":
            created = True if status == 201 else False if status == 200 else None
        else:
            created = None
        modified_by = body.get(MODIFIED_BY) if body else None
        result = WriteResult(operation, entity_set, record_id, status, created, False, modified_by)
        if caller is not None:
            _verify_impersonation(result, caller, path)
        return result


    # -- bulk writes (issue 9): capability lookups, bulk messages, $batch ---------------------------

    def table_info(self, entity_set: str, *, correlation_id: str | None = None) -> TableInfo:
        """The table's logical name and primary id column (``contact``/``contactid`` for ``contacts``),
        cached per instance: ``sdkmessagefilters`` and the bulk messages' ``@odata.type`` use the
        logical name, while jobs name tables by entity set."""
        cached = self._tables.get(entity_set)
        if cached is not None:
            return cached
        if not _IDENTIFIER_RE.match(entity_set):
            raise _bad_request(f"{entity_set!r} is not an entity set name")
        # concurrent cold jobs share one lookup
        return self._table_flight.do(entity_set, lambda: self._fetch_table_info(entity_set, correlation_id))

    def _fetch_table_info(self, entity_set: str, correlation_id: str | None) -> TableInfo:
        page = self.get_json(
            "EntityDefinitions",
            {
                "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
                "$filter": f"EntitySetName eq {odata_literal(entity_set)}",
            },
            correlation_id=correlation_id,
        )
        rows = page.get("value")
        found = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
        logical = found[0].get("LogicalName") if len(found) == 1 else None
        primary = found[0].get("PrimaryIdAttribute") if len(found) == 1 else None
        if not isinstance(logical, str) or not isinstance(primary, str) or not logical or not primary:
            raise DataverseError(
                f"no table has the entity set {entity_set!r} in this environment",
                status=404, code="dataverse_bad_request", transient=False,
            )
        info = TableInfo(entity_set, logical, primary)
        self._tables[entity_set] = info
        return info

    def supports_message(self, entity_set: str, message: str, *, correlation_id: str | None = None) -> bool:
        """Whether the table supports ``message`` (e.g. ``CreateMultiple``): Learn's documented test,
        one ``sdkmessagefilters`` row for that message and table.  Cached per instance (tables gain
        messages with platform updates, not between two jobs)."""
        key = (entity_set, message)
        cached = self._message_support.get(key)
        if cached is not None:
            return cached
        if not _IDENTIFIER_RE.match(message):
            raise _bad_request(f"{message!r} is not a message name")
        return self._support_flight.do(key, lambda: self._fetch_support(entity_set, message, correlation_id))

    def _fetch_support(self, entity_set: str, message: str, correlation_id: str | None) -> bool:
        table = self.table_info(entity_set, correlation_id=correlation_id).logical_name
        page = self.get_json(
            "sdkmessagefilters",
            {
                "$select": "sdkmessagefilterid",
                "$filter": f"sdkmessageid/name eq {odata_literal(message)} "
                f"and primaryobjecttypecode eq {odata_literal(table)}",
            },
            correlation_id=correlation_id,
        )
        rows = page.get("value")
        supported = isinstance(rows, list) and len(rows) > 0
        self._message_support[(entity_set, message)] = supported
        return supported

    def bulk_message(
        self,
        message: str,
        entity_set: str,
        targets: list[dict[str, Any]],
        *,
        caller: Caller | None = None,
        correlation_id: str | None = None,
    ) -> dict[str, Any] | None:
        """POST ``<entity_set>/Microsoft.Dynamics.CRM.<message>`` with ``{"Targets": [...]}``.

        Every target our callers send names its record (a primary id, a deterministic id for a keyless
        create, or ``@odata.id``), so a resend after a gateway error cannot create a second record:
        it fails as a duplicate instead, and the caller's per-record fallback reports it as done.
        Returns the response body (``{"Ids": [...]}``) or None (204).
        """
        if not _IDENTIFIER_RE.match(entity_set) or not _IDENTIFIER_RE.match(message):
            raise _bad_request(f"{entity_set!r}/{message!r} is not an entity set and message name")
        headers = caller.headers() if caller else {}
        response = self.request(
            "POST",
            f"{entity_set}/Microsoft.Dynamics.CRM.{message}",
            json={"Targets": targets},
            headers=headers,
            idempotent=True,
            correlation_id=correlation_id,
        )
        if not response.content:
            return None
        parsed = self._json(response, f"POST {entity_set}/{message}")
        return parsed if isinstance(parsed, dict) else None

    def batch(
        self,
        operations: list[BatchOperation],
        *,
        caller: Caller | None = None,
        continue_on_error: bool = True,
        change_set: bool = False,
        correlation_id: str | None = None,
    ) -> list[BatchPart]:
        """POST ``$batch``; one answer per operation, in order.

        ``continue_on_error`` (``Prefer: odata.continue-on-error``) makes Dataverse run every request
        and answer 200 with each one's own status; without it the first failure ends the batch.
        Only idempotent operations may be batched here: a broken connection resends the whole batch.
        """
        content_type, body = build_batch(operations, change_set=change_set)
        headers = {"Content-Type": content_type, **(caller.headers() if caller else {})}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        response = self.request(
            "POST", "$batch", body=body, headers=headers, idempotent=True, correlation_id=correlation_id
        )
        try:
            return parse_batch(response.headers.get("Content-Type"), response.content)
        except BatchFormatError as exc:
            raise DataverseError(
                f"POST $batch answered {response.status_code} with a body that is not a batch: {exc}",
                status=response.status_code, code="dataverse_malformed_response", transient=True,
            ) from None

    def part_error(self, part: BatchPart, label: str) -> DataverseError:
        """The :class:`DataverseError` of one failed answer inside a batch (same codes as a request)."""
        code_text, text = None, None
        try:
            data = part.json()
        except ValueError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            code_text = error.get("code") if isinstance(error.get("code"), str) else None
            text = error.get("message") if isinstance(error.get("message"), str) else None
        code = DataverseError.code_for(part.status, code_text)
        message = f"{label} answered {part.status} {part.reason}".rstrip() + f": {text or 'no error body'}"
        return DataverseError(message, status=part.status, dataverse_code=code_text, code=code)


def _certificate_problem(exc: BaseException) -> bool:
    """A certificate that will not verify (no point retrying), as opposed to a TLS stream cut short."""
    import ssl

    seen: set[int] = set()
    queue: list[object] = [exc]
    while queue:
        current = queue.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        queue.extend(
            [current.__cause__, current.__context__, *current.args, getattr(current, "reason", None)]
        )
    return False


def _error_body(response: requests.Response) -> tuple[str | None, str | None]:
    try:
        data = response.json()
    except ValueError:
        return None, None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, None
    code = error.get("code")
    message = error.get("message")
    return (code if isinstance(code, str) and code else None), (
        message if isinstance(message, str) and message else None
    )


def _id_from_headers(response: requests.Response) -> str | None:
    for name in ("OData-EntityId", "Location"):
        value = response.headers.get(name)
        if value:
            match = _GUID_IN_URL_RE.search(value)
            if match:
                return match.group(1).lower()
    return None


def _id_from_body(body: Mapping[str, Any] | None, entity_set: str) -> str | None:
    """The primary id Dataverse returns with a representation (``contactid`` for ``contacts``…)."""
    if not body:
        return None
    singular = entity_set[:-1] if entity_set.endswith("s") else entity_set
    preferred = _guid(body.get(f"{singular}id"))
    if preferred:
        return preferred
    candidates = [
        guid
        for name, value in body.items()
        if not name.startswith(("_", "@")) and name.endswith("id") and (guid := _guid(value)) is not None
    ]
    return candidates[0] if len(candidates) == 1 else None


def verify_impersonation(result: WriteResult, caller: Caller, path: str) -> None:
    """Raise :class:`ImpersonationNotApplied` unless ``result.modified_by`` is the caller (bulk writes
    check each ``$batch`` answer with it)."""
    _verify_impersonation(result, caller, path)


def _verify_impersonation(result: WriteResult, caller: Caller, path: str) -> None:
    """Dataverse ignores a caller id it does not know and writes as the application user: catch it."""
    actual = result.modified_by
    if actual is not None and actual.lower() == caller.systemuserid.lower():
        return
    header = "CallerObjectId " + caller.azure_ad_object_id if caller.azure_ad_object_id else "MSCRMCallerID"
    if actual is None:
        # Nothing says who wrote it: the operator must not be told it ran as the application user.
        detail = (
            "Dataverse did not return _modifiedby_value, so the actor cannot be confirmed; the write "
            "was applied, on behalf of someone this client cannot name"
        )
    else:
        detail = (
            f"Dataverse recorded the write as {actual}, not as the actor {caller.systemuserid}. Dataverse "
            f"silently ignores a caller it does not recognise ({header}) and runs the write as the "
            "application user"
        )
    raise ImpersonationNotApplied(
        f"{result.operation} of {path} was not done on behalf of the actor: {detail}.",
        details=[
            {
                "entitySet": result.entity_set,
                "recordId": result.record_id,
                "expected": caller.systemuserid,
                "actual": actual,
                "status": result.status,
            }
        ],
    )
