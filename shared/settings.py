"""The app's settings: declared once, read lazily at first use, validated with messages that name the setting.

Importing the function app must never fail because a setting is missing (Azure would only say
"0 functions found"), so nothing here runs at import time.  ``SETTINGS`` is the single list of
names the code reads; the infra tests compare it with the app settings the Bicep deploys.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import ConfigurationError


@dataclass(frozen=True)
class SettingSpec:
    name: str
    default: str | None  # None: required
    description: str
    # Read by azure-identity itself, or only by the Functions host through a binding expression.
    external: bool = False


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("DATAVERSE_URL", None, "Environment URL, e.g. https://contoso.crm4.dynamics.com"),
    SettingSpec("DATAVERSE_TENANT_ID", None, "Entra tenant (directory) id of the app registration"),
    SettingSpec("DATAVERSE_CLIENT_ID", None, "Application (client) id of the app registration"),
    SettingSpec("KEY_VAULT_URL", None, "https://<vault>.vault.azure.net"),
    SettingSpec(
        "DATAVERSE_CLIENT_SECRET_NAME", "dataverse-client-secret", "Key Vault secret with the client secret"
    ),
    SettingSpec(
        "DATAVERSE_CREDENTIAL", "secret",
        "How the app proves itself to Entra ID: secret, federated (managed identity) or certificate",
    ),
    SettingSpec(
        "DATAVERSE_CERTIFICATE_NAME", "dataverse-certificate",
        "Key Vault certificate (read as the secret of the same name) for DATAVERSE_CREDENTIAL=certificate",
    ),
    SettingSpec(
        "WEBHOOK_SECRET_NAME", "webhook-signing-secret", "Key Vault secret with the webhook signing key"
    ),
    SettingSpec(
        "MESSAGE_SIGNING_SECRET_NAME", "queue-message-signing-key",
        "Key Vault secret the app signs and verifies queue messages with (never given to senders)",
    ),
    SettingSpec(
        "WEBHOOK_KEY_GRACE_SECONDS", "600",
        "How long a replaced webhook (or message) signing key is still accepted after the new one is read",
    ),
    SettingSpec(
        "WEBHOOK_KEY_REFRESH_SECONDS", "300",
        "How often an instance re-reads the signing keys from Key Vault (at most one read per period)",
    ),
    SettingSpec("DATAVERSE_API_VERSION", "v9.2", "Web API version"),
    SettingSpec(
        "SYNC_QUEUE_NAME", "dynamics-sync", "Queue of sync jobs; -deadletter and -poison derive from it"
    ),
    SettingSpec("RECONCILE_SCHEDULE", "0 0 */6 * * *", "NCRONTAB schedule of reconcile_users", external=True),
    SettingSpec("DATAVERSE_TIMEOUT_SECONDS", "30", "Timeout of one Dataverse HTTP request"),
    SettingSpec("DATAVERSE_MAX_RETRIES", "5", "Retries of one Dataverse request on 429/5xx/timeouts"),
    SettingSpec(
        "DATAVERSE_MAX_RETRY_SECONDS", "300",
        "Total time one request may wait to retry (300 s covers one service-protection window)",
    ),
    SettingSpec(
        "JOB_DEADLINE_SECONDS", "480",
        "A job stops waiting (throttling, back-off) at this age and goes back to the queue; must leave "
        "DATAVERSE_TIMEOUT_SECONDS before host.json's functionTimeout",
    ),
    SettingSpec(
        "HTTP_MAX_WAIT_SECONDS", "5",
        "Longest an HTTP trigger waits on Dataverse throttling before answering 503 with Retry-After",
    ),
    SettingSpec(
        "DATAVERSE_SHARED_THROTTLE", "auto",
        "One Dataverse throttle for all instances through AzureWebJobsStorage: auto (on when storage is "
        "configured), true or false",
    ),
    SettingSpec("DATAVERSE_THROTTLE_REFRESH_SECONDS", "1",
                "How often an instance re-reads the shared throttle blob (conditional GET)"),
    SettingSpec("DATAVERSE_THROTTLE_GROW_AFTER", "10",
                "Successes in a row that add one concurrency slot back after a 429 halved it"),
    SettingSpec(
        "DATAVERSE_THROTTLE_HEARTBEAT_SECONDS", "15",
        "How often an instance marks itself live in the shared blob (the dop hint is split among the live)",
    ),
    SettingSpec("USER_CACHE_TTL_SECONDS", "900", "How long a found user stays cached per instance"),
    SettingSpec("USER_CACHE_NEGATIVE_TTL_SECONDS", "60", "How long 'no such user' stays cached"),
    SettingSpec(
        "AUTHORIZATION_POLICY", "",
        "The authorization policy as inline JSON (docs/authorization.md); empty: the default policy",
    ),
    SettingSpec(
        "AUTHORIZATION_POLICY_BLOB", "",
        "<container>/<path> of the policy JSON in the app's storage, re-read every minute; empty: none",
    ),
    SettingSpec(
        "ALLOWED_ENTITY_SETS", "contacts,accounts,leads",
        "Entity sets jobs may write when no policy is set (the default policy)",
    ),
    SettingSpec(
        "AZURE_AUTHORITY_HOST", "", "Entra authority host (azure-identity's own setting)", external=True
    ),
    SettingSpec("AZURE_CLIENT_ID", "", "User-assigned managed identity for Key Vault (azure-identity's own)",
                external=True),
)

CREDENTIAL_MODES = ("secret", "federated", "certificate")

_PUBLIC_AUTHORITIES = (
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn",
)


def _https_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigurationError(name, f"must be an https:// URL, got {value!r}")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigurationError(name, f"must be the bare https://host[:port] with no path, got {value!r}")
    return f"https://{parts.netloc}"


def _guid(name: str, value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ConfigurationError(name, f"must be a GUID, got {value!r}") from None


def _positive(
    name: str, value: str, kind: Callable[[str], float] = float, *, allow_zero: bool = True
) -> float:
    """A finite number >= 0 (> 0 when ``allow_zero`` is off).

    ``nan``/``inf`` parse as floats but would surface much later as an error that names no setting
    (urllib3 refuses a zero or infinite timeout when the first request is sent).
    """
    try:
        number = kind(value)
    except ValueError:
        raise ConfigurationError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigurationError(name, f"must be a finite number, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        least = "at least 0" if allow_zero else "more than 0"
        raise ConfigurationError(name, f"must be {least}, got {value!r}")
    return number


FUNCTION_TIMEOUT_OVERRIDE = "AzureFunctionsJobHost__functionTimeout"
"""The app setting that overrides host.json's ``functionTimeout`` (the host's own override syntax)."""
HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"


def parse_timespan(text: str) -> float | None:
    """Seconds of a .NET TimeSpan ``[d.]hh:mm:ss[.fff]``; None for ``-1``/empty (no limit) or garbage."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", text)
    if match is None:
        return None
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def function_timeout_seconds(
    env: Mapping[str, str] | None = None, host_json: Path = HOST_JSON
) -> float | None:
    """The host's ``functionTimeout`` as this app is deployed (app-setting override, else host.json).

    None when neither says (the plan's default applies: 30 min on Flex Consumption) or it is unbounded.
    """
    env = os.environ if env is None else env
    override = (env.get(FUNCTION_TIMEOUT_OVERRIDE) or "").strip()
    if override:
        return parse_timespan(override)
    try:
        config = json.loads(host_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("functionTimeout") if isinstance(config, dict) else None
    return parse_timespan(value) if isinstance(value, str) else None


def http_max_wait_seconds(env: Mapping[str, str] | None = None) -> float:
    """``HTTP_MAX_WAIT_SECONDS`` alone: the HTTP triggers read it even when other settings are broken."""
    env = os.environ if env is None else env
    raw = (env.get("HTTP_MAX_WAIT_SECONDS") or "").strip() or _default("HTTP_MAX_WAIT_SECONDS")
    return _positive("HTTP_MAX_WAIT_SECONDS", raw)


def _default(name: str) -> str:
    default = next(s for s in SETTINGS if s.name == name).default
    assert default is not None
    return default


def _job_deadline(value: str, request_timeout: float, env: Mapping[str, str]) -> float:
    """A job's deadline, which must leave one request's timeout before the host's functionTimeout.

    After the deadline no new request starts, but one already sent may run DATAVERSE_TIMEOUT_SECONDS
    more; the host must not abandon the invocation meanwhile, or the message would be redelivered
    while this copy still runs.
    """
    seconds = _positive("JOB_DEADLINE_SECONDS", value, allow_zero=False)
    limit = function_timeout_seconds(env)
    if limit is not None and seconds + request_timeout >= limit:
        raise ConfigurationError(
            "JOB_DEADLINE_SECONDS",
            f"{value} s plus DATAVERSE_TIMEOUT_SECONDS ({request_timeout:g} s) must stay below the host's "
            f"functionTimeout ({limit:g} s, host.json or {FUNCTION_TIMEOUT_OVERRIDE})",
        )
    return seconds


@dataclass(frozen=True)
class Settings:
    dataverse_url: str
    tenant_id: str
    client_id: str
    key_vault_url: str
    client_secret_name: str = "dataverse-client-secret"  # noqa: S105 (a Key Vault secret's name)
    webhook_secret_name: str = "webhook-signing-secret"  # noqa: S105
    message_secret_name: str = "queue-message-signing-key"  # noqa: S105
    key_grace_seconds: float = 600.0
    key_refresh_seconds: float = 300.0
    credential: str = "secret"  # one of CREDENTIAL_MODES
    certificate_name: str = "dataverse-certificate"
    api_version: str = "v9.2"
    sync_queue_name: str = "dynamics-sync"
    authority_host: str = ""
    timeout_seconds: float = 30.0
    max_retries: int = 5
    max_retry_seconds: float = 300.0
    user_cache_ttl: float = 900.0
    user_cache_negative_ttl: float = 60.0
    job_deadline_seconds: float = 480.0
    http_max_wait_seconds: float = 5.0
    authorization_policy: str = ""
    authorization_policy_blob: str = ""
    allowed_entity_sets: str = "contacts,accounts,leads"
    shared_throttle: str = "auto"  # auto | true | false
    throttle_refresh_seconds: float = 1.0
    throttle_grow_after: int = 10
    throttle_heartbeat_seconds: float = 15.0

    @property
    def api_base(self) -> str:
        """``https://org.crm.dynamics.com/api/data/v9.2/`` (with the trailing slash)."""
        return f"{self.dataverse_url}/api/data/{self.api_version}/"

    @property
    def scope(self) -> str:
        return f"{self.dataverse_url}/.default"

    @property
    def public_authority(self) -> bool:
        """False for a private authority (sovereign test host, the local emulator): no instance discovery."""
        if not self.authority_host:
            return True
        return (urlsplit(self.authority_host).hostname or "") in _PUBLIC_AUTHORITIES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def value(name: str) -> str:
            spec = next(s for s in SETTINGS if s.name == name)
            raw = (env.get(name) or "").strip()
            if raw:
                return raw
            if spec.default is None:
                raise ConfigurationError(name, f"is required ({spec.description})", code="setting_missing")
            return spec.default

        authority = value("AZURE_AUTHORITY_HOST")
        if authority:
            parts = urlsplit(authority if "://" in authority else f"https://{authority}")
            if parts.scheme != "https" or not parts.hostname:
                raise ConfigurationError(
                    "AZURE_AUTHORITY_HOST", f"must be an https:// host, got {authority!r}"
                )
            authority = f"https://{parts.netloc}"
        api_version = value("DATAVERSE_API_VERSION")
        if not api_version.startswith("v") or not api_version[1:].replace(".", "").isdigit():
            raise ConfigurationError("DATAVERSE_API_VERSION", f"must look like v9.2, got {api_version!r}")
        credential = value("DATAVERSE_CREDENTIAL").lower()
        if credential not in CREDENTIAL_MODES:
            raise ConfigurationError(
                "DATAVERSE_CREDENTIAL", f"must be one of {', '.join(CREDENTIAL_MODES)}, got {credential!r}"
            )
        timeout_seconds = _positive(
            "DATAVERSE_TIMEOUT_SECONDS", value("DATAVERSE_TIMEOUT_SECONDS"), allow_zero=False
        )
        shared_throttle = value("DATAVERSE_SHARED_THROTTLE").lower()
        if shared_throttle not in ("auto", "true", "false"):
            raise ConfigurationError(
                "DATAVERSE_SHARED_THROTTLE", f"must be auto, true or false, got {shared_throttle!r}"
            )
        return cls(
            dataverse_url=_https_url("DATAVERSE_URL", value("DATAVERSE_URL")),
            tenant_id=_guid("DATAVERSE_TENANT_ID", value("DATAVERSE_TENANT_ID")),
            client_id=_guid("DATAVERSE_CLIENT_ID", value("DATAVERSE_CLIENT_ID")),
            key_vault_url=_https_url("KEY_VAULT_URL", value("KEY_VAULT_URL")),
            client_secret_name=value("DATAVERSE_CLIENT_SECRET_NAME"),
            webhook_secret_name=value("WEBHOOK_SECRET_NAME"),
            message_secret_name=value("MESSAGE_SIGNING_SECRET_NAME"),
            key_grace_seconds=_positive("WEBHOOK_KEY_GRACE_SECONDS", value("WEBHOOK_KEY_GRACE_SECONDS")),
            key_refresh_seconds=_positive(
                "WEBHOOK_KEY_REFRESH_SECONDS", value("WEBHOOK_KEY_REFRESH_SECONDS"), allow_zero=False
            ),
            credential=credential,
            certificate_name=value("DATAVERSE_CERTIFICATE_NAME"),
            api_version=api_version,
            sync_queue_name=value("SYNC_QUEUE_NAME"),
            authority_host=authority,
            timeout_seconds=timeout_seconds,
            max_retries=int(_positive("DATAVERSE_MAX_RETRIES", value("DATAVERSE_MAX_RETRIES"), int)),
            max_retry_seconds=_positive("DATAVERSE_MAX_RETRY_SECONDS", value("DATAVERSE_MAX_RETRY_SECONDS")),
            user_cache_ttl=_positive("USER_CACHE_TTL_SECONDS", value("USER_CACHE_TTL_SECONDS")),
            user_cache_negative_ttl=_positive(
                "USER_CACHE_NEGATIVE_TTL_SECONDS", value("USER_CACHE_NEGATIVE_TTL_SECONDS")
            ),
            job_deadline_seconds=_job_deadline(value("JOB_DEADLINE_SECONDS"), timeout_seconds, env),
            http_max_wait_seconds=http_max_wait_seconds(env),
            # validated (with the JSON path of each problem) by shared.policy at first use
            authorization_policy=value("AUTHORIZATION_POLICY"),
            authorization_policy_blob=value("AUTHORIZATION_POLICY_BLOB"),
            allowed_entity_sets=value("ALLOWED_ENTITY_SETS"),
            shared_throttle=shared_throttle,
            throttle_refresh_seconds=_positive(
                "DATAVERSE_THROTTLE_REFRESH_SECONDS", value("DATAVERSE_THROTTLE_REFRESH_SECONDS")
            ),
            throttle_grow_after=int(_positive(
                "DATAVERSE_THROTTLE_GROW_AFTER", value("DATAVERSE_THROTTLE_GROW_AFTER"), int, allow_zero=False
            )),
            throttle_heartbeat_seconds=_positive(
                "DATAVERSE_THROTTLE_HEARTBEAT_SECONDS", value("DATAVERSE_THROTTLE_HEARTBEAT_SECONDS"),
                allow_zero=False,
            ),
        )


_lock = threading.Lock()
_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read from the environment at first use and then kept."""
    global _settings
    if _settings is None:
        with _lock:
            if _settings is None:
                _settings = Settings.from_env()
    return _settings


def reset_settings() -> None:
    """Forget the cached settings (tests, and the local host when it switches sandboxes)."""
    global _settings
    with _lock:
        _settings = None
