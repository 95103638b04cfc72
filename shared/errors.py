"""One small exception hierarchy: every failure is data with a machine code and a human message.

Triggers decide retry versus dead-letter from ``error.transient`` (set by the type, or by the
HTTP status for Dataverse errors), never by matching message text.  The machine codes are part
of the public contract: they appear as ``reason`` in dead-letter records and ``code`` in HTTP
error bodies.
"""

from __future__ import annotations

from typing import Any


class SyncError(Exception):
    """Base of every error the project raises on purpose."""

    code: str = "sync_error"
    transient: bool = False

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


class AuthError(SyncError):
    """Managed identity, Key Vault or Entra ID refused or failed.

    Permanent codes point at a misconfiguration: ``entra_invalid_client`` (AADSTS7000215/7000222),
    ``entra_unauthorized_client`` (AADSTS700016), ``entra_invalid_tenant`` (AADSTS90002),
    ``entra_invalid_scope`` (AADSTS70011/500011: DATAVERSE_URL is not an environment of the tenant),
    ``entra_rejected`` (any other 4xx from Entra), ``keyvault_forbidden``, ``keyvault_secret_not_found``,
    ``managed_identity_not_configured`` (no identity, or the identity endpoint refused the client id).
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
    ) -> None:
        if code is None:
            code = self.code_for(status, dataverse_code)
        if transient is None:
            transient = status is None or status == 429 or status >= 500
        super().__init__(message, code=code, transient=transient)
        self.status = status
        self.dataverse_code = dataverse_code
        self.retry_after = retry_after

    @staticmethod
    def code_for(status: int | None, dataverse_code: str | None) -> str:
        if dataverse_code and dataverse_code.lower() in _DATAVERSE_CODE_NAMES:
            return _DATAVERSE_CODE_NAMES[dataverse_code.lower()]
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
