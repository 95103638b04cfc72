"""Key Vault secrets, including the bearer challenge that azure-keyvault-secrets' policy expects.

The SDK's ChallengeAuthPolicy sends its first request without a token, parses
``WWW-Authenticate: Bearer authorization="<authority>/<tenant>", resource="<resource>"``, gets a
token for ``<resource>/.default`` and retries.  The sandbox comes from the token's ``tid``; an
unauthenticated request cannot name one, so its challenge names the tenant of an expired token if
it carries one, else the `default` sandbox's tenant (managed identity ignores it anyway).
"""

from __future__ import annotations

import re
from typing import Any

import jwt
from flask import Flask, Response, jsonify, request

from devstack import web
from devstack.sandboxes import DEFAULT_TENANT_ID, KEYVAULT_AUDIENCE, Registry, Sandbox, SecretVersion

SECRET_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
# The data-plane versions a vault answers (azure-keyvault-secrets' ApiVersion enum, newest last).
API_VERSIONS = ("2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01", "2026-04-01")


def _error(status: int, code: str, message: str, inner: str | None = None,
           challenge_tenant: str | None = None) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if inner:
        body["innererror"] = {"code": inner}
    response = jsonify({"error": body})
    response.status_code = status
    if challenge_tenant is not None:
        response.headers["WWW-Authenticate"] = (
            f'Bearer authorization="https://login.microsoftonline.com/{challenge_tenant}", '
            f'resource="{KEYVAULT_AUDIENCE}"')
    return response


def _unverified_tenant(token: str) -> str | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    tid = claims.get("tid")
    return tid if isinstance(tid, str) else None


def _bundle(vault: str, name: str, version: SecretVersion, *, with_value: bool = True) -> dict[str, Any]:
    bundle: dict[str, Any] = {}
    if with_value:
        bundle["value"] = version.value
    bundle["id"] = f"{vault}/secrets/{name}/{version.version}"
    if version.content_type:
        bundle["contentType"] = version.content_type
    if version.managed:
        # The secret side of a certificate: Key Vault names its key and marks it managed (read-only).
        bundle["kid"] = f"{vault}/keys/{name}/{version.version}"
        bundle["managed"] = True
    bundle["attributes"] = {
        "enabled": version.enabled,
        "created": version.created,
        "updated": version.created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
    }
    bundle["tags"] = {}
    return bundle


def create_app(registry: Registry) -> Flask:
    app = web.create_app("devstack-keyvault")

    def vault_url() -> str:
        return registry.urls.get("keyvault") or request.host_url.rstrip("/")

    def authenticate() -> tuple[Sandbox, dict[str, Any]] | Response:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.",
                          challenge_tenant=DEFAULT_TENANT_ID)
        token = token.strip()
        found = registry.sandbox_for_token(token, KEYVAULT_AUDIENCE)
        if found is None:
            tenant = _unverified_tenant(token) or DEFAULT_TENANT_ID
            sandbox = registry.by_tenant(tenant)
            if sandbox is not None:
                sandbox.counters.count("keyvault", "status:401")
            return _error(401, "Unauthorized",
                          "AKV10032: Invalid issuer, audience, signature or lifetime of the access token.",
                          challenge_tenant=tenant)
        return found

    def api_version_error() -> Response | None:
        version = request.args.get("api-version")
        if not version:
            return _error(400, "MissingApiVersionParameter",
                          "The api-version query parameter (?api-version=) is required for all requests.")
        if version.removesuffix("-preview") not in API_VERSIONS:
            # A vault's own wording (quoted in inspec-azure's api-version fallback).
            return _error(400, "BadParameter", f"The specified version ({version}) is not recognized. "
                          f"Consider using the latest supported version ({API_VERSIONS[-1]}).")
        return None

    def forbidden(sandbox: Sandbox, claims: dict[str, Any], action: str) -> Response | None:
        if not sandbox.keyvault_forbidden:
            return None
        return _error(
            403, "Forbidden",
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny "
            "assignments or role definitions were changed recently, please observe propagation time.\r\n"
            f"Caller: appid={claims.get('appid')};oid={claims.get('oid')};iss={claims.get('iss')}\r\n"
            f"Action: 'Microsoft.KeyVault/vaults/secrets/{action}/action'\r\n"
            "Assignment: (not found)\r\nDecisionReason: 'DeniedWithNoValidRBAC'\r\n",
            inner="ForbiddenByRbac")

    def not_found(name: str, version: str | None = None) -> Response:
        what = f"{name}/{version}" if version else name
        return _error(
            404, "SecretNotFound",
            f"A secret with (name/id) {what} was not found in this key vault. If you recently deleted this "
            "secret you may be able to recover it using the correct recovery command. For help resolving "
            "this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")

    def prologue(counter: str, action: str) -> tuple[Sandbox, Response | None]:
        """Authenticate, count, latency/faults, api-version and RBAC, in the order Key Vault applies them."""
        found = authenticate()
        if isinstance(found, Response):
            raise _Early(found)
        sandbox, claims = found
        sandbox.counters.count("keyvault", counter)
        early = (web.enter(sandbox, "keyvault") or api_version_error()
                 or forbidden(sandbox, claims, action))
        return sandbox, early

    @app.errorhandler(_Early)
    def _early(error: _Early) -> Response:
        return error.response

    @app.get("/secrets/<name>")
    @app.get("/secrets/<name>/")
    @app.get("/secrets/<name>/<version>")
    def get_secret(name: str, version: str | None = None) -> Response:
        sandbox, early = prologue("GET secret", "getSecret")
        if early is not None:
            return early
        if version == "versions":
            return list_versions(sandbox, name)
        found = sandbox.get_secret(name, version or None)
        if found is None:
            return not_found(name, version)
        return jsonify(_bundle(vault_url(), name, found))

    def list_versions(sandbox: Sandbox, name: str) -> Response:
        versions = sandbox.secret_versions(name)
        if not versions:
            return not_found(name)
        items = [_bundle(vault_url(), name, v, with_value=False) for v in versions]
        return jsonify({"value": items, "nextLink": None})

    @app.get("/secrets")
    def list_secrets() -> Response:
        sandbox, early = prologue("GET secrets", "readMetadata")
        if early is not None:
            return early
        with sandbox.lock:
            names = [(n, v[-1]) for n, v in sandbox.secrets.items() if v]
        items = []
        for name, latest in names:
            item = _bundle(vault_url(), name, latest, with_value=False)
            item["id"] = f"{vault_url()}/secrets/{name}"
            items.append(item)
        return jsonify({"value": items, "nextLink": None})

    @app.put("/secrets/<name>")
    def set_secret(name: str) -> Response:
        sandbox, early = prologue("PUT secret", "setSecret")
        if early is not None:
            return early
        if not SECRET_NAME.match(name):
            return _error(400, "BadParameter", "The request URI contains an invalid name: " + name)
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("value"), str):
            return _error(400, "BadParameter", "Property 'value' is required.")
        content_type = body.get("contentType") if isinstance(body.get("contentType"), str) else None
        created = sandbox.set_secret(name, body["value"], content_type=content_type)
        return jsonify(_bundle(vault_url(), name, created))

    return app


class _Early(Exception):
    """Carries a ready response out of the shared prologue (bad token) to Flask's error handler."""

    def __init__(self, response: Response) -> None:
        super().__init__("early response")
        self.response = response
