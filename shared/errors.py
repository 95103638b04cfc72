"""One small exception hierarchy: every failure is data with a machine code and a human message.

Triggers decide retry versus dead-letter from ``error.transient`` (set by the type, or by the
HTTP status for Dataverse errors), never by matching message text.  The machine codes are part
of the public contract: they appear as ``reason`` in dead-letter records and ``code`` in HTTP
error bodies.
"""

from __future__ import annotations

import re
from typing import Any


class SyncError(Exception):
    """Base of every error the project raises on purpose."""

    code: str = "sync_error"
    transient: bool = False
    # Set by shared.deadline when this error is raised only because the raising invocation's own deadline
    # forbade the wait it asked for: a verdict on that caller's time, not on the call (shared.singleflight).
    deadline_limited: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        transient: bool | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if transient is not None:
            self.transient = transient
        self.details: list[dict[str, Any]] = details or []

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The ``{"code", "message", "details"}`` shape used in HTTP error bodies."""
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigurationError(SyncError):
    """A setting is missing or malformed; the message names the setting."""

    code = "setting_invalid"

    def __init__(self, setting: str, message: str, *, code: str = "setting_invalid") -> None:
        super().__init__(f"{setting}: {message}", code=code, details=[{"setting": setting}])
        self.setting = setting


class InvalidJob(SyncError):
    """A job or message breaks the contract.  ``details`` lists ``{"field", "message"}`` entries.

    Codes: ``invalid_json``, ``invalid_job``, ``job_too_large``.
    """

    code = "invalid_job"


class ActorError(SyncError):
    """The user to act as cannot be used: ``actor_not_found``, ``actor_disabled``, ``actor_ambiguous``."""

    code = "actor_not_found"


class ImpersonationNotApplied(SyncError):
    """Dataverse ran an impersonated write as somebody other than the actor (its silent fallback)."""

    code = "impersonation_not_applied"


class PolicyViolation(SyncError):
    """The authorization policy of the job's source forbids it: ``forbidden_by_policy`` (permanent).

    ``details`` lists ``{"field", "message"}`` entries, like InvalidJob, naming what the policy refused.
    """

    code = "forbidden_by_policy"


class UnauthenticatedMessage(SyncError):
    """A queue message whose ``_auth`` is missing, malformed or does not verify: ``unauthenticated_message``.

    Permanent and the message's own fault (dead-lettered with the message kept): the queue is a way in
    that bypasses the webhook's signature, so an unsigned message is refused, never guessed at.
    """

    code = "unauthenticated_message"


class ReplayStoreUnavailable(SyncError):
    """The shared replay window (blob storage) could not be read or written: ``replay_store_unavailable``.

    Transient: the webhook answers 503 with Retry-After rather than accept a body it cannot prove new.
    """

    code = "replay_store_unavailable"
    transient = True


class AuthError(SyncError):
    """Managed identity, Key Vault or Entra ID refused or failed.

    Permanent codes point at a misconfiguration: ``entra_invalid_client`` (AADSTS7000215/7000222),
    ``entra_unauthorized_client`` (AADSTS700016), ``entra_invalid_tenant`` (AADSTS90002),
    ``entra_invalid_scope`` (AADSTS70011/500011: DATAVERSE_URL is not an environment of the tenant),
    ``entra_rejected`` (any other 4xx from Entra), ``keyvault_forbidden``, ``keyvault_secret_not_found``,
    ``managed_identity_not_configured`` (no identity, or the identity endpoint refused the client id),
    ``entra_federation_mismatch`` (AADSTS70021), ``entra_invalid_certificate`` (AADSTS700027),
    ``entra_invalid_assertion``, ``keyvault_certificate_invalid`` (docs/credentials.md).
    Transient ones: ``entra_unavailable``, ``keyvault_unavailable``, ``managed_identity_unavailable``.
    """

    code = "auth_failed"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        transient: bool = False,
        status: int | None = None,
        aadsts: int | None = None,
    ) -> None:
        super().__init__(message, code=code, transient=transient)
        self.status = status
        self.aadsts = aadsts


_PERMANENT_STATUS_CODES = {
    400: "dataverse_bad_request",
    401: "dataverse_unauthorized",
    403: "dataverse_forbidden",
    404: "record_not_found",
    405: "dataverse_bad_request",
    412: "precondition_failed",
    413: "dataverse_bad_request",
}

# "Resource not found for the segment '<name>'": the entity set does not exist (404).  Learn's
# troubleshooting article shows 0x8006088a; current environments answer 0x80060888.
_SEGMENT_NOT_FOUND_CODES = frozenset({"0x80060888", "0x8006088a"})
# Dataverse's OData payload reader naming a column the table does not have (400, code 0x80048d19 wrapped
# in "Error identified in Payload ...", or 0x80060888 / no code in older answers).
_UNKNOWN_PROPERTY = re.compile(r"The property '([^']{1,200})' does not exist on type '([^']{1,200})'")


def unknown_column(text: str | None) -> tuple[str, str] | None:
    """``(column, type)`` when a Dataverse error message says a write named a column that does not exist.

    The message is the only place Dataverse names the column, so it is read here, once; the code that
    results (``invalid_column``) is what everything else branches on.
    """
    found = _UNKNOWN_PROPERTY.search(text or "")
    return (found.group(1), found.group(2)) if found else None


_DATAVERSE_CODE_NAMES = {
    "0x8004a110": "impersonation_privilege_missing",
    "0x80072322": "dataverse_throttled",
    "0x80072321": "dataverse_throttled",
    "0x80072326": "dataverse_throttled",
}


class DataverseError(SyncError):
    """A Dataverse Web API call failed; keeps the HTTP status, the Dataverse code and its message.

    Transient: 429, 5xx, timeouts, dropped connections, and 2xx bodies that cannot be read.
    Permanent: 400, 401 (after one token refresh), 403, 404, 412 and other 4xx.
    """

    code = "dataverse_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        dataverse_code: str | None = None,
        code: str | None = None,
        transient: bool | None = None,
        retry_after: float | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        if code is None:
            code = self.code_for(status, dataverse_code)
        if transient is None:
            transient = status is None or status == 429 or status >= 500
        super().__init__(message, code=code, transient=transient, details=details)
        self.status = status
        self.dataverse_code = dataverse_code
        self.retry_after = retry_after

    @staticmethod
    def code_for(status: int | None, dataverse_code: str | None, text: str | None = None) -> str:
        """The machine code of an answer.  ``text`` (Dataverse's message) only tells a missing column
        apart from other 400s: ``invalid_column``; a missing entity set is 404 with the segment code."""
        if dataverse_code and dataverse_code.lower() in _DATAVERSE_CODE_NAMES:
            return _DATAVERSE_CODE_NAMES[dataverse_code.lower()]
        if status == 404 and dataverse_code and dataverse_code.lower() in _SEGMENT_NOT_FOUND_CODES:
            return "entity_not_found"
        if status == 400 and unknown_column(text) is not None:
            return "invalid_column"
        if status is None:
            return "dataverse_unreachable"
        if status == 429:
            return "dataverse_throttled"
        if status >= 500:
            return "dataverse_unavailable"
        return _PERMANENT_STATUS_CODES.get(status, "dataverse_bad_request")

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["details"] = [*self.details, {"status": self.status, "dataverseCode": self.dataverse_code}]
        return body


# --------------------------------------------------------------------------- what to do about each code

PORTAL_APP_USERS = (
    "Power Platform admin center (https://admin.powerplatform.microsoft.com) > Manage > Environments > "
    "<your environment> > Settings > Users + permissions > Application users"
)
"""Where the application user lives; every fix text that sends an operator there uses this path."""
PORTAL_SECURITY_ROLES = (
    "Power Platform admin center > Manage > Environments > <your environment> > Settings > "
    "Users + permissions > Security roles"
)
PORTAL_APP_REGISTRATION = "Azure portal > Microsoft Entra ID > App registrations > {client_id}"
PORTAL_KEY_VAULT_IAM = "Azure portal > Key vaults > {vault} > Access control (IAM) > Add role assignment"

FIXES: dict[str, str] = {
    # settings
    "setting_missing": "Set {setting} in the Function App's application settings (Azure portal > Function "
                       "App > Settings > Environment variables; locally: local.settings.json, see "
                       "local.settings.example.json).",
    "setting_invalid": "Correct {setting} in the Function App's application settings (Azure portal > "
                       "Function App > Settings > Environment variables; locally: local.settings.json).",
    # managed identity
    "managed_identity_not_configured": (
        "Enable the Function App's managed identity (Azure portal > Function App > Settings > Identity: "
        "system-assigned, or a user-assigned one with AZURE_CLIENT_ID set to its client id). Locally, run "
        "the devstack or `az login`."
    ),
    "managed_identity_unavailable": "The identity endpoint did not answer; retry later.",
    # Key Vault
    "keyvault_forbidden": (
        "Grant the Function App's managed identity the 'Key Vault Secrets User' role on {vault} ("
        + PORTAL_KEY_VAULT_IAM + " > Key Vault Secrets User > Managed identity), and let the app through "
        "the vault's firewall (Key vaults > {vault} > Networking)."
    ),
    "keyvault_secret_not_found": (
        "Create the secret {secret} in {vault} (Azure portal > Key vaults > {vault} > Objects > Secrets > "
        "Generate/Import) with the app registration's client secret VALUE, or set "
        "DATAVERSE_CLIENT_SECRET_NAME to the secret's name."
    ),
    "keyvault_unavailable": "{vault} did not answer; check KEY_VAULT_URL, the network path, and retry.",
    # Entra ID
    "entra_invalid_client": (
        "AADSTS7000215/7000222: the client secret in Key Vault secret {secret} is wrong or expired. Create a "
        "new client secret (" + PORTAL_APP_REGISTRATION + " > Certificates & secrets > New client secret) "
        "and store its VALUE (not its Secret ID) as a new version of that secret; the app picks it up "
        "without a restart."
    ),
    "entra_invalid_certificate": (
        "AADSTS700027: the certificate in Key Vault ({certificate}) is not registered on the app "
        "registration (or its signature does not verify): upload its public part (" + PORTAL_APP_REGISTRATION
        + " > Certificates & secrets > Certificates > Upload certificate, or `az ad app credential reset "
        "--id {client_id} --cert @cert.pem --append`), or store the registered certificate in Key Vault. "
        "When rotating, keep the old certificate registered until the new one is uploaded."
    ),
    "entra_federation_mismatch": (
        "AADSTS70021: no federated credential of app registration {client_id} matches the Function App's "
        "managed identity: add one with issuer https://login.microsoftonline.com/{tenant_id}/v2.0, subject "
        "= the identity's principal (object) id, audience api://AzureADTokenExchange ("
        + PORTAL_APP_REGISTRATION + " > Certificates & secrets > Federated credentials > Add credential > "
        "Managed identity, or `az ad app federated-credential create`). Matching is exact and "
        "case-sensitive; allow a minute to apply."
    ),
    "entra_invalid_assertion": (
        "Entra ID refused the client assertion itself (AADSTS700024 expired or not yet valid, 50027 "
        "malformed, 700021/50013 made for another client id or token endpoint): check the instance's "
        "clock, and that DATAVERSE_TENANT_ID {tenant_id} and DATAVERSE_CLIENT_ID {client_id} name the app "
        "registration that holds the federated credential or certificate."
    ),
    "keyvault_certificate_invalid": (
        "Import the certificate with its private key as a Key Vault certificate named {certificate} "
        "(`az keyvault certificate import --vault-name {vault_name} --name {certificate} --file cert.pfx`), "
        "not as a plain secret: PEM or PFX, without a password."
    ),
    "keyvault_certificate_not_found": (
        "Create or import the certificate {certificate} in {vault} (`az keyvault certificate import "
        "--vault-name {vault_name} --name {certificate} --file cert.pfx`), or set DATAVERSE_CERTIFICATE_NAME "
        "to its name."
    ),
    "entra_unauthorized_client": (
        "AADSTS700016: DATAVERSE_CLIENT_ID {client_id} is not an application in tenant {tenant_id}. Check "
        "the client id and DATAVERSE_TENANT_ID: copy the Application (client) ID and Directory (tenant) ID "
        "from " + PORTAL_APP_REGISTRATION
        + " > Overview; if the environment is in another tenant, an administrator of that tenant must "
        "grant admin consent first."
    ),
    "entra_invalid_tenant": (
        "AADSTS90002: DATAVERSE_TENANT_ID {tenant_id} is not a tenant. Use the Directory (tenant) ID from "
        + PORTAL_APP_REGISTRATION + " > Overview."
    ),
    "entra_invalid_scope": (
        "AADSTS70011/500011: DATAVERSE_URL {url} is not a Dataverse environment of tenant {tenant_id}. Copy "
        "the Environment URL from Power Platform admin center > Manage > Environments > <your environment>."
    ),
    "entra_rejected": "Entra ID refused the token request: read the AADSTS code in the detail "
                      "(https://login.microsoftonline.com/error?code=<number>).",
    "entra_unavailable": "Entra ID did not answer; check AZURE_AUTHORITY_HOST and the network, retry.",
    "auth_failed": "Authentication failed: see the detail above.",
    # Dataverse: the application user
    "dataverse_unauthorized": (
        "Dataverse at {url} refused the token: create an application user for client id {client_id} in "
        "that environment (" + PORTAL_APP_USERS + " > New app user), and check DATAVERSE_URL names that "
        "environment."
    ),
    "dataverse_forbidden": (
        "The application user (or the user acted for) lacks a privilege on this table: give the "
        "application user a security role that covers it (" + PORTAL_APP_USERS + " > <the app user> > "
        "Manage roles), make sure it is enabled, and check the actor's own roles."
    ),
    "impersonation_privilege_missing": (
        "0x8004A110: the application user's security role lacks prvActOnBehalfOfAnotherUser. Add the "
        "Delegate role to the application user (" + PORTAL_APP_USERS + " > <the app user> > Manage roles), "
        "or enable 'Act on Behalf of Another User' (Business Management tab) in its custom role ("
        + PORTAL_SECURITY_ROLES + ")."
    ),
    "dataverse_unreachable": "Cannot reach {url}: check DATAVERSE_URL (https://<org>.crm.dynamics.com) and "
                             "the network; the job is retried.",
    "dataverse_unavailable": "Dataverse answered 5xx; it is retried, replay from -poison if it persists.",
    "dataverse_throttled": "Dataverse is throttling this application user (service protection limits); it "
                           "is retried, lower the load if it persists.",
    "job_deadline_exceeded": "Dataverse asked for a wait that would pass JOB_DEADLINE_SECONDS: the job went "
                             "back to the queue and is retried after the visibility timeout; if it ends in "
                             "-poison, lower the load (throttling) and replay it.",
    "wait_limit_exceeded": "Another request for the same data was still waiting on Dataverse when "
                           "HTTP_MAX_WAIT_SECONDS ran out; retry after Retry-After.",
    "dataverse_malformed_response": "Dataverse (or a proxy in front of it) answered something that is not "
                                    "Dataverse JSON; check DATAVERSE_URL points at the environment itself.",
    "dataverse_error": "Dataverse refused the request: see the Dataverse code in the detail.",
    # Dataverse: the job
    "dataverse_bad_request": "Dataverse refused the job's data (400): read the detail, fix the job and "
                             "send it again (queuectl send).",
    "entity_not_found": (
        "The job's entity is not an entity set of this environment: use the table's plural, lower-case "
        "entity set name (contacts, accounts, <prefix>_<name>s), listed at {url}/api/data/v9.2/ "
        "(EntitySetName of EntityDefinitions), fix the job and send it again."
    ),
    "invalid_column": (
        "The job's data names a column the table does not have: use the column's logical name (Power Apps "
        "(https://make.powerapps.com) > Tables > <table> > Columns > <column> > Advanced options > "
        "Logical name), fix the job and send it again."
    ),
    "record_not_found": "The record the job updates does not exist: create it first (upsert creates it), or "
                        "check the key.",
    "precondition_failed": "Another record already holds this alternate key, or the record changed: check "
                           "the key values, fix the job and send it again.",
    # the job itself
    "invalid_json": "The message is not JSON: fix the sender.",
    "invalid_job": "The job breaks the contract (see details for the field): fix the sender.",
    "job_too_large": "A job is at most 48 KiB of JSON: send large values some other way (a bulk job's "
                     "records can go in a blob, recordsBlob: see docs/bulk.md).",
    "storage_unavailable": "The app's storage account (AzureWebJobsStorage) did not answer while reading a "
                           "bulk job's recordsBlob; the job is retried. Check the account and its network "
                           "rules.",
    "dead_letter_too_large": "The job is too close to the size limit to be dead-lettered: it stays in "
                             "-poison; fix it and send it again.",
    "sync_error": "See the detail above.",
    # the actor
    "actor_not_found": "No Dataverse user has that email (internalemailaddress): check the address, or add "
                       "the user to the environment (Power Platform admin center > Manage > Environments > "
                       "<your environment> > Settings > Users + permissions > Users).",
    "actor_ambiguous": "Several Dataverse users share that email; act as them by systemUserId instead.",
    "actor_disabled": "That user is disabled in Dataverse; enable them or act as someone else.",
    "actor_not_interactive": "That user cannot be acted for (not an interactive user, accessmode != 0); act "
                             "as a person instead.",
    "actor_application_user": "That user is an application user; omit actAs to write as the application "
                              "user itself, or act as a person.",
    "forbidden_by_policy": (
        "The authorization policy of the job's source refuses it (the detail names the field): change the "
        "job, or the policy (AUTHORIZATION_POLICY / AUTHORIZATION_POLICY_BLOB, see docs/authorization.md) "
        "and send the job again (queuectl send)."
    ),
    "policy_unavailable": "The authorization policy blob (AUTHORIZATION_POLICY_BLOB) could not be read; it "
                          "is retried. Check the app's storage account and its network path.",
    "impersonation_not_applied": (
        "Dataverse ignored the caller header and ran the request as the application user: the impersonated "
        "user is unknown to Dataverse or cannot be impersonated (check the user is enabled and has a "
        "security role)."
    ),
    # reconciliation
    "roster_invalid": "Upload reconciliation/roster.csv again as CSV with a header row holding email "
                      "(optional externalId).",
    "snapshot_invalid": "Delete reconciliation/users/latest.json: the next run writes a fresh snapshot.",
    # webhook answers
    "invalid_source": "Use a {source} of 1-64 of A-Z a-z 0-9 . _ - in the webhook URL.",
    "signature_missing": "Sign the request: X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>.",
    "signature_malformed": "Send X-Signature as t=<unix seconds>,v1=<hex HMAC-SHA256> (several v1= allowed).",
    "signature_expired": "Sign each request when it is sent: t must be within 300 s of the server's clock "
                         "(check the sender's clock).",
    "signature_invalid": "Sign the exact bytes sent with the current key from Key Vault secret "
                         "WEBHOOK_SECRET_NAME, within 300 s of the server's clock.",
    "payload_too_large": "A webhook body is at most 1 MiB: send fewer jobs per call.",
    "unsupported_media_type": "Send Content-Type: application/json.",
    "signing_key_unavailable": "The webhook signing key cannot be read from Key Vault: run /api/diagnostics "
                               "and fix the webhook_secret step.",
    "replayed": "This signed body was accepted before: to send it again, sign it again (a new t).",
    "replay_store_unavailable": "The replay window (blob container webhook-replay in AzureWebJobsStorage) "
                                "cannot be written: retry after Retry-After; check the app identity's "
                                "Storage Blob Data role on that container.",
    # queue messages
    "unauthenticated_message": "The message was not put on the queue by the webhook or queuectl send "
                               "(no valid _auth): find out who wrote it; if it is genuine, queuectl send "
                               "it (which signs it with Key Vault secret MESSAGE_SIGNING_SECRET_NAME).",
}
"""One fix text per error code: what an operator does about it.  Used where the error is raised and by
``/api/diagnostics``, so the same problem never gets two different portal paths.  ``{name}`` fields are
filled by :func:`fix_for` (unknown ones stay visible as ``<SETTING_NAME>``)."""

_FIX_DEFAULTS = {
    "client_id": "<DATAVERSE_CLIENT_ID>",
    "tenant_id": "<DATAVERSE_TENANT_ID>",
    "secret": "<DATAVERSE_CLIENT_SECRET_NAME>",
    "vault": "<KEY_VAULT_URL>",
    "url": "<DATAVERSE_URL>",
    "setting": "<the setting named in the detail>",
    "certificate": "<DATAVERSE_CERTIFICATE_NAME>",
    "vault_name": "<vault name>",
    "source": "{source}",
}


def fix_for(code: str, **values: str | None) -> str:
    """The fix text of ``code`` with the operator's own values filled in (never a secret: names only)."""
    template = FIXES.get(code)
    if template is None:
        return f"{code}: see the detail above."
    filled = _FIX_DEFAULTS | {name: value for name, value in values.items() if value}
    return template.format_map(filled)
