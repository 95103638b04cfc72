"""Walk the whole chain a write depends on and say, for the first broken link, what to do about it.

settings -> managed identity -> Key Vault secret -> Entra token -> WhoAmI -> impersonation, plus the
webhook signing key on the side.  Every step is timed; a failed step carries ``fix`` text, and the
steps after it are listed as skipped so the operator sees what was not checked.

It builds a fresh runtime (nothing cached: a diagnostic run must really read the secret and really
ask Entra) and never returns a secret or a token: only names, ids, token claims and codes.

The impersonation check is a harmless impersonated READ (``GET WhoAmI`` with the caller header of an
enabled user other than the application user, or of ``?email=``): Dataverse checks
``prvActOnBehalfOfAnotherUser`` on any request carrying a caller header, reads included, and answers
403 ``0x8004A110`` without it.  A caller id equal to the application user's own is not used, because
impersonating yourself proves nothing.

The credential step follows ``DATAVERSE_CREDENTIAL``: ``key_vault_secret`` reads the client secret,
``key_vault_certificate`` reads the certificate and shows its thumbprint (what must be uploaded to the
app registration), ``federation_token`` asks the managed identity for its token-exchange token and
shows its issuer/subject/audience (what the federated credential must match); a federated mismatch's
fix is the exact ``az ad app federated-credential create`` command with those values.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shared.contract import is_guid
from shared.errors import ActorError, SyncError, fix_for
from shared.logs import redact

if TYPE_CHECKING:
    from shared.runtime import Runtime
    from shared.settings import Settings
    from shared.users import SystemUser

log = logging.getLogger("shared.diagnostics")

KEY_VAULT_SCOPE = "https://vault.azure.net/.default"

STEPS = (
    "settings",
    "managed_identity",
    "key_vault_secret",
    "webhook_secret",
    "entra_token",
    "dataverse_whoami",
    "impersonation",
)
# The third step by DATAVERSE_CREDENTIAL (STEPS above is the secret mode's walk).
CREDENTIAL_STEPS = {
    "secret": "key_vault_secret",
    "certificate": "key_vault_certificate",
    "federated": "federation_token",
}
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"  # noqa: S105 (an audience, not a secret)


def steps_for(mode: str) -> tuple[str, ...]:
    """The step names of a walk in credential ``mode``."""
    return tuple(CREDENTIAL_STEPS.get(mode, name) if name == "key_vault_secret" else name for name in STEPS)


def federated_credential_command(client_id: str, issuer: str, subject: str) -> str:
    """The Azure CLI command that adds the federated credential the app registration lacks."""
    parameters = json.dumps(
        {
            "name": "function-app-identity",
            "issuer": issuer,
            "subject": subject,
            "audiences": [TOKEN_EXCHANGE_AUDIENCE],
        },
        separators=(",", ":"),
    )
    return f"az ad app federated-credential create --id {client_id} --parameters '{parameters}'"


def _fix(error: SyncError, settings: Settings | None, seen: Mapping[str, str] | None = None) -> str:
    """What an operator should do about ``error``: the one fix text of its code (shared.errors.FIXES),
    with this app's names filled in, plus what only this walk knows (the federated credential's exact
    command, the certificate's thumbprint); never contains a secret."""
    values: dict[str, str | None] = {"setting": getattr(error, "setting", None)}
    if settings is not None:
        values |= {
            "client_id": settings.client_id, "tenant_id": settings.tenant_id,
            "secret": settings.client_secret_name, "vault": settings.key_vault_url,
            "url": settings.dataverse_url,
        }
        if settings.credential == "certificate":
            values |= {"certificate": settings.certificate_name, "vault_name": _vault_name(settings)}
    text = fix_for(error.code, **values)
    extra = _credential_detail(error, settings, seen or {})
    return f"{text}\n{extra}" if extra else text


def _vault_name(settings: Settings) -> str:
    return settings.key_vault_url.removeprefix("https://").split(".")[0]


def _credential_detail(error: SyncError, settings: Settings | None, seen: Mapping[str, str]) -> str | None:
    """The federated and certificate modes' specifics, when this walk knows them."""
    code = error.code
    mode = settings.credential if settings is not None else "secret"
    client = settings.client_id if settings is not None else "<DATAVERSE_CLIENT_ID>"
    if code == "entra_federation_mismatch":
        presented = {**seen, **(error.details[0] if error.details else {})}
        if mode != "federated" and not presented:
            return None
        tenant = settings.tenant_id if settings is not None else "<DATAVERSE_TENANT_ID>"
        issuer = presented.get("issuer") or f"https://login.microsoftonline.com/{tenant}/v2.0"
        subject = presented.get("subject") or "<principal (object) id of the Function App's managed identity>"
        return f"Exactly: {federated_credential_command(client, issuer, subject)}"
    if code == "entra_invalid_certificate" and settings is not None and mode == "certificate":
        thumbprint = seen.get("thumbprint")
        which = f"the certificate with thumbprint {thumbprint}" if thumbprint else "the certificate"
        return (
            f"Upload {which}: `az keyvault certificate download --vault-name {_vault_name(settings)} --name "
            f"{settings.certificate_name} --file cert.pem` then `az ad app credential reset --id {client} "
            "--cert @cert.pem --append`."
        )
    if code.startswith("managed_identity_") and mode == "federated":
        return (
            "DATAVERSE_CREDENTIAL=federated needs the managed identity for every new token: AZURE_CLIENT_ID "
            "must be the client id of the user-assigned identity whose principal id is the federated "
            "credential's subject."
        )
    return None


def _claims(token: str) -> dict[str, Any]:
    """The JWT payload's claims, for display only (never verified, never the token itself)."""
    try:
        payload = token.split(".")[1]
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _identity_check(settings: Settings) -> str:
    """Ask the managed identity for a Key Vault token, as the secret store will."""
    from azure.identity import DefaultAzureCredential

    from shared.secrets import classify_identity_failure

    credential = DefaultAzureCredential(retry_total=1, connection_timeout=5, read_timeout=10)
    try:
        token = credential.get_token(KEY_VAULT_SCOPE)
    except Exception as exc:
        raise classify_identity_failure(exc) from exc
    finally:
        credential.close()
    claims = _claims(token.token)
    who = claims.get("oid") or claims.get("appid") or "unknown"
    return f"token for Key Vault issued to identity {who} (tenant {claims.get('tid', 'unknown')})"


def _default_runtime(settings: Settings) -> Runtime:
    from shared.runtime import Runtime

    return Runtime.from_settings(settings)


def _other_user(runtime: Runtime, app_user_id: str) -> SystemUser | None:
    """An enabled, interactive user other than the application user, from the first small page.

    One with an Entra object id is preferred: ``CallerObjectId`` is the header the writes use.
    """
    from shared.users import SELECT, SystemUser

    params = {
        "$select": SELECT,
        "$filter": f"isdisabled eq false and accessmode eq 0 and systemuserid ne {app_user_id}",
    }
    pages = runtime.dataverse.iter_pages("systemusers", params, page_size=20, correlation_id="diagnostics")
    for page in pages:
        users = [SystemUser.from_record(row) for row in page.get("value", []) if row.get("systemuserid")]
        users.sort(key=lambda u: u.azure_ad_object_id is None)
        return users[0] if users else None
    return None


class _Walk:
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.failed: str | None = None
        self.settings: Settings | None = None
        self.retry_after: int | None = None
        self.seen: dict[str, str] = {}  # facts a fix may quote (federation claims, certificate thumbprint)

    def run(self, name: str, action: Callable[[], str], *, blocking: bool = True) -> bool:
        if self.failed is not None:
            self.steps.append(
                {
                    "name": name,
                    "ok": False,
                    "skipped": True,
                    "ms": 0,
                    "detail": f"not run: {self.failed} failed",
                    "fix": None,
                }
            )
            return False
        started = time.perf_counter()
        ok, fix, detail = True, None, ""
        try:
            detail = action()
        except SyncError as exc:
            ok, detail, fix = False, f"{exc.code}: {exc.message}", _fix(exc, self.settings, self.seen)
            retry_after = getattr(exc, "retry_after", None)  # Dataverse's Retry-After, for the 503
            if exc.transient and isinstance(retry_after, int | float) and math.isfinite(retry_after):
                self.retry_after = max(self.retry_after or 0, max(1, math.ceil(retry_after)))
        except Exception as exc:  # a diagnostic must report, not crash
            log.exception("diagnostics step %s failed unexpectedly", name)
            ok, detail = False, f"unexpected {type(exc).__name__}"
            fix = "See the function's log for the trace."
        ms = round((time.perf_counter() - started) * 1000, 1)
        self.steps.append(
            {"name": name, "ok": ok, "skipped": False, "ms": ms, "detail": redact(detail), "fix": fix}
        )
        log.info("diagnostics step=%s ok=%s ms=%s", name, ok, ms)
        if not ok and blocking:
            self.failed = name
        return ok


def run_diagnostics(
    settings_factory: Callable[[], Settings] | None = None,
    *,
    runtime_factory: Callable[[Settings], Runtime] = _default_runtime,
    identity_check: Callable[[Settings], str] = _identity_check,
    act_as: Mapping[str, str] | None = None,
    credential: str | None = None,
) -> dict[str, Any]:
    """``{"ok", "steps": [...], "retryAfter"?}``; never raises a SyncError.

    ``steps``: ``[{"name", "ok", "skipped", "ms", "detail", "fix"}]``; ``retryAfter`` (seconds) only
    when a step failed on throttling that said how long to wait.

    ``act_as`` (``{"email": ...}`` or any ``actAs`` form) picks the user the impersonation step uses.
    ``credential`` walks another DATAVERSE_CREDENTIAL mode than the configured one, without changing
    it: a migration checks ``federated`` (or ``certificate``) end to end before switching the setting.
    """
    walk = _Walk()
    state: dict[str, Any] = {}

    def settings_step() -> str:
        if settings_factory is None:
            from shared.settings import Settings

            walk.settings = Settings.from_env()
        else:
            walk.settings = settings_factory()
        if credential is not None:
            from shared.settings import CREDENTIAL_MODES

            if credential not in CREDENTIAL_MODES:
                raise SyncError(
                    f"credential={credential!r}: must be one of {', '.join(CREDENTIAL_MODES)}",
                    code="setting_invalid",
                )
            walk.settings = dataclasses.replace(walk.settings, credential=credential)
        s = walk.settings
        state["runtime"] = runtime_factory(s)
        material = {
            "secret": f"secret={s.client_secret_name}",
            "certificate": f"certificate={s.certificate_name}",
            "federated": "no secret (managed identity as federated credential)",
        }.get(s.credential, "")
        return (
            f"DATAVERSE_URL={s.dataverse_url} DATAVERSE_TENANT_ID={s.tenant_id} "
            f"DATAVERSE_CLIENT_ID={s.client_id} KEY_VAULT_URL={s.key_vault_url} "
            f"DATAVERSE_CREDENTIAL={s.credential} {material} api={s.api_version}"
        )

    def identity_step() -> str:
        assert walk.settings is not None
        return identity_check(walk.settings)

    def secret_step() -> str:
        assert walk.settings is not None
        state["runtime"].secrets.get(walk.settings.client_secret_name)
        return f"read secret {walk.settings.client_secret_name} from {walk.settings.key_vault_url}"

    def certificate_step() -> str:
        from shared.errors import AuthError
        from shared.tokens import describe_certificate, read_material

        s = walk.settings
        assert s is not None
        value = read_material(state["runtime"].secrets, s)
        try:
            info = describe_certificate(value)
        except ValueError as exc:
            raise AuthError(
                f"Key Vault secret '{s.certificate_name}' holds no usable certificate ({exc})",
                code="keyvault_certificate_invalid",
            ) from exc
        walk.seen["thumbprint"] = info.thumbprint
        days = int((info.not_after - time.time()) // 86400)
        return (
            f"read certificate {s.certificate_name} from {s.key_vault_url}: thumbprint {info.thumbprint}, "
            f"subject {info.subject}, expires in {days} days (this thumbprint must be registered on the app)"
        )

    def federation_step() -> str:
        claims = state["runtime"].tokens.federation_claims()
        walk.seen.update(claims)
        return (
            f"managed identity token for {TOKEN_EXCHANGE_AUDIENCE}: issuer {claims.get('issuer')}, subject "
            f"{claims.get('subject')}, audience {claims.get('audience')} (the app registration's federated "
            "credential must match these exactly)"
        )

    def webhook_secret_step() -> str:
        assert walk.settings is not None
        state["runtime"].secrets.get(walk.settings.webhook_secret_name)
        return f"read secret {walk.settings.webhook_secret_name} (webhook signing key)"

    def token_step() -> str:
        claims = _claims(state["runtime"].tokens.get_token())
        if not claims:
            return "token received"
        expires = claims.get("exp")
        left = f", expires in {int(expires - time.time())} s" if isinstance(expires, int | float) else ""
        return (
            f"token for {claims.get('aud')} issued to app {claims.get('appid') or claims.get('azp')} "
            f"in tenant {claims.get('tid')}{left}"
        )

    def whoami_step() -> str:
        answer = state["runtime"].dataverse.whoami()
        user_id = answer.get("UserId")
        # it goes into the next step's $filter unquoted, as a GUID literal: it must be one
        if not is_guid(user_id):
            raise SyncError(
                f"WhoAmI answered without a UserId GUID ({str(user_id)[:60]!r})",
                code="dataverse_malformed_response",
            )
        state["app_user_id"] = str(user_id).lower()
        return (
            f"application user {answer.get('UserId')} in business unit {answer.get('BusinessUnitId')}, "
            f"organization {answer.get('OrganizationId')}"
        )

    def impersonation_step() -> str:
        runtime = state["runtime"]
        app_user_id = state["app_user_id"]
        if act_as:
            user = runtime.users.resolve(act_as, correlation_id="diagnostics")
            if user.is_disabled:
                raise ActorError(f"user {user.systemuserid} is disabled", code="actor_disabled")
        else:
            user = _other_user(runtime, app_user_id)
            if user is None:
                return (
                    "not checked: no enabled user other than the application user was found; "
                    "call /api/diagnostics?email=<address> to check with a given user"
                )
        if user.systemuserid.lower() == app_user_id:
            return "not checked: the chosen user is the application user itself"
        header = user.caller().headers()
        response = runtime.dataverse.request("GET", "WhoAmI", headers=header, correlation_id="diagnostics")
        answered = str(response.json().get("UserId", "")).lower()
        how = next(iter(header))
        if answered == user.systemuserid.lower():
            return f"impersonated read as {user.systemuserid} via {how} succeeded"
        if answered == app_user_id:
            raise SyncError(
                f"the impersonated read via {how} ran as the application user, not {user.systemuserid}",
                code="impersonation_not_applied",
            )
        return f"impersonated read via {how} succeeded (Dataverse answered as {answered or 'unknown'})"

    walk.run("settings", settings_step)
    walk.run("managed_identity", identity_step)
    mode = walk.settings.credential if walk.settings is not None else "secret"
    credential_steps = {"secret": secret_step, "certificate": certificate_step, "federated": federation_step}
    walk.run(CREDENTIAL_STEPS.get(mode, "key_vault_secret"), credential_steps.get(mode, secret_step))
    walk.run("webhook_secret", webhook_secret_step, blocking=False)
    walk.run("entra_token", token_step)
    walk.run("dataverse_whoami", whoami_step)
    walk.run("impersonation", impersonation_step)
    runtime = state.get("runtime")
    close = getattr(runtime, "close", None)
    if callable(close):
        close()
    report: dict[str, Any] = {"ok": all(step["ok"] for step in walk.steps), "steps": walk.steps}
    if walk.retry_after is not None:
        report["retryAfter"] = walk.retry_after  # a step was throttled: seconds Dataverse asked for
    return report

