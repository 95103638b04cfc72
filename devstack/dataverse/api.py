"""Dataverse Web API emulator, the HTTP side: one Flask app routes ``/api/data/v9.2/...`` to a sandbox's
``Org``.

Parses the request (OData path, query options, headers such as ``Prefer``, ``If-Match``, ``CallerObjectId``),
checks the bearer token, resolves the caller (impersonation), asks the ``Org`` to admit the request (service
protection), and renders Dataverse's wire format:
error bodies with hex codes, ``@odata.nextLink`` with an opaque ``$skiptoken``, ``OData-EntityId``, the
ARRAffinity cookie.  The state it reads and writes is ``devstack.dataverse.state``; bulk messages and
``$batch`` are ``devstack.dataverse.bulk`` (dispatched from ``_Request.dispatch``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import jwt
from flask import Flask, Response, request

from devstack import web
from devstack.dataverse import odata, security
from devstack.dataverse.state import (
    _GUID_RE,
    _IDENT_RE,
    CODE_DUPLICATE,
    CODE_KEY_NOT_FOUND,
    CODE_NOT_FOUND,
    CODE_ODATA,
    CODE_PAYLOAD,
    CODE_SEGMENT,
    CODE_VERSION_MISMATCH,
    SERVICE,
    SYSTEMUSER_FIELDS,
    SYSTEMUSER_TYPES,
    Caller,
    DataverseError,
    Org,
    Table,
    _lower_guid,
    _norm_key,
)
from devstack.sandboxes import DEFAULT_TENANT_ID, Registry

WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
# Counted per write as received (``caller:<header>``), whatever the emulator then makes of them.
CALLER_HEADERS = ("CallerObjectId", "MSCRMCallerID")
MAX_PAGE_SIZE = 5000
JSON_TYPE = "application/json; odata.metadata=minimal"
_VERSION_RE = re.compile(r"v[0-9]+\.[0-9]+")
_KEY_SAFE = "=,'@"  # left as they are in a key segment written back into a URL
_PAYLOAD_HELP = (
    "Error identified in Payload provided by the user for Entity :'{entity_set}', For more information on "
    "this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ---->  "
    "InnerException : Microsoft.OData.ODataException: {inner}"
)



@dataclass
class _Query:
    select: list[str] | None
    filter: odata.Expr | None
    top: int | None
    count: bool
    skiptoken: str | None
    raw: dict[str, str]


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False).encode()


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status=status, content_type=JSON_TYPE)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _etag(record: Mapping[str, Any]) -> str:
    return f'W/"{record["versionnumber"]}"'


def _raw_path() -> str:
    """The request path as sent, still percent-encoded (PATH_INFO has %2F decoded already)."""
    raw = request.environ.get("REQUEST_URI") or request.environ.get("RAW_URI")
    if not raw:
        return quote(request.path)
    raw = raw.split("?", 1)[0]
    if "://" in raw:
        raw = urlsplit(raw).path
    return str(raw)


def _unverified_tenant(token: str | None) -> str | None:
    """The ``tid`` of any JWT, only to attribute counters of a request that will get a 401."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    tid = claims.get("tid") if isinstance(claims, dict) else None
    return tid if isinstance(tid, str) else None


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _prefer() -> dict[str, str]:
    prefs: dict[str, str] = {}
    for header in request.headers.getlist("Prefer"):
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name:
                prefs[name.strip().lower()] = value.strip().strip('"')
    return prefs


class _Request:
    """One request against one sandbox's org; methods raise DataverseError for error answers."""

    def __init__(
        self, org: Org, base: str, version: str, resource: odata.ResourcePath, caller: Caller,
        appid: str = "",
    ) -> None:
        self.appid = appid  # the calling application: $batch resolves each part's own caller header
        self.org = org
        self.base = base
        self.version = version
        self.resource = resource
        self.caller = caller
        self.method = request.method.upper()
        self.prefer = _prefer()
        self.applied: list[str] = []

    # --- shared helpers -------------------------------------------------------------------------
    @property
    def api(self) -> str:
        return f"{self.base}/api/data/{self.version}"

    def context(self, tail: str) -> str:
        return f"{self.api}/$metadata#{tail}"

    def not_supported(self, what: str) -> DataverseError:
        return DataverseError(
            501, CODE_ODATA, f"{what} is not implemented by the devstack Dataverse emulator."
        )

    def method_not_allowed(self) -> DataverseError:
        return DataverseError(
            405, CODE_ODATA, f"The requested resource does not support http method '{self.method}'."
        )

    def query(
        self, known: set[str] | None, type_name: str, type_of: Callable[[str], str | None] | None = None,
        *, expand: bool = False,
    ) -> _Query:
        args = request.args
        for name in args:
            if expand and name == "$expand":
                continue  # the caller handles it (devstack/dataverse/security.py)
            if name in (
                "$orderby",
                "$expand",
                "$apply",
                "$search",
                "$compute",
                "fetchXml",
                "savedQuery",
                "userQuery",
            ):
                raise self.not_supported(f"The query option {name}")
            if name == "$skip":
                raise DataverseError(400, CODE_ODATA, "The query parameter $skip is not supported")
            if name.startswith("$") and name not in ("$select", "$filter", "$top", "$count", "$skiptoken"):
                raise DataverseError(400, CODE_ODATA, f"The query parameter '{name}' is not supported.")
        try:
            select = odata.parse_select(args["$select"]) if "$select" in args else None
            expr = odata.parse_filter(args["$filter"]) if "$filter" in args else None
            if expr is not None and type_of is not None:
                odata.check_types(expr, type_of)
        except odata.ODataSyntaxError as err:
            raise DataverseError(400, err.code, err.message) from err
        if known is not None:
            for prop in [*(select or []), *(odata.properties(expr) if expr else [])]:
                if prop not in known:
                    raise DataverseError(
                        400, CODE_ODATA, f"Could not find a property named '{prop}' on type '{type_name}'."
                    )
        top: int | None = None
        if "$top" in args:
            text = args["$top"]
            if not text.isdigit():
                raise DataverseError(400, CODE_ODATA, f"Invalid value '{text}' for $top query option found.")
            top = int(text)
        count_text = args.get("$count", "false").lower()
        if count_text not in ("true", "false"):
            raise DataverseError(400, CODE_ODATA, f"'{args['$count']}' is not a valid count option.")
        return _Query(select, expr, top, count_text == "true", args.get("$skiptoken"), dict(args))

    def page_size(self) -> int:
        text = self.prefer.get("odata.maxpagesize")
        if text is None:
            return MAX_PAGE_SIZE
        if not text.isdigit() or int(text) <= 0:
            raise DataverseError(400, CODE_ODATA, f"The value '{text}' is not valid for odata.maxpagesize.")
        size = min(int(text), MAX_PAGE_SIZE)
        self.applied.append(f"odata.maxpagesize={size}")
        return size

    def shape(self, record: Mapping[str, Any], select: list[str] | None, primary: str) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": _etag(record)}
        fields = select if select is not None else list(record)
        for name in fields:
            out[name] = record.get(name)
        if primary not in out:
            out[primary] = record.get(primary)
        return out

    def collection(self, rows: list[dict[str, Any]], q: _Query, primary: str, set_name: str) -> Response:
        """Filter, page by an opaque paging cookie over the primary id, shape: one GET answer.

        ``$top`` limits the answer unless ``Prefer: odata.maxpagesize`` is sent too: then, as Learn
        ("Page results using OData") says, ``$top`` is ignored and the answer is paged.
        """
        matches = [r for r in rows if q.filter is None or odata.evaluate(q.filter, r)]
        matches.sort(key=lambda r: str(r[primary]))
        total = len(matches)
        next_link = None
        if q.top is not None and "odata.maxpagesize" not in self.prefer:
            page = matches[: q.top]
        else:
            size = self.page_size()
            page_number = 1
            if q.skiptoken is not None:
                page_number, last = _read_skiptoken(q.skiptoken, primary)
                matches = [r for r in matches if str(r[primary]) > last]
            page = matches[:size]
            if len(matches) > size:
                token = _make_skiptoken(
                    page_number + 1, primary, str(page[-1][primary]), str(page[0][primary])
                )
                next_link = f"{self.api}/{set_name}?{_query_without_skiptoken()}$skiptoken={token}"
        cols = f"({','.join(q.select)})" if q.select else ""
        body: dict[str, Any] = {"@odata.context": self.context(f"{set_name}{cols}")}
        if q.count:
            body["@odata.count"] = min(total, MAX_PAGE_SIZE)
        body["value"] = [self.shape(r, q.select, primary) for r in page]
        if next_link:
            body["@odata.nextLink"] = next_link
        return _json(200, body)

    def single(
        self,
        record: Mapping[str, Any],
        select: list[str] | None,
        primary: str,
        set_name: str,
        status: int = 200,
    ) -> Response:
        cols = f"({','.join(select)})" if select else ""
        body = {
            "@odata.context": self.context(f"{set_name}{cols}/$entity"),
            **self.shape(record, select, primary),
        }
        return _json(status, body, {"ETag": _etag(record)})

    # --- resources ------------------------------------------------------------------------------
    def whoami(self) -> Response:
        if self.method != "GET" or self.resource.key is not None or self.resource.rest:
            raise DataverseError(
                404, "", f"No HTTP resource was found that matches the request URI '{request.url}'."
            )
        return _json(
            200,
            {
                "@odata.context": self.context("Microsoft.Dynamics.CRM.WhoAmIResponse"),
                "BusinessUnitId": self.org.business_unit_id,
                "UserId": self.caller.user["systemuserid"],
                "OrganizationId": self.org.organization_id,
            },
        )

    def systemusers(self) -> Response:
        if self.method != "GET":
            raise self.not_supported(f"{self.method} on systemusers")
        if self.resource.rest:
            raise DataverseError(
                404, CODE_SEGMENT, f"Resource not found for the segment '{self.resource.rest}'."
            )
        q = self.query(set(SYSTEMUSER_FIELDS), "Microsoft.Dynamics.CRM.systemuser", SYSTEMUSER_TYPES.get,
                       expand=self.resource.key is not None)
        rows = self.org.user_rows()
        if self.resource.key is None:
            return self.collection(rows, q, "systemuserid", "systemusers")
        key = self.parse_key(self.resource.key)
        if isinstance(key, dict):
            if set(key) != {"systemuserid"}:
                raise DataverseError(
                    400,
                    CODE_ODATA,
                    "The specified key attributes are not a defined key for the systemuser entity",
                )
            key = str(_norm_key(key["systemuserid"]))
        user = next((u for u in rows if u["systemuserid"] == key), None)
        if user is None:
            raise DataverseError(404, CODE_NOT_FOUND, f"systemuser With Id = {key} Does Not Exist")
        if "$expand" in request.args:
            return self.expanded_user(user, q.select, request.args["$expand"])
        return self.single(user, q.select, "systemuserid", "systemusers")

    def expanded_user(self, user: Mapping[str, Any], select: list[str] | None, text: str) -> Response:
        """A user with its roles / teams (``dataverse/security.py``): the one ``$expand`` the app sends."""
        try:
            items = security.parse_expand(text)
        except security.ExpandError as err:
            if err.status == 501:
                raise self.not_supported(err.message) from None
            raise DataverseError(err.status, CODE_ODATA, err.message) from None
        body = {
            "@odata.context": self.context(f"systemusers{security.context_columns(select, items)}/$entity"),
            **self.shape(user, select, "systemuserid"),
            **self.org.security.expand("systemuser", str(user["systemuserid"]), items),
        }
        return _json(200, body, {"ETag": _etag(user)})

    def parse_key(self, text: str) -> str | dict[str, odata.Value]:
        try:
            return odata.parse_key(text)
        except odata.ODataSyntaxError as err:
            raise DataverseError(400, err.code, err.message) from err

    def entity_definitions(self) -> Response:
        if self.method != "GET":
            raise self.not_supported(f"{self.method} on EntityDefinitions")
        definitions = [t.definition() for t in self.org.tables.values()]
        known = set(definitions[0]) if definitions else set()
        if self.resource.key is None:
            if self.resource.rest:
                raise DataverseError(
                    404, CODE_SEGMENT, f"Resource not found for the segment '{self.resource.rest}'."
                )
            q = self.query(known, "Microsoft.Dynamics.CRM.EntityMetadata")
            matches = [d for d in definitions if q.filter is None or odata.evaluate(q.filter, d)]
            cols = f"({','.join(q.select)})" if q.select else ""
            value = [
                {k: d[k] for k in (q.select or list(d))} | {"MetadataId": d["MetadataId"]} for d in matches
            ]
            return _json(200, {"@odata.context": self.context(f"EntityDefinitions{cols}"), "value": value})
        key = self.parse_key(self.resource.key)
        table = next(
            (
                t
                for t in self.org.tables.values()
                if (isinstance(key, str) and t.metadata_id == key)
                or (
                    isinstance(key, dict)
                    and set(key) == {"LogicalName"}
                    and _norm_key(key["LogicalName"]) == t.logical_name
                )
            ),
            None,
        )
        if table is None:
            raise DataverseError(
                404, CODE_NOT_FOUND, f"Could not find entity with key '{self.resource.key}'."
            )
        rest = self.resource.rest
        if rest == "":
            return _json(
                200, {"@odata.context": self.context("EntityDefinitions/$entity"), **table.definition()}
            )
        if rest in (
            "Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
            "Attributes/Microsoft.Dynamics.CRM.StatusAttributeMetadata",
            "Attributes/Microsoft.Dynamics.CRM.StateAttributeMetadata",
        ):
            # The emulator's tables have no option sets: an empty list is the true answer.
            kind = rest.rsplit(".", 1)[1]
            return _json(
                200,
                {
                    "@odata.context": self.context(
                        f"EntityDefinitions('{table.metadata_id}')/Attributes/Microsoft.Dynamics.CRM.{kind}"
                    ),
                    "value": [],
                },
            )
        if rest == "Keys":
            keys = [
                {
                    "LogicalName": table.key_name(k),
                    "SchemaName": table.key_name(k),
                    "KeyAttributes": list(k),
                    "EntityKeyIndexStatus": "Active",
                    "EntityLogicalName": table.logical_name,
                }
                for k in table.alternate_keys
            ]
            return _json(
                200,
                {
                    "@odata.context": self.context(f"EntityDefinitions('{table.metadata_id}')/Keys"),
                    "value": keys,
                },
            )
        raise self.not_supported(f"EntityDefinitions/{rest}")

    # --- entity sets ----------------------------------------------------------------------------
    def entity_set(self, table: Table) -> Response:
        if self.resource.rest:
            raise self.not_supported(f"The path segment '{self.resource.rest}'")
        if self.resource.key is None:
            if self.method == "GET":
                return self.collection(
                    self.org.records(table.entity_set),
                    self.query(None, "", table.type_of),
                    table.primary_id,
                    table.entity_set,
                )
            if self.method == "POST":
                return self.post(table)
            raise self.method_not_allowed()
        target = self.target(table, self.resource.key)
        if self.method == "GET":
            return self.get_one(table, target)
        if self.method == "PATCH":
            return self.patch(table, target)
        if self.method == "DELETE":
            return self.delete(table, target)
        raise self.method_not_allowed()

    def target(self, table: Table, text: str) -> str | dict[str, odata.Value]:
        key = self.parse_key(text)
        if isinstance(key, str):
            return key
        if set(key) == {table.primary_id}:
            value = key[table.primary_id]
            if isinstance(value, odata.Guid):
                return value.value
            raise DataverseError(400, CODE_ODATA, f"Invalid value for the primary key '{table.primary_id}'.")
        if table.key_for(set(key)) is None:
            raise DataverseError(
                400,
                CODE_ODATA,
                f"The specified key attributes are not a defined key for the {table.logical_name} entity",
            )
        return key

    def missing(self, table: Table, target: str | dict[str, odata.Value]) -> DataverseError:
        if isinstance(target, str):
            return DataverseError(
                404, CODE_NOT_FOUND, f"{table.logical_name} With Id = {target} Does Not Exist"
            )
        return DataverseError(
            404,
            CODE_KEY_NOT_FOUND,
            f"A record with the specified key values does not exist in {table.logical_name} entity",
        )

    def get_one(self, table: Table, target: str | dict[str, odata.Value]) -> Response:
        q = self.query(None, "")
        record = self.org.find(table, target)
        if record is None:
            raise self.missing(table, target)
        record = dict(record)
        if request.headers.get("If-None-Match") == _etag(record):
            return Response(status=304, headers={"ETag": _etag(record)})
        return self.single(record, q.select, table.primary_id, table.entity_set)

    def body(self, table: Table) -> dict[str, Any]:
        """The JSON object of a write, validated like Dataverse's payload reader."""

        def bad(inner: str) -> DataverseError:
            return DataverseError(
                400, CODE_PAYLOAD, _PAYLOAD_HELP.format(entity_set=table.entity_set, inner=inner)
            )

        try:
            data = json.loads(request.get_data(cache=True) or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise bad(f"Invalid JSON. {err}") from err
        return self.payload(table, data)

    def payload(self, table: Table, data: object) -> dict[str, Any]:
        """An entity's JSON object validated like Dataverse's payload reader (also each bulk target)."""

        def bad(inner: str) -> DataverseError:
            return DataverseError(
                400, CODE_PAYLOAD, _PAYLOAD_HELP.format(entity_set=table.entity_set, inner=inner)
            )

        if not isinstance(data, dict):
            raise bad("A JSON object was expected for an entity.")
        out: dict[str, Any] = {}
        for name, value in data.items():
            if name.endswith("@odata.bind"):
                nav = name[: -len("@odata.bind")]
                guid = _GUID_RE.search(value) if isinstance(value, str) else None
                if not _IDENT_RE.fullmatch(nav) or guid is None:
                    raise bad(f"The value of the annotation '{name}' is not a valid entity reference.")
                out[f"_{nav.lower()}_value"] = guid.group(0).lower()
                continue
            if "@" in name:
                continue  # other instance annotations are ignored, as Dataverse does
            if name in ("createdon", "modifiedon"):
                continue  # system-managed columns every table has: Dataverse ignores them
            if (
                not _IDENT_RE.fullmatch(name)
                or name == "versionnumber"
                or (name.startswith("_") and name.endswith("_value"))
                or (table.columns is not None and name not in table.columns)
            ):
                raise bad(
                    f"The property '{name}' does not exist on type "
                    f"'Microsoft.Dynamics.CRM.{table.logical_name}'. Make sure to only use property names "
                    "that are defined by the type or mark the type as open type."
                )
            if isinstance(value, dict | list):
                raise bad(f"The property '{name}' has a value of an unexpected kind.")
            out[name] = value
        return out

    def representation(self, table: Table, record: Mapping[str, Any], status: int) -> Response:
        """201/200 with the record, ETag and Preference-Applied, and no OData-EntityId (Learn's
        upsert and update-with-data-returned examples): the id is in the body."""
        q = self.query(None, "")
        self.applied.append("return=representation")
        return self.single(record, q.select, table.primary_id, table.entity_set, status=status)

    def entity_id(self, table: Table, record: Mapping[str, Any]) -> str:
        """The OData-EntityId of a 204: the record as the request addressed it, so an upsert by
        alternate key answers ``example_records(example_key1=2,example_key2=2)``, not the GUID
        (Learn, "Use Upsert to create or update a record")."""
        target = self.resource.key
        if target is not None:
            key = self.parse_key(target)
            if isinstance(key, dict) and set(key) != {table.primary_id}:
                inner = ",".join(f"{name}={odata.key_value_text(value)}" for name, value in key.items())
                return f"{self.api}/{table.entity_set}({quote(inner, safe=_KEY_SAFE)})"
        return f"{self.api}/{table.entity_set}({record[table.primary_id]})"

    def written(self, table: Table, record: Mapping[str, Any], status_with_body: int) -> Response:
        if self.prefer.get("return") == "representation":
            return self.representation(table, record, status_with_body)
        return Response(
            status=204,
            headers={"OData-EntityId": self.entity_id(table, record), "ETag": _etag(record)},
        )

    def post(self, table: Table) -> Response:
        data = self.body(table)
        given = data.pop(table.primary_id, None)
        record_id = None
        if given is not None:
            record_id = _lower_guid(given)
            if record_id is None:
                raise DataverseError(
                    400,
                    CODE_PAYLOAD,
                    _PAYLOAD_HELP.format(
                        entity_set=table.entity_set,
                        inner=f"Cannot convert the literal '{given}' to the expected type 'Edm.Guid'.",
                    ),
                )
        record = self.org.create(table, data, self.caller, record_id)
        return self.written(table, record, 201)

    def check_if_match(
        self, table: Table, target: str | dict[str, odata.Value], record: Mapping[str, Any] | None
    ) -> None:
        if_match = request.headers.get("If-Match")
        if if_match is None:
            return
        if record is None:
            raise self.missing(table, target)
        if if_match.strip() != "*" and _etag(record) not in [t.strip() for t in if_match.split(",")]:
            raise DataverseError(
                412,
                CODE_VERSION_MISMATCH,
                "The version of the existing record doesn't match the RowVersion property provided.",
            )

    def patch(self, table: Table, target: str | dict[str, odata.Value]) -> Response:
        data = self.body(table)
        given = data.pop(table.primary_id, None)
        with self.org.lock:
            record = self.org.find(table, target)
            self.check_if_match(table, target, record)
            if record is not None:
                if request.headers.get("If-None-Match", "").strip() == "*":
                    raise DataverseError(
                        412, CODE_DUPLICATE, "A record with matching key values already exists."
                    )
                if given is not None and _lower_guid(given) != record[table.primary_id]:
                    raise DataverseError(
                        400,
                        CODE_PAYLOAD,
                        _PAYLOAD_HELP.format(
                            entity_set=table.entity_set,
                            inner="The primary key in the payload does not match the URL.",
                        ),
                    )
                if isinstance(target, dict):
                    # Key values in the body are dropped: a record's alternate key cannot be changed
                    # through that same key (Learn, "Use Upsert to create or update a record").
                    data = {name: value for name, value in data.items() if name not in target}
                updated = self.org.update(table, record, data, self.caller)
                return self.written(table, updated, 200)
            if isinstance(target, str):
                record_id: str | None = target
            else:
                record_id = _lower_guid(given) if given is not None else None
                # The URL's key values fill in only what the body lacks: body values win, even
                # when they differ (same source).
                for name, value in target.items():
                    data.setdefault(name, value.value if isinstance(value, odata.Guid) else value)
            created = self.org.create(table, data, self.caller, record_id)
            return self.written(table, created, 201)

    def delete(self, table: Table, target: str | dict[str, odata.Value]) -> Response:
        with self.org.lock:
            record = self.org.find(table, target)
            if record is None:
                raise self.missing(table, target)
            self.check_if_match(table, target, record)
            self.org.delete(table, record)
        return Response(status=204)

    def dispatch(self) -> Response:
        name = self.resource.name
        if name == "WhoAmI":
            return self.whoami()
        if name == "systemusers":
            return self.systemusers()
        if name == "EntityDefinitions":
            return self.entity_definitions()
        if name in ("$batch", "sdkmessagefilters"):
            from devstack.dataverse import bulk  # bulk messages and $batch live in their own module

            return bulk.batch(self) if name == "$batch" else bulk.sdkmessagefilters(self)
        table = self.org.tables.get(name)
        if table is None:
            raise DataverseError(404, CODE_SEGMENT, f"Resource not found for the segment '{name}'.")
        if self.resource.key is None and self.resource.rest.startswith("Microsoft.Dynamics.CRM."):
            from devstack.dataverse import bulk

            return bulk.bulk_message(self, table, self.resource.rest.removeprefix("Microsoft.Dynamics.CRM."))
        return self.entity_set(table)


# --- paging cookies ----------------------------------------------------------------------------


def _query_without_skiptoken() -> str:
    """The query as the client sent it (still encoded), less any $skiptoken, ending in ``&`` if any."""
    raw = request.query_string.decode("latin-1")
    kept = [part for part in raw.split("&") if part and unquote(part.partition("=")[0]) != "$skiptoken"]
    return "".join(f"{part}&" for part in kept)


def _quote_lower(text: str) -> str:
    """Percent-encode everything but letters, digits and ``_.-~``, with lower-case hex digits."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(text, safe=""))


def _make_skiptoken(page_number: int, primary: str, last: str, first: str) -> str:
    """A $skiptoken exactly as Dataverse writes one (Learn, "Page results using OData"): an encoded
    ``<cookie>`` whose ``pagingcookie`` attribute holds the previous page's cookie, encoded once more
    with lower-case hex, the ids upper case in braces.  The server decodes the query once, so a link
    decoded (its two layers then collapse when re-encoded) or encoded again on the way no longer
    parses: the link must be followed verbatim."""
    inner = (
        f'<cookie page="{page_number - 1}"><{primary} last="{{{last.upper()}}}" '
        f'first="{{{first.upper()}}}" /></cookie>'
    )
    cookie = f'<cookie pagenumber="{page_number}" pagingcookie="{_quote_lower(inner)}" istracking="False" />'
    return quote(cookie, safe="=/")


def _read_skiptoken(token: str, primary: str) -> tuple[int, str]:
    bad = DataverseError(400, CODE_ODATA, "The $skiptoken value is not valid.")
    m = re.fullmatch(r'<cookie pagenumber="([0-9]+)" pagingcookie="([^"<>]*)" istracking="False" />', token)
    if not m:
        raise bad
    inner = unquote(m.group(2))
    last = re.search(rf'<{re.escape(primary)} last="\{{({_GUID_RE.pattern})\}}"', inner)
    if not last:
        raise bad
    return int(m.group(1)), last.group(1).lower()


# --- the WSGI side -----------------------------------------------------------------------------


# One emulated web server: its affinity cookie has one value, as a real server's does.
_AFFINITY = uuid.uuid4().hex + uuid.uuid4().hex
_COOKIE_TAIL = "path=/; secure; HttpOnly"


def _common_headers(response: Response, org: Org | None) -> Response:
    """Headers every Dataverse answer carries (a real capture: Learn, "Use PowerShell and Visual Studio
    Code with the Dataverse Web API", Fiddler section): request ids, the dop hint, the debugging
    ``x-ms-ratelimit-*`` pair (time in SECONDS, formatted ``1,199.46``) and three cookies."""
    request_id = str(uuid.uuid4())
    response.headers["OData-Version"] = "4.0"
    response.headers["REQ_ID"] = request_id
    response.headers["x-ms-service-request-id"] = request_id
    if org is not None:
        requests_left, ms_left = org.remaining()
        response.headers["x-ms-dop-hint"] = str(org.dop_hint)
        response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(requests_left)
        response.headers["x-ms-ratelimit-time-remaining-xrm-requests"] = f"{ms_left / 1000.0:,.2f}"
    # Server affinity, as Azure's front end sets it; clients that want throughput drop it.
    response.headers.add("Set-Cookie", f"ARRAffinity={_AFFINITY}; {_COOKIE_TAIL}")
    expires = (datetime.now(UTC) + timedelta(days=365 * 50)).strftime("%a, %d-%b-%Y %H:%M:%S GMT")
    response.headers.add("Set-Cookie", f"ReqClientId={uuid.uuid4()}; expires={expires}; {_COOKIE_TAIL}")
    if org is not None:
        response.headers.add("Set-Cookie", f"orgId={org.organization_id}; expires={expires}; {_COOKIE_TAIL}")
    return response


def _error_response(err: DataverseError) -> Response:
    response = Response(_error_body(err.code, err.message), status=err.status, content_type=JSON_TYPE)
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def _unauthorized(tenant_id: str | None, resource: str) -> Response:
    """Empty 401 naming the environment's tenant: clients (ServiceClient, XrmToolBox) discover the
    tenant from it, so it is never ``common``.  A request with no token names no sandbox, so the
    `default` sandbox's tenant stands in (as for the Key Vault challenge)."""
    response = Response(b"", status=401)
    response.headers["WWW-Authenticate"] = (
        f"Bearer authorization_uri=https://login.microsoftonline.com/{tenant_id or DEFAULT_TENANT_ID}"
        "/oauth2/authorize, "
        f"resource_id={resource.rstrip('/')}/"
    )
    return response


def _split_api_path(raw_path: str) -> tuple[str, str] | None:
    m = re.fullmatch(r"/api/data/([^/]+)/?(.*)", raw_path)
    if not m or not _VERSION_RE.fullmatch(m.group(1)):
        return None
    return m.group(1), m.group(2)


def create_app(registry: Registry) -> Flask:
    """The Dataverse Web API of every sandbox; the bearer token's ``tid`` picks the sandbox."""
    app = web.create_app("dataverse")
    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]

    def audience() -> str:
        return registry.urls.get(SERVICE) or request.host_url.rstrip("/")

    @app.route("/", defaults={"_path": ""}, methods=methods)
    @app.route("/<path:_path>", methods=methods)
    def handle(_path: str) -> Response:
        started = time.monotonic()
        token = _bearer()
        tenant = _unverified_tenant(token)
        sandbox = registry.by_tenant(tenant) if tenant else None
        split = _split_api_path(_raw_path())
        resource_name = "?"
        resource: odata.ResourcePath | None = None
        path_error: DataverseError | None = None
        if split is None:
            path_error = DataverseError(
                404, "", f"No HTTP resource was found that matches the request URI '{request.url}'."
            )
        else:
            try:
                resource = odata.split_resource(odata.decode_path(split[1]))
                resource_name = resource.name
            except odata.ODataSyntaxError as err:
                resource_name = split[1].split("(", 1)[0].split("/", 1)[0] or "?"
                status = 404 if err.message.startswith("Resource not found") else 400
                path_error = DataverseError(status, CODE_SEGMENT if status == 404 else err.code, err.message)
        if sandbox is None:
            return _common_headers(_unauthorized(tenant if tenant else None, audience()), None)
        web.bind(sandbox, SERVICE)
        org: Org = sandbox.org
        expanded = resource_name == "systemusers" and "$expand" in request.args
        # a user's roles/teams read is counted apart, so "GET systemusers" stays "user lookups"
        sandbox.counters.count(SERVICE, f"{request.method} {resource_name}{' $expand' if expanded else ''}")
        if request.method in WRITE_METHODS:
            for header in CALLER_HEADERS:
                if header in request.headers:
                    sandbox.counters.count(SERVICE, f"caller:{header}")
        if "ARRAffinity" in request.cookies:
            sandbox.counters.count(SERVICE, "cookie:ARRAffinity")
        with org.in_flight() as concurrent:
            web.apply_latency(sandbox, SERVICE)
            faulted = web.fault_response(sandbox.take_fault(SERVICE, request.method, request.path))
            if faulted is not None:
                return faulted
            claims = registry.verify_token(token or "", audience())
            if claims is None:
                return _common_headers(_unauthorized(sandbox.tenant_id, audience()), org)
            try:
                entry = org.admit(concurrent)
            except DataverseError as err:
                return _common_headers(_error_response(err), org)
            try:
                if path_error is not None:
                    raise path_error
                assert resource is not None and split is not None
                caller = org.resolve_caller(
                    str(claims.get("appid", "")),
                    request.headers.get("CallerObjectId"),
                    request.headers.get("MSCRMCallerID"),
                )
                appid = str(claims.get("appid", ""))
                handler = _Request(org, request.host_url.rstrip("/"), split[0], resource, caller, appid)
                response = handler.dispatch()
                if handler.applied:
                    response.headers["Preference-Applied"] = ",".join(handler.applied)
            except DataverseError as err:
                response = _error_response(err)
            finally:
                org.finish(entry, started)
            return _common_headers(response, org)

    return app
