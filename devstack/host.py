"""A small local Azure Functions host for the Python v2 programming model.

Core Tools cannot be installed everywhere (its npm package downloads a binary), so development
and the end-to-end tests run the app through this host instead.  It reads the app's own metadata
(``app.get_functions()``, once: a second call raises) and ``host.json``, and keeps the semantics
the code relies on in Azure: function keys and 401s, outputs written only when the function
returns, base64 queue messages, visibility timeout and dequeue count, ``<queue>-poison`` after
``maxDequeueCount``, ``batchSize + newBatchThreshold`` concurrent invocations, NCRONTAB timers,
``POST /admin/functions/{name}``, and the binding expressions ``%SETTING%``, ``{DateTime}`` and
``{rand-guid}``.  Storage is Azurite (or a real account) through the Azure SDKs.

Run: ``python -m devstack.host [--app function_app] [--port 7071] [--settings local.settings.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import inspect
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devstack import ncrontab

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueClient, QueueMessage, QueueServiceClient
    from flask import Response
    from werkzeug.serving import BaseWSGIServer

log = logging.getLogger("devstack.host")

HOST_VERSION = "4.0.0-local"
# Dev-only keys, used when local.settings.json / the environment set none.  Never use them in Azure.
DEFAULT_FUNCTION_KEY = "local-dev-function-key"
DEFAULT_MASTER_KEY = "local-dev-master-key"
FUNCTION_KEY_SETTING = "LOCAL_FUNCTION_KEY"
MASTER_KEY_SETTING = "LOCAL_MASTER_KEY"
# Azurite's documented well-known development account (public, emulator only).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_CONNECTION_STRING = (
    f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
    f"BlobEndpoint=http://127.0.0.1:10000/{AZURITE_ACCOUNT};"
    f"QueueEndpoint=http://127.0.0.1:10001/{AZURITE_ACCOUNT};"
    f"TableEndpoint=http://127.0.0.1:10002/{AZURITE_ACCOUNT};"
)
JOBHOST_PREFIX = "AzureFunctionsJobHost__"
MIN_POLLING_INTERVAL = 0.1
# The real default is one minute; a developer waiting for a message wants seconds.
LOCAL_MAX_POLLING_INTERVAL = 2.0
# Messages are hidden this long while a function runs (the real listener uses 10 minutes too).
RECEIVE_VISIBILITY_TIMEOUT = 600
TIMER_PAST_DUE_TOLERANCE = 1.0
_QUEUE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")


class HostError(Exception):
    """The app or its configuration cannot run on the host; the message says what to fix."""


class BindingExpressionError(HostError):
    """A ``%SETTING%`` or ``{name}`` expression has no value."""


# --------------------------------------------------------------------------- settings


def read_local_settings(path: Path) -> dict[str, str]:
    """The ``Values`` of a local.settings.json (missing file: nothing)."""
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise HostError(f"{path}: not valid JSON ({exc})") from None
    if document.get("IsEncrypted"):
        raise HostError(f"{path}: IsEncrypted is true; this host reads plain local settings only")
    values = document.get("Values") or {}
    if not isinstance(values, dict):
        raise HostError(f"{path}: Values must be an object")
    return {str(k): "" if v is None else str(v) for k, v in values.items()}


def apply_local_settings(values: Mapping[str, str], environ: MutableMapping[str, str]) -> list[str]:
    """Copy settings into the environment as Core Tools does: a non-empty variable already set wins.

    Returns the names skipped because the environment already defines them.
    """
    skipped = []
    for name, value in values.items():
        if not name:
            continue
        if environ.get(name):
            skipped.append(name)
        else:
            environ[name] = value
    return skipped


def _lookup(mapping: Mapping[str, Any], key: str) -> tuple[str | None, Any]:
    for existing, value in mapping.items():
        if existing.lower() == key.lower():
            return existing, value
    return None, None


def host_configuration(host_json: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """host.json with ``AzureFunctionsJobHost__a__b`` app settings applied on top (keys ignore case)."""
    config: dict[str, Any] = json.loads(json.dumps(host_json))
    for name, value in sorted(environ.items()):
        if not name.lower().startswith(JOBHOST_PREFIX.lower()):
            continue
        path = [part for part in name[len(JOBHOST_PREFIX):].split("__") if part]
        if not path:
            continue
        node = config
        for part in path[:-1]:
            existing, child = _lookup(node, part)
            if not isinstance(child, dict):
                child = {}
                if existing is not None:
                    del node[existing]
                node[existing or part] = child
            node = child
        existing, _ = _lookup(node, path[-1])
        node[existing or path[-1]] = value
    return config


def section(config: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    node: Any = config
    for part in path:
        _, node = _lookup(node, part) if isinstance(node, Mapping) else (None, None)
    return node if isinstance(node, Mapping) else {}


def parse_timespan(text: str | int | float) -> float:
    """A .NET TimeSpan (``[d.]hh:mm:ss[.fff]``) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    match = re.fullmatch(r"\s*(-)?(?:(\d+)\.)?(\d+):(\d+)(?::(\d+)(?:\.(\d+))?)?\s*", text)
    if not match:
        raise HostError(f"{text!r} is not a TimeSpan (expected hh:mm:ss)")
    sign, days, hours, minutes, seconds, fraction = match.groups()
    total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
    value = total + (float(f"0.{fraction}") if fraction else 0.0)
    return -value if sign else value


def _int_option(options: Mapping[str, Any], name: str, default: int) -> int:
    _, raw = _lookup(options, name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise HostError(f"host.json extensions.queues.{name}: {raw!r} is not a whole number") from None


@dataclass(frozen=True)
class QueueOptions:
    """``extensions.queues`` of host.json with the storage extension's defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    max_polling_interval: float = 60.0
    message_encoding: str = "base64"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], cpu_count: int | None = None) -> QueueOptions:
        options = section(config, "extensions", "queues")
        batch_size = _int_option(options, "batchSize", 16)
        if not 1 <= batch_size <= 32:
            raise HostError(f"host.json extensions.queues.batchSize must be 1..32, got {batch_size}")
        threshold = _int_option(options, "newBatchThreshold", -1)
        if threshold < 0:
            threshold = batch_size // 2 * (cpu_count or os.cpu_count() or 1)
        max_dequeue = _int_option(options, "maxDequeueCount", 5)
        if max_dequeue < 1:
            raise HostError("host.json extensions.queues.maxDequeueCount must be at least 1")
        _, visibility = _lookup(options, "visibilityTimeout")
        _, polling = _lookup(options, "maxPollingInterval")
        _, encoding = _lookup(options, "messageEncoding")
        encoding_name = str(encoding or "base64").lower()
        if encoding_name not in ("base64", "none"):
            raise HostError(
                f"host.json extensions.queues.messageEncoding must be base64 or none, got {encoding!r}"
            )
        return cls(
            batch_size=batch_size,
            new_batch_threshold=threshold,
            max_dequeue_count=max_dequeue,
            visibility_timeout=max(0.0, parse_timespan(visibility)) if visibility not in (None, "") else 0.0,
            max_polling_interval=parse_timespan(polling) if polling not in (None, "") else 60.0,
            message_encoding=encoding_name,
        )

    @property
    def max_concurrency(self) -> int:
        return self.batch_size + self.new_batch_threshold


# --------------------------------------------------------------------------- binding expressions

_SETTING_EXPR = re.compile(r"%([^%]+)%")
_RUNTIME_EXPR = re.compile(r"\{([^{}]+)\}")
_DOTNET_DATE_TOKENS = re.compile(r"yyyy|yy|MM|dd|HH|hh|mm|ss|fff|ff|f|tt|K|'[^']*'|\\.")
_DOTNET_DATE_FORMATS = {
    "yyyy": "%Y", "yy": "%y", "MM": "%m", "dd": "%d", "HH": "%H", "hh": "%I",
    "mm": "%M", "ss": "%S", "tt": "%p",
}


def resolve_settings(text: str, environ: Mapping[str, str]) -> str:
    """Replace every ``%NAME%`` with the app setting, as the host does when it indexes a function."""

    def setting(match: re.Match[str]) -> str:
        value = environ.get(match.group(1))
        if value is None or value == "":
            raise BindingExpressionError(f"'%{match.group(1)}%' does not resolve to a value.")
        return value

    return _SETTING_EXPR.sub(setting, text)


def format_datetime(moment: datetime, dotnet_format: str | None = None) -> str:
    """``{DateTime}``: UTC, ``yyyy-MM-ddTHH-mm-ssK`` by default (e.g. ``2024-05-01T06-00-00Z``)."""
    moment = moment.astimezone(UTC)
    if not dotnet_format:
        return moment.strftime("%Y-%m-%dT%H-%M-%SZ")

    def token(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in _DOTNET_DATE_FORMATS:
            return moment.strftime(_DOTNET_DATE_FORMATS[text])
        if text.startswith("'"):
            return text[1:-1]
        if text.startswith("\\"):
            return text[1:]
        if text == "K":
            return "Z"
        return f"{moment.microsecond:06d}"[: len(text)]

    return _DOTNET_DATE_TOKENS.sub(token, dotnet_format)


def format_guid(value: uuid.UUID, dotnet_format: str | None = None) -> str:
    kind = (dotnet_format or "D").upper()
    text = str(value)
    return {"D": text, "N": value.hex, "B": f"{{{text}}}", "P": f"({text})"}.get(kind, text)


def _data_value(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        _, node = _lookup(node, part)
    return node


def resolve_runtime(
    text: str,
    data: Mapping[str, Any] | None = None,
    *,
    now: datetime | None = None,
    function_name: str = "",
) -> str:
    """Replace ``{DateTime}``, ``{rand-guid}``, ``{sys.*}`` and trigger data (``{id}``, ``{Query.x}``)."""
    data = data or {}
    moment = now or datetime.now(UTC)

    def expression(match: re.Match[str]) -> str:
        name, _, fmt = match.group(1).partition(":")
        key = name.strip().lower()
        value = _data_value(data, name.strip())
        if value is not None and key not in ("rand-guid", "sys.randguid"):
            return format_datetime(value, fmt) if isinstance(value, datetime) else str(value)
        if key in ("datetime", "sys.utcnow"):
            return format_datetime(moment, fmt)
        if key in ("rand-guid", "sys.randguid"):
            return format_guid(uuid.uuid4(), fmt)
        if key == "sys.methodname":
            return function_name
        raise BindingExpressionError(f"No value for named parameter '{name}'.")

    return _RUNTIME_EXPR.sub(expression, text)


# --------------------------------------------------------------------------- messages and keys


def encode_message(body: str | bytes, encoding: str = "base64") -> str:
    """The text put on the wire for a queue message (the host's default encoding is base64)."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if encoding == "none":
        return raw.decode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def decode_message(wire: str, encoding: str = "base64") -> bytes | None:
    """The message body, or None when a base64 queue holds text that is not base64 (poison)."""
    if encoding == "none":
        return wire.encode("utf-8")
    try:
        return base64.b64decode(wire.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


@dataclass(frozen=True)
class Keys:
    function: str
    master: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Keys:
        return cls(
            function=environ.get(FUNCTION_KEY_SETTING) or DEFAULT_FUNCTION_KEY,
            master=environ.get(MASTER_KEY_SETTING) or DEFAULT_MASTER_KEY,
        )

    def allows(self, auth_level: str, presented: str | None) -> bool:
        """anonymous: anyone; function: the function key or the master key; admin: the master key."""
        level = auth_level.lower()
        if level == "anonymous":
            return True
        if not presented:
            return False
        given = presented.encode("utf-8")
        master_ok = hmac.compare_digest(given, self.master.encode("utf-8"))
        if level == "admin":
            return master_ok
        return master_ok or hmac.compare_digest(given, self.function.encode("utf-8"))


# --------------------------------------------------------------------------- storage


class StorageAccount:
    """One storage connection (a connection string or identity-based ``<name>__queueServiceUri``)."""

    def __init__(self, name: str, environ: Mapping[str, str]) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._queues: dict[str, QueueClient] = {}
        self._queue_service: QueueServiceClient | None = None
        self._blob_service: BlobServiceClient | None = None
        self.connection_string: str | None = None
        self.queue_url: str | None = None
        self.blob_url: str | None = None
        self.client_id: str | None = None
        for candidate in (name, f"AzureWebJobs{name}"):
            value = environ.get(candidate)
            if value:
                if value.strip().lower() == "usedevelopmentstorage=true":
                    value = AZURITE_CONNECTION_STRING
                self.connection_string = value
                return
        prefix = f"{name}__"
        settings = {k[len(prefix):].lower(): v for k, v in environ.items() if k.startswith(prefix) and v}
        account = settings.get("accountname")
        self.queue_url = settings.get("queueserviceuri") or settings.get("serviceuri") or (
            f"https://{account}.queue.core.windows.net" if account else None
        )
        self.blob_url = settings.get("blobserviceuri") or settings.get("serviceuri") or (
            f"https://{account}.blob.core.windows.net" if account else None
        )
        self.client_id = settings.get("clientid")
        if not (self.queue_url or self.blob_url):
            raise HostError(
                f"Storage connection '{name}' is not configured: set {name} to a connection string "
                f"(UseDevelopmentStorage=true for Azurite) or {name}__queueServiceUri / "
                f"{name}__blobServiceUri for an identity-based connection"
            )

    def _credential(self) -> Any:
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential(managed_identity_client_id=self.client_id) if self.client_id \
            else DefaultAzureCredential()

    def queue_service(self) -> QueueServiceClient:
        from azure.storage.queue import QueueServiceClient

        with self._lock:
            if self._queue_service is None:
                if self.connection_string:
                    self._queue_service = QueueServiceClient.from_connection_string(self.connection_string)
                elif self.queue_url:
                    self._queue_service = QueueServiceClient(self.queue_url, credential=self._credential())
                else:
                    raise HostError(f"Storage connection '{self.name}' has no queue endpoint")
            return self._queue_service

    def blob_service(self) -> BlobServiceClient:
        from azure.storage.blob import BlobServiceClient

        with self._lock:
            if self._blob_service is None:
                if self.connection_string:
                    self._blob_service = BlobServiceClient.from_connection_string(self.connection_string)
                elif self.blob_url:
                    self._blob_service = BlobServiceClient(self.blob_url, credential=self._credential())
                else:
                    raise HostError(f"Storage connection '{self.name}' has no blob endpoint")
            return self._blob_service

    def queue(self, name: str) -> QueueClient:
        """A client that sends and receives the raw wire text (the host does the base64 itself)."""
        service = self.queue_service()
        with self._lock:
            client = self._queues.get(name)
            if client is None:
                client = service.get_queue_client(
                    name, message_encode_policy=None, message_decode_policy=None
                )
                self._queues[name] = client
            return client

    def ensure_queue(self, name: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            self.queue(name).create_queue()

    def send(self, queue_name: str, wire_text: str, *, time_to_live: int | None = None) -> None:
        """Add a message, creating the queue on first use (AddMessageAndCreateIfNotExists)."""
        from azure.core.exceptions import ResourceNotFoundError

        client = self.queue(queue_name)
        try:
            client.send_message(wire_text, time_to_live=time_to_live)
        except ResourceNotFoundError:
            self.ensure_queue(queue_name)
            client.send_message(wire_text, time_to_live=time_to_live)

    def read_blob(self, container: str, blob: str) -> bytes | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return bytes(self.blob_service().get_blob_client(container, blob).download_blob().readall())
        except ResourceNotFoundError:
            return None

    def write_blob(self, container: str, blob: str, data: bytes) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

        client = self.blob_service().get_blob_client(container, blob)
        try:
            client.upload_blob(data, overwrite=True)
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                self.blob_service().create_container(container)
            client.upload_blob(data, overwrite=True)


def split_blob_path(path: str) -> tuple[str, str]:
    container, _, blob = path.strip("/").partition("/")
    if not container or not blob:
        raise HostError(f"blob path {path!r} must be <container>/<blob>")
    return container, blob


def validate_queue_name(name: str, where: str) -> str:
    if not _QUEUE_NAME.match(name):
        raise HostError(
            f"{where}: invalid queue name {name!r} (3-63 lowercase letters, digits and single hyphens)"
        )
    return name


# --------------------------------------------------------------------------- function metadata


@dataclass
class FunctionSpec:
    """One indexed function: its bindings (``%SETTING%`` already resolved) and how to call it."""

    name: str
    func: Callable[..., Any]
    bindings: list[dict[str, Any]]
    trigger: dict[str, Any]
    params: dict[str, Any]  # parameter name -> annotation
    wants_context: bool
    is_async: bool
    error: str | None = None

    @property
    def trigger_type(self) -> str:
        return str(self.trigger.get("type", ""))

    def outputs(self) -> list[dict[str, Any]]:
        return [
            b for b in self.bindings if str(b.get("direction")).upper() == "OUT" and b.get("type") != "http"
        ]


_RESOLVED_PROPERTIES = ("queueName", "path", "schedule")


def _annotations(func: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    try:
        signature = inspect.signature(func, eval_str=True)
    except (NameError, TypeError):
        signature = inspect.signature(func)
    params = {name: p.annotation for name, p in signature.parameters.items()}
    return params, "context" in params


def index_functions(app: Any, environ: Mapping[str, str]) -> list[FunctionSpec]:
    """Read the app's functions ONCE (azure-functions 1.x raises on a second get_functions())."""
    specs = []
    for function in app.get_functions():
        name = function.get_function_name()
        bindings: list[dict[str, Any]] = json.loads(function.get_function_json())["bindings"]
        user_function = function.get_user_function()
        params, wants_context = _annotations(user_function)
        trigger = next((b for b in bindings if str(b.get("type", "")).endswith("Trigger")), {})
        spec = FunctionSpec(
            name=name,
            func=user_function,
            bindings=bindings,
            trigger=trigger,
            params=params,
            wants_context=wants_context,
            is_async=inspect.iscoroutinefunction(user_function),
        )
        try:
            if not trigger:
                raise HostError("no trigger binding")
            for binding in bindings:
                for prop in _RESOLVED_PROPERTIES:
                    if isinstance(binding.get(prop), str):
                        binding[prop] = resolve_settings(binding[prop], environ)
                if binding.get("type") in ("queue", "queueTrigger"):
                    validate_queue_name(binding["queueName"], f"binding '{binding.get('name')}'")
                if binding.get("type") == "timerTrigger":
                    ncrontab.parse(binding["schedule"])
            names = {b["name"] for b in bindings if b.get("name") != "$return"}
            unknown = [p for p in params if p not in names and p != "context"]
            if unknown:
                raise HostError(f"parameters {unknown} have no binding")
        except (HostError, ncrontab.ScheduleError, KeyError) as exc:
            spec.error = f"Error indexing method 'Functions.{name}': {exc}"
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------- invocation


class _Out:
    """The object a function gets for an output binding (implements func.Out)."""

    def __init__(self) -> None:
        self._value: Any = None
        self.was_set = False

    def set(self, val: Any) -> None:
        self._value = val
        self.was_set = True

    def get(self) -> Any:
        return self._value


def _make_context(invocation_id: str, spec: FunctionSpec, script_root: Path) -> Any:
    import azure.functions as func
    from azure.functions import _abc as azf_abc

    class _Trace(azf_abc.TraceContext):
        trace_state = ""
        trace_parent = ""
        attributes: dict[str, str] = {}

    class _Retry(azf_abc.RetryContext):
        retry_count = 0
        max_retry_count = 0
        exception = None  # type: ignore[assignment]

    class _Context(func.Context):
        thread_local_storage = threading.local
        trace_context = _Trace()
        retry_context = _Retry()

        def __init__(self, invocation: str, name: str, directory: str) -> None:
            self._invocation, self._name, self._directory = invocation, name, directory

        @property
        def invocation_id(self) -> str:
            return self._invocation

        @property
        def function_name(self) -> str:
            return self._name

        @property
        def function_directory(self) -> str:
            return self._directory

    return _Context(invocation_id, spec.name, str(script_root))


def _type_kind(annotation: Any) -> str:
    """'str', 'bytes' or 'other' for an annotation (``str | None`` counts as str)."""
    candidates: tuple[Any, ...] = (annotation,)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        candidates = typing.get_args(annotation)
    for candidate in candidates:
        if candidate is str:
            return "str"
        if candidate is bytes:
            return "bytes"
    return "other"


class InvocationFailed(Exception):
    """The function raised (or timed out); the trigger decides what that means."""


@dataclass
class Invocation:
    id: str
    result: Any = None


class Invoker:
    """Runs functions like the Python worker (thread pool / event loop) and applies their bindings."""

    def __init__(self, host: Host) -> None:
        self.host = host
        workers = int(os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT") or min(32, (os.cpu_count() or 1) + 4))
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="worker")
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="worker-loop", daemon=True)
        self._loop_thread.start()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _blob_input(self, spec: FunctionSpec, binding: dict[str, Any], data: Mapping[str, Any]) -> Any:
        import azure.functions as func

        path = resolve_runtime(binding["path"], data, function_name=spec.name)
        container, blob = split_blob_path(path)
        content = self.host.storage(binding.get("connection")).read_blob(container, blob)
        if content is None:
            return None
        declared = str(binding.get("dataType", "")).upper()
        kind = _type_kind(spec.params.get(binding["name"]))
        if declared == "STRING" or (not declared and kind == "str"):
            return content.decode("utf-8-sig")
        if declared == "BINARY" or kind == "bytes":
            return content
        return func.blob.InputStream(data=content, name=path, length=len(content))

    def _write_outputs(self, spec: FunctionSpec, outs: Mapping[str, _Out], result: Any,
                       data: Mapping[str, Any]) -> None:
        for binding in spec.outputs():
            name = binding["name"]
            if name == "$return":
                value = result
            elif outs[name].was_set:
                value = outs[name].get()
            else:
                continue
            if value is None:
                continue
            storage = self.host.storage(binding.get("connection"))
            if binding["type"] == "queue":
                queue_name = binding["queueName"]
                for message in _queue_messages(value):
                    wire = encode_message(message, self.host.queue_options.message_encoding)
                    storage.send(queue_name, wire)
                self.host.notify_enqueued(queue_name)
            elif binding["type"] == "blob":
                path = resolve_runtime(binding["path"], data, function_name=spec.name)
                storage.write_blob(*split_blob_path(path), _blob_bytes(value))
            else:
                raise HostError(f"output binding type {binding['type']!r} is not supported by the local host")

    def invoke(
        self, spec: FunctionSpec, trigger_value: Any, data: Mapping[str, Any], reason: str
    ) -> Invocation:
        """Bind, run and write outputs; raises InvocationFailed when the function (or a binding) fails."""
        invocation = Invocation(id=str(uuid.uuid4()))
        started = time.monotonic()
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, invocation.id)
        try:
            outs: dict[str, _Out] = {}
            kwargs: dict[str, Any] = {}
            for binding in spec.bindings:
                name = binding.get("name")
                if name is None or name == "$return" or binding.get("type") == "http":
                    continue
                if binding is spec.trigger:
                    kwargs[name] = trigger_value
                elif str(binding.get("direction")).upper() == "OUT":
                    outs[name] = kwargs[name] = _Out()
                elif binding.get("type") == "blob":
                    kwargs[name] = self._blob_input(spec, binding, data)
                else:
                    raise HostError(f"input binding type {binding.get('type')!r} is not supported")
            if spec.wants_context and "context" not in kwargs:
                kwargs["context"] = _make_context(invocation.id, spec, self.host.script_root)
            kwargs = {k: v for k, v in kwargs.items() if k in spec.params}
            future: Future[Any]
            if spec.is_async:
                future = asyncio.run_coroutine_threadsafe(spec.func(**kwargs), self.loop)
            else:
                future = self.executor.submit(spec.func, **kwargs)
            try:
                invocation.result = future.result(timeout=self.host.function_timeout)
            except FutureTimeout:
                raise InvocationFailed(
                    f"Timeout value of {timedelta(seconds=self.host.function_timeout)} exceeded by function "
                    f"'Functions.{spec.name}' (Id: '{invocation.id}')"
                ) from None
            self._write_outputs(spec, outs, invocation.result, data)
        except Exception as exc:
            duration = (time.monotonic() - started) * 1000
            log.error(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms)\n"
                "Result: Failure\nException: %s: %s%s",
                spec.name, invocation.id, duration, type(exc).__name__, exc, _user_stack(exc),
            )
            if isinstance(exc, InvocationFailed):
                raise
            raise InvocationFailed(f"{type(exc).__name__}: {exc}") from exc
        duration = (time.monotonic() - started) * 1000
        log.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)", spec.name, invocation.id, duration
        )
        return invocation


def _user_stack(exc: BaseException) -> str:
    """The traceback frames outside the host and the thread pool (what the real host prints as Stack)."""
    import traceback

    frames = [
        frame for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename != __file__ and "concurrent" not in Path(frame.filename).parts
    ]
    if not frames:
        return ""
    return "\nStack: " + "".join(traceback.format_list(frames)).rstrip()


def _queue_messages(value: Any) -> Iterator[str | bytes]:
    import azure.functions as func

    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if isinstance(item, str | bytes):
            yield item
        elif isinstance(item, func.QueueMessage):
            yield item.get_body()
        elif isinstance(item, dict):
            yield json.dumps(item)
        else:
            raise HostError(
                f"cannot put a {type(item).__name__} on a queue (use str, bytes or a list of str)"
            )


def _blob_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    read = getattr(value, "read", None)
    if callable(read):
        data = read()
        return data.encode("utf-8") if isinstance(data, str) else bytes(data)
    raise HostError(f"cannot write a {type(value).__name__} to a blob (use str or bytes)")


# --------------------------------------------------------------------------- HTTP


_ROUTE_PARAM = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?(\?)?\}")


@dataclass
class Route:
    spec: FunctionSpec
    template: str
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    auth_level: str


def compile_route(template: str) -> re.Pattern[str]:
    """An ASP.NET-style route template as a case-insensitive regex (``{id}``, ``{id?}``, ``{*rest}``)."""
    regex = ""
    position = 0
    for match in _ROUTE_PARAM.finditer(template):
        regex += re.escape(template[position:match.start()])
        catch_all, name, optional = match.groups()
        body = f"(?P<{name}>.+)" if catch_all else f"(?P<{name}>[^/]+)"
        if optional or catch_all:
            if regex.endswith("/"):
                regex = regex[:-1] + f"(?:/{body})?"
            else:
                regex += f"{body}?"
        else:
            regex += body
        position = match.end()
    regex += re.escape(template[position:])
    return re.compile(f"^{regex}/?$", re.IGNORECASE)


def build_routes(specs: list[FunctionSpec]) -> list[Route]:
    routes = []
    for spec in specs:
        if spec.error or spec.trigger_type != "httpTrigger":
            continue
        template = (spec.trigger.get("route") or spec.name).strip("/")
        methods = spec.trigger.get("methods")
        routes.append(Route(
            spec=spec,
            template=template,
            pattern=compile_route(template),
            methods=frozenset(m.upper() for m in methods) if methods else None,
            auth_level=str(spec.trigger.get("authLevel") or "FUNCTION").lower(),
        ))
    # Literal segments beat parameters, as in ASP.NET routing.
    routes.sort(key=lambda r: (r.template.count("{"), -len(r.template)))
    return routes


def _presented_key(headers: Any, args: Mapping[str, str]) -> str | None:
    return headers.get("x-functions-key") or args.get("code")


def create_http_app(host: Host) -> Any:
    """The Flask app serving ``/api/...`` and the admin API."""
    import azure.functions as func
    from flask import Flask, Response, request

    app = Flask("devstack.host")
    app.config["MAX_CONTENT_LENGTH"] = 100 * 1024 * 1024
    all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    def unauthorized() -> Response:
        return Response(status=401)

    def master_ok() -> bool:
        return host.keys.allows("admin", _presented_key(request.headers, request.args))

    @app.route("/admin/host/ping", methods=["GET", "POST"])
    def ping() -> Response:
        return Response(status=200)

    @app.route("/admin/host/status", methods=["GET"])
    def status() -> Response:
        if not master_ok():
            return unauthorized()
        return Response(json.dumps(host.status()), mimetype="application/json")

    @app.route("/admin/functions", methods=["GET"])
    def functions() -> Response:
        if not master_ok():
            return unauthorized()
        listing = [{"name": s.name, "bindings": s.bindings, "error": s.error} for s in host.specs]
        return Response(json.dumps(listing), mimetype="application/json")

    @app.route("/admin/functions/<name>", methods=["POST"])
    def run_function(name: str) -> Response:
        if not master_ok():
            return unauthorized()
        spec = next((s for s in host.specs if s.name.lower() == name.lower()), None)
        if spec is None:
            return Response(status=404)
        if spec.error:
            return Response(json.dumps({"error": spec.error}), status=400, mimetype="application/json")
        body = request.get_json(silent=True) or {}
        text = body.get("input", "") if isinstance(body, dict) else ""
        try:
            host.invoke_on_demand(spec, "" if text is None else str(text))
        except HostError as exc:
            return Response(json.dumps({"error": str(exc)}), status=400, mimetype="application/json")
        return Response(status=202)

    api_rule = f"/{host.route_prefix}/<path:path>" if host.route_prefix else "/<path:path>"

    @app.route(api_rule, methods=all_methods)
    def api(path: str) -> Response:
        with host.track_request():
            matched = [(route, route.pattern.match(path)) for route in host.routes]
            candidates = [(r, m) for r, m in matched if m]
            hit = next(
                ((r, m) for r, m in candidates if r.methods is None or request.method in r.methods), None
            )
            if hit is None:
                return Response(status=404)
            route, match = hit
            if not host.keys.allows(route.auth_level, _presented_key(request.headers, request.args)):
                return unauthorized()
            route_params = {k: v for k, v in match.groupdict().items() if v is not None}
            body = request.get_data(cache=False)
            req = func.HttpRequest(
                method=request.method,
                url=request.url,
                headers=dict(request.headers.items()),
                params=request.args.to_dict(flat=True),
                route_params=route_params,
                body=body,
            )
            data: dict[str, Any] = {**route_params, "Query": request.args.to_dict(flat=True),
                                    "Headers": dict(request.headers.items())}
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                payload = json.loads(body) if body else None
                if isinstance(payload, dict):
                    data = {**payload, **data}
            try:
                invocation = host.invoker.invoke(
                    route.spec, req, data, "This function was programmatically called via the host APIs."
                )
            except InvocationFailed:
                return Response(status=500)
            return _to_flask_response(invocation.result)

    return app


def _to_flask_response(result: Any) -> Response:
    import azure.functions as func
    from flask import Response

    if result is None:
        return Response(status=204)
    if isinstance(result, str | bytes):
        return Response(result, status=200, mimetype="text/plain")
    if isinstance(result, func.HttpResponse):
        headers = [(k, v) for k, v in result.headers.items()]
        if not any(k.lower() == "content-type" for k, _ in headers):
            mimetype = result.mimetype
            text = mimetype.startswith("text/")
            content_type = f"{mimetype}; charset={result.charset}" if text else mimetype
            headers.append(("Content-Type", content_type))
        return Response(result.get_body(), status=result.status_code, headers=headers)
    log.error("HTTP function returned a %s, not an HttpResponse", type(result).__name__)
    return Response(status=500)


# --------------------------------------------------------------------------- queue listener


class QueueListener:
    """Polls one queue for one function with the storage extension's processing rules."""

    def __init__(self, host: Host, spec: FunctionSpec) -> None:
        self.host = host
        self.spec = spec
        self.queue_name: str = spec.trigger["queueName"]
        self.poison_name = f"{self.queue_name}-poison"
        self.storage = host.storage(spec.trigger.get("connection"))
        self.options = host.queue_options
        self._condition = threading.Condition()
        self._in_flight = 0
        self._wake = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"queue-{spec.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def join(self) -> None:
        """Wait for the poll loop and every invocation it started."""
        self._thread.join()
        with self._condition:
            while self._in_flight:
                self._condition.wait()

    def wake(self) -> None:
        """Poll now: a message was just added to this queue by this host."""
        with self._condition:
            self._wake = True
            self._condition.notify_all()

    def _run(self) -> None:
        delay = MIN_POLLING_INTERVAL
        max_delay = min(self.options.max_polling_interval, LOCAL_MAX_POLLING_INTERVAL)
        try:
            self.storage.ensure_queue(self.queue_name)
        except Exception as exc:
            log.error("Queue listener for '%s' could not create queue %s: %s",
                      self.spec.name, self.queue_name, exc)
        while True:
            with self._condition:
                while self._in_flight > self.options.new_batch_threshold and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                self._wake = False
            try:
                messages = list(self.storage.queue(self.queue_name).receive_messages(
                    messages_per_page=self.options.batch_size,
                    max_messages=self.options.batch_size,
                    visibility_timeout=RECEIVE_VISIBILITY_TIMEOUT,
                ))
            except Exception as exc:
                log.warning("Polling queue '%s' failed: %s", self.queue_name, exc)
                messages = []
            if messages:
                delay = MIN_POLLING_INTERVAL
                for message in messages:
                    with self._condition:
                        self._in_flight += 1
                    threading.Thread(
                        target=self._process, args=(message,), name=f"msg-{message.id[:8]}", daemon=True
                    ).start()
                continue
            with self._condition:
                if not self._wake and not self._stopping:
                    self._condition.wait(delay * random.uniform(0.8, 1.2))
            delay = min(max_delay, delay * 2)

    def _done(self) -> None:
        with self._condition:
            self._in_flight -= 1
            self._wake = True
            self._condition.notify_all()

    def _process(self, message: QueueMessage) -> None:
        try:
            self._handle(message)
        except Exception:
            log.exception("Processing message %s from '%s' failed in the host", message.id, self.queue_name)
        finally:
            self._done()

    def _poison(self, message: QueueMessage, wire_text: str) -> None:
        self.storage.send(self.poison_name, wire_text, time_to_live=-1)
        self._delete(message)
        log.warning(
            "Message has reached MaxDequeueCount of %d. Moved message %s to queue '%s'.",
            self.options.max_dequeue_count, message.id, self.poison_name,
        )

    def _delete(self, message: QueueMessage) -> None:
        from azure.core.exceptions import HttpResponseError

        try:
            self.storage.queue(self.queue_name).delete_message(message.id, message.pop_receipt)
        except HttpResponseError as exc:
            log.debug("Unable to delete queue message '%s': %s", message.id, exc)

    def _handle(self, message: QueueMessage) -> None:
        from azure.functions import queue as function_queue

        wire = str(message.content or "")
        body = decode_message(wire, self.options.message_encoding)
        if body is None:
            self.storage.send(self.poison_name, wire, time_to_live=-1)
            self._delete(message)
            log.warning("Message %s on '%s' is not valid base64: moved it to '%s' as it is.",
                        message.id, self.queue_name, self.poison_name)
            return
        dequeue_count = int(message.dequeue_count or 1)
        if dequeue_count > self.options.max_dequeue_count:
            self._poison(message, wire)
            return
        text = body.decode("utf-8", errors="replace")
        queue_message = typing.cast(Any, function_queue.QueueMessage)(
            id=message.id,
            body=body,
            dequeue_count=dequeue_count,
            insertion_time=message.inserted_on,
            expiration_time=message.expires_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        kind = _type_kind(self.spec.params.get(self.spec.trigger["name"]))
        trigger_value: Any = text if kind == "str" else body if kind == "bytes" else queue_message
        data: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            payload = json.loads(text)
            if isinstance(payload, dict):
                data.update(payload)
        data.update({
            "QueueTrigger": text, "Id": message.id, "DequeueCount": dequeue_count,
            "InsertionTime": message.inserted_on, "ExpirationTime": message.expires_on,
            "NextVisibleTime": message.next_visible_on, "PopReceipt": message.pop_receipt,
        })
        try:
            self.host.invoker.invoke(
                self.spec, trigger_value, data, f"New queue message detected on '{self.queue_name}'."
            )
        except InvocationFailed:
            if dequeue_count >= self.options.max_dequeue_count:
                self._poison(message, wire)
            else:
                self._release(message)
            return
        self._delete(message)

    def _release(self, message: QueueMessage) -> None:
        from azure.core.exceptions import HttpResponseError

        try:
            self.storage.queue(self.queue_name).update_message(
                message.id, message.pop_receipt, visibility_timeout=int(self.options.visibility_timeout)
            )
        except HttpResponseError as exc:
            log.debug("Unable to release queue message '%s': %s", message.id, exc)


# --------------------------------------------------------------------------- timers


class TimerListener:
    """Runs one timer function on its NCRONTAB schedule; never two runs of it at once."""

    def __init__(self, host: Host, spec: FunctionSpec) -> None:
        self.host = host
        self.spec = spec
        self.schedule = ncrontab.parse(spec.trigger["schedule"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"timer-{spec.name}", daemon=True)
        self.run_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        self._thread.join()

    def fire(self, *, scheduled: datetime | None, reason: str) -> None:
        from azure.functions.timer import TimerRequest

        now = datetime.now(UTC)
        past_due = scheduled is not None and (now - scheduled).total_seconds() > TIMER_PAST_DUE_TOLERANCE
        last = scheduled or now
        request = TimerRequest(
            past_due=past_due,
            schedule_status={"Last": last.isoformat(), "Next": self.schedule.next_after(last).isoformat(),
                             "LastUpdated": now.isoformat()},
            schedule={"AdjustForDST": False},
        )
        with self.run_lock, contextlib.suppress(InvocationFailed):
            self.host.invoker.invoke(self.spec, request, {}, reason)

    def _run(self) -> None:
        if self.spec.trigger.get("runOnStartup"):
            self.fire(scheduled=None, reason="Timer fired at startup (runOnStartup).")
        while not self._stop.is_set():
            due = self.schedule.next_after(datetime.now(UTC))
            wait = (due - datetime.now(UTC)).total_seconds()
            if self._stop.wait(max(0.0, wait)):
                return
            self.fire(scheduled=due, reason=f"Timer fired at {datetime.now(UTC).isoformat()}")


# --------------------------------------------------------------------------- the host


@dataclass
class HostOptions:
    app: str = "function_app"
    port: int = 7071
    bind: str = "127.0.0.1"
    script_root: Path = field(default_factory=Path.cwd)
    settings_file: Path | None = None
    ready_file: Path | None = None
    app_object: Any = None  # a FunctionApp to serve instead of importing ``app`` (tests)


def load_app(module_spec: str, script_root: Path) -> Any:
    """Import ``module[:attribute]`` (attribute default ``app``) from the script root."""
    import importlib

    module_name, _, attribute = module_spec.partition(":")
    root = str(script_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app", None)
    if app is None or not hasattr(app, "get_functions"):
        raise HostError(f"{module_spec}: no FunctionApp named '{attribute or 'app'}'")
    return app


def _state_file_connection(environ: Mapping[str, str]) -> str | None:
    state = environ.get("DEVSTACK_STATE")
    if not state:
        return None
    try:
        document = json.loads(Path(state).read_text(encoding="utf-8"))
        value = document["azurite"]["connection_string"]
        return str(value) if value else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Host:
    """The running host: settings, indexed functions, HTTP server, queue and timer listeners."""

    def __init__(self, options: HostOptions, environ: MutableMapping[str, str] | None = None) -> None:
        self.options = options
        self.environ = os.environ if environ is None else environ
        self.script_root = options.script_root.resolve()
        self.started_at = time.monotonic()
        self.state = "Initialized"
        self.errors: list[str] = []
        settings_file = options.settings_file or self.script_root / "local.settings.json"
        skipped = apply_local_settings(read_local_settings(settings_file), self.environ)
        for name in skipped:
            log.info("Skipping '%s' from local settings as it's already defined in current environment "
                     "variables.", name)
        if not self.environ.get("AzureWebJobsStorage"):
            connection = _state_file_connection(self.environ)
            if connection:
                self.environ["AzureWebJobsStorage"] = connection
                log.info("AzureWebJobsStorage: using Azurite from the devstack state file")
        host_json_path = self.script_root / "host.json"
        host_json = json.loads(host_json_path.read_text(encoding="utf-8")) if host_json_path.is_file() else {}
        self.config = host_configuration(host_json, self.environ)
        self.queue_options = QueueOptions.from_config(self.config)
        _, timeout = _lookup(self.config, "functionTimeout")
        self.function_timeout = parse_timespan(timeout) if timeout else 30 * 60.0
        _, prefix = _lookup(section(self.config, "extensions", "http"), "routePrefix")
        self.route_prefix = ("api" if prefix is None else str(prefix)).strip("/")
        self.keys = Keys.from_env(self.environ)
        self.host_id = (self.environ.get("AzureFunctionsWebHost__hostid")
                        or re.sub(r"[^a-z0-9-]", "", self.script_root.name.lower())[:32] or "localhost")
        self._storages: dict[str, StorageAccount] = {}
        self._storage_lock = threading.Lock()
        self._requests = 0
        self._requests_done = threading.Condition()
        app = options.app_object
        if app is None:
            app = load_app(options.app, self.script_root)
        self.specs = index_functions(app, self.environ)
        for spec in self.specs:
            if spec.error:
                self.errors.append(spec.error)
                log.error("The '%s' function is in error: %s", spec.name, spec.error)
        self.routes = build_routes(self.specs)
        self.invoker = Invoker(self)
        self.queue_listeners: list[QueueListener] = []
        self.timers: dict[str, TimerListener] = {}
        self._server: BaseWSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # -- plumbing used by triggers and bindings

    def storage(self, connection: str | None) -> StorageAccount:
        name = connection or "AzureWebJobsStorage"
        with self._storage_lock:
            account = self._storages.get(name)
            if account is None:
                account = self._storages[name] = StorageAccount(name, self.environ)
            return account

    def notify_enqueued(self, queue_name: str) -> None:
        for listener in self.queue_listeners:
            if listener.queue_name == queue_name:
                listener.wake()

    @contextlib.contextmanager
    def track_request(self) -> Iterator[None]:
        with self._requests_done:
            self._requests += 1
        try:
            yield
        finally:
            with self._requests_done:
                self._requests -= 1
                self._requests_done.notify_all()

    def status(self) -> dict[str, Any]:
        return {
            "id": self.host_id,
            "state": self.state,
            "version": HOST_VERSION,
            "processUptime": int((time.monotonic() - self.started_at) * 1000),
            "errors": self.errors,
            "functions": [s.name for s in self.specs if not s.error],
        }

    def invoke_on_demand(self, spec: FunctionSpec, text: str) -> None:
        """``POST /admin/functions/{name}``: run a non-HTTP function in the background (202)."""
        from azure.functions import queue as function_queue

        if spec.trigger_type == "timerTrigger":
            timer = self.timers.get(spec.name)
            if timer is None:
                raise HostError(f"timer '{spec.name}' is not running")
            target: Callable[[], None] = lambda: timer.fire(  # noqa: E731
                scheduled=None, reason="This function was programmatically called via the host APIs.")
        elif spec.trigger_type == "queueTrigger":
            body = text.encode("utf-8")
            factory = typing.cast(Any, function_queue.QueueMessage)
            message = factory(id=str(uuid.uuid4()), body=body, dequeue_count=1)
            kind = _type_kind(spec.params.get(spec.trigger["name"]))
            value: Any = text if kind == "str" else body if kind == "bytes" else message

            def target() -> None:
                with contextlib.suppress(InvocationFailed):
                    self.invoker.invoke(spec, value, {"QueueTrigger": text},
                                        "This function was programmatically called via the host APIs.")
        else:
            raise HostError(
                f"'{spec.name}' has a {spec.trigger_type}; call HTTP functions through their route"
            )
        threading.Thread(target=target, name=f"admin-{spec.name}", daemon=True).start()

    # -- lifecycle

    def start(self) -> None:
        from werkzeug.serving import make_server

        self.state = "Starting"
        for spec in self.specs:
            if spec.error:
                continue
            try:
                if spec.trigger_type == "queueTrigger":
                    self.queue_listeners.append(QueueListener(self, spec))
                elif spec.trigger_type == "timerTrigger":
                    self.timers[spec.name] = TimerListener(self, spec)
                elif spec.trigger_type != "httpTrigger":
                    raise HostError(f"trigger type {spec.trigger_type!r} is not supported by the local host")
            except HostError as exc:
                spec.error = f"The '{spec.name}' function is in error: {exc}"
                self.errors.append(spec.error)
                log.error(spec.error)
        self._server = make_server(self.options.bind, self.options.port, create_http_app(self), threaded=True)
        port = self._server.server_port
        self._server_thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._server_thread.start()
        for listener in self.queue_listeners:
            listener.start()
        for timer in self.timers.values():
            timer.start()
        self.state = "Running"
        self._print_functions(port)
        if self.options.ready_file:
            ready = json.dumps({"pid": os.getpid(), "port": port})
            self.options.ready_file.write_text(ready, encoding="utf-8")
        log.info("Host started (port %d, %d functions)", port, len([s for s in self.specs if not s.error]))

    @property
    def port(self) -> int:
        return self._server.server_port if self._server else self.options.port

    def _print_functions(self, port: int) -> None:
        lines = ["", "Functions:", ""]
        for spec in self.specs:
            if spec.error:
                lines.append(f"\t{spec.name}: (error) {spec.error}")
                continue
            if spec.trigger_type == "httpTrigger":
                route = next(r for r in self.routes if r.spec is spec)
                methods = ",".join(sorted(route.methods)) if route.methods else "ALL"
                prefix = f"/{self.route_prefix}" if self.route_prefix else ""
                lines.append(f"\t{spec.name}: [{methods}] http://{self.options.bind}:{port}{prefix}/{route.template}")
            else:
                detail = spec.trigger.get("queueName") or spec.trigger.get("schedule") or ""
                lines.append(f"\t{spec.name}: {spec.trigger_type} ({detail})")
        print("\n".join(lines) + "\n", flush=True)

    def stop(self, grace: float = 30.0) -> None:
        """Stop polling and timers, let running invocations and requests finish, then stop serving."""
        if self.state in ("Stopping", "Stopped"):
            return
        self.state = "Stopping"
        log.info("Stopping host: no new messages or timer runs; waiting for running invocations")
        for listener in self.queue_listeners:
            listener.stop()
        for timer in self.timers.values():
            timer.stop()
        for listener in self.queue_listeners:
            listener.join()
        for timer in self.timers.values():
            timer.join()
        deadline = time.monotonic() + grace
        with self._requests_done:
            while self._requests and time.monotonic() < deadline:
                self._requests_done.wait(deadline - time.monotonic())
        if self._server is not None:
            self._server.shutdown()
        self.invoker.close()
        self.state = "Stopped"
        log.info("Host stopped")
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def _configure_logging() -> None:
    formatter = logging.Formatter("[%(asctime)s.%(msecs)03dZ] %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("azure", "urllib3", "werkzeug", "msal"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> HostOptions:
    parser = argparse.ArgumentParser(prog="python -m devstack.host", description=__doc__.splitlines()[0])
    parser.add_argument("--app", default="function_app", help="module[:attribute] of the FunctionApp")
    parser.add_argument("--port", type=int, default=int(os.environ.get("FUNCTIONS_HTTPWORKER_PORT") or 7071),
                        help="HTTP port (0: any free port; see --ready-file)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--script-root", type=Path, default=Path.cwd(),
                        help="folder with host.json and the app")
    parser.add_argument("--settings", type=Path, default=None, help="local.settings.json to read (Values)")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="write {pid, port} here once every trigger is listening")
    args = parser.parse_args(argv)
    return HostOptions(app=args.app, port=args.port, bind=args.bind, script_root=args.script_root,
                       settings_file=args.settings, ready_file=args.ready_file)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    options = parse_args(argv)
    try:
        host = Host(options)
        host.start()
    except (HostError, ImportError, OSError) as exc:
        log.error("Host failed to start: %s", exc)
        return 1

    def shutdown(signum: int, _frame: types.FrameType | None) -> None:
        log.info("Received %s", signal.Signals(signum).name)
        threading.Thread(target=host.stop, name="shutdown").start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    while not host._stopped.wait(0.5):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
