"""Entra ID (v2.0 endpoints) for the client-credentials flow, as MSAL and azure-identity drive it.

MSAL first fetches ``/{tenant}/v2.0/.well-known/openid-configuration`` (tenant discovery; 4xx there
becomes a ValueError whose text carries the body), then POSTs the form to ``token_endpoint``.
Errors use Entra's exact body shape, since the production code reads ``error_codes`` to tell a
wrong secret from an expired one, an unknown app, or a wrong tenant.

Besides ``client_secret``, the app may prove itself with ``client_assertion`` (type
``urn:ietf:params:oauth:client-assertion-type:jwt-bearer``), checked like Entra does:

* a header with ``x5t`` / ``x5t#S256`` is a certificate assertion (MSAL: RS256 + x5t, or PS256 +
  x5t#S256): the thumbprint must name a certificate registered on the app (else AADSTS700027 "key
  was not found"), the signature must verify with it (AADSTS700027), iss = sub = client id
  (AADSTS700021), aud = the token endpoint (AADSTS50013), exp in the future (AADSTS700024);
* anything else is a federated assertion: its iss, sub and aud must match one federated credential
  of the app exactly (401 AADSTS700211/700213/700212 naming the issuer/subject/audience; the legacy
  400 AADSTS70021 naming all three with ``federation_errors = "legacy"``), then it must verify against
  the issuer's key (only tokens this stack's managed identity issued do) and be unexpired (AADSTS700024).

An assertion that is not a JWT at all is AADSTS50027.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from typing import Any

import jwt
from flask import Flask, Response, jsonify, request

from devstack import web
from devstack.sandboxes import KEYVAULT_AUDIENCE, Registry, Sandbox

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CERTIFICATE_ALGORITHMS = ("RS256", "PS256")

RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
GRAPH = "https://graph.microsoft.com"
# First-party resources every tenant has a service principal for (besides Key Vault and Graph).
WELL_KNOWN_RESOURCES = frozenset({
    "https://management.azure.com", "https://storage.azure.com", "https://monitor.azure.com",
})


def aad_error(status: int, error: str, code: int, message: str) -> Response:
    """An error body exactly shaped like login.microsoftonline.com's."""
    trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    timestamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    description = (f"AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\n"
                   f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}")
    response = jsonify({
        "error": error,
        "error_description": description,
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    })
    response.status_code = status
    response.headers["Cache-Control"] = "no-store, no-cache"
    return response


def _tenant_not_found(tenant: str) -> Response:
    return aad_error(
        400, "invalid_tenant", 90002,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there "
        "are no active subscriptions for the tenant.")


def known_resources(registry: Registry) -> set[str]:
    """Resources this emulated tenant can issue tokens for (lower case, no trailing slash)."""
    resources = {KEYVAULT_AUDIENCE, GRAPH, *WELL_KNOWN_RESOURCES}
    if "dataverse" in registry.urls:
        resources.add(registry.urls["dataverse"].rstrip("/").lower())
    return resources


def _resource_of(scope_param: str) -> tuple[str | None, str | None]:
    """(resource, None) for one ``<resource>/.default`` scope, else (None, the offending scope text)."""
    scopes = [s for s in scope_param.split() if s not in RESERVED_SCOPES]
    if len(scopes) != 1 or not scopes[0].endswith("/.default"):
        return None, scope_param
    resource = scopes[0][: -len("/.default")].rstrip("/")
    if not resource:
        return None, scope_param
    return resource, None


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return "0001-01-01T00:00:00.0000000Z"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def _thumbprint_hex(b64url: object) -> str | None:
    if not isinstance(b64url, str) or not b64url:
        return None
    try:
        return base64.urlsafe_b64decode(b64url + "=" * (-len(b64url) % 4)).hex().upper()
    except ValueError:
        return None


def _not_in_time(claims: dict[str, Any]) -> Response:
    now = time.time()
    exp = claims.get("exp")
    start = claims.get("nbf", claims.get("iat"))
    return aad_error(
        401, "invalid_client", 700024,
        f"Client assertion is not within its valid time range. Current time: {_iso(now)}, assertion valid "
        f"from {_iso(start if isinstance(start, int | float) else None)}, expiry time of assertion "
        f"{_iso(exp if isinstance(exp, int | float) else None)}. Review the documentation at "
        "https://learn.microsoft.com/entra/identity-platform/certificate-credentials .")


def _malformed() -> Response:
    return aad_error(401, "invalid_client", 50027, "JWT token is invalid or malformed.")


def _key_rejected(sandbox: Sandbox, reason: str, thumbprint: str | None) -> Response:
    used = f"Thumbprint of key used by client: '{thumbprint}', " if thumbprint else ""
    return aad_error(
        401, "invalid_client", 700027,
        f"Client assertion failed signature validation. [Reason - {reason}, {used}Please visit the Azure "
        f"Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id "
        f"'{sandbox.client_id}'. Review the documentation at "
        "https://docs.microsoft.com/en-us/graph/deployments to determine the corresponding service endpoint "
        "and https://docs.microsoft.com/en-us/graph/api/application-get?view=graph-rest-1.0&tabs=http "
        f"to build a query request URL, such as 'https://graph.microsoft.com/beta/applications/{sandbox.client_id}']")


def _audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def check_assertion(registry: Registry, sandbox: Sandbox, assertion: str, client_id: str,
                    token_endpoints: set[str]) -> Response | None:
    """None when ``assertion`` proves the app, else Entra's error answer."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return _malformed()
    if "x5t" in header or "x5t#S256" in header:
        return _check_certificate_assertion(sandbox, header, claims, assertion, client_id, token_endpoints)
    return _check_federated_assertion(registry, sandbox, claims, assertion)


def _check_certificate_assertion(sandbox: Sandbox, header: dict[str, Any], claims: dict[str, Any],
                                 assertion: str, client_id: str,
                                 token_endpoints: set[str]) -> Response | None:
    sha256 = _thumbprint_hex(header.get("x5t#S256"))
    sha1 = _thumbprint_hex(header.get("x5t"))
    shown = sha256 or sha1
    registered = sandbox.find_certificate(sha1=sha1, sha256=sha256)
    if registered is None:
        return _key_rejected(sandbox, "The key was not found.", shown)
    if registered.not_after <= time.time():
        return _key_rejected(sandbox, "The key used is expired.", shown)
    algorithm = header.get("alg")
    if algorithm not in CERTIFICATE_ALGORITHMS:
        return _key_rejected(sandbox, f"The signature algorithm '{algorithm}' is not supported.", shown)
    try:
        jwt.decode(assertion, registered.public_key, algorithms=[str(algorithm)],
                   options={"verify_aud": False, "verify_exp": False, "verify_iat": False,
                            "verify_nbf": False})
    except jwt.PyJWTError:
        return _key_rejected(sandbox, "The provided signature value did not match the expected signature "
                             "value.", shown)
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return aad_error(
            401, "invalid_client", 700021,
            "Client assertion application identifier doesn't match 'client_id' parameter. Review the "
            "documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/"
            "active-directory-certificate-credentials .")
    audiences = _audiences(claims)
    if len(audiences) != 1 or audiences[0].lower() not in token_endpoints:
        return aad_error(
            401, "invalid_client", 50013,
            f"Assertion failed signature validation. [Reason - The assertion audience claim "
            f"'{', '.join(audiences)}' does not match the token endpoint.]")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= time.time():
        return _not_in_time(claims)
    return None


def _no_matching_record(sandbox: Sandbox, claims: dict[str, Any], audiences: list[str]) -> Response:
    """No federated credential matches the assertion.

    Current Entra answers 401 invalid_client naming the first claim that matches no record: issuer
    (AADSTS700211), subject (AADSTS700213; e.g. Azure/azure-workload-identity#1200), audience
    (AADSTS700212). The legacy answer (sandbox.federation_errors == "legacy") was 400 invalid_request
    AADSTS70021 naming all three.
    """
    issuer, subject = claims.get("iss"), claims.get("sub")
    if sandbox.federation_errors == "legacy":
        return aad_error(
            400, "invalid_request", 70021,
            f"No matching federated identity record found for presented assertion. Assertion Issuer: "
            f"'{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: "
            f"'{', '.join(audiences)}'. https://docs.microsoft.com/en-us/azure/active-directory/develop/"
            "workload-identity-federation")
    with sandbox.lock:
        records = list(sandbox.federated_credentials)
    same_issuer = [r for r in records if r.issuer == issuer]
    if not same_issuer:
        code, claim, value = 700211, "issuer", issuer
    elif not any(r.subject == subject for r in same_issuer):
        code, claim, value = 700213, "subject", subject
    else:
        code, claim, value = 700212, "audience", ", ".join(audiences)
    return aad_error(
        401, "invalid_client", code,
        f"No matching federated identity record found for presented assertion {claim} '{value}'. Check your "
        "federated identity credential Subject, Audience and Issuer against the presented assertion. "
        "https://learn.microsoft.com/entra/workload-id/workload-identity-federation")


def _check_federated_assertion(registry: Registry, sandbox: Sandbox, claims: dict[str, Any],
                               assertion: str) -> Response | None:
    audiences = _audiences(claims)
    if sandbox.find_federated_credential(claims.get("iss"), claims.get("sub"), audiences) is None:
        return _no_matching_record(sandbox, claims, audiences)
    verified, problem = registry.verify_assertion(assertion)
    if problem == "expired":
        return _not_in_time(claims)
    if verified is None:
        return _malformed()
    return None


def create_app(registry: Registry) -> Flask:
    app = web.create_app("devstack-entra")

    def find(tenant: str) -> Sandbox | None:
        return registry.by_tenant(tenant)

    @app.get("/<tenant>/v2.0/.well-known/openid-configuration")
    def discovery(tenant: str) -> Response:
        sandbox = find(tenant)
        if sandbox is None:
            return _tenant_not_found(tenant)
        sandbox.counters.count("entra", "GET openid-configuration")
        faulted = web.enter(sandbox, "entra")
        if faulted is not None:
            return faulted
        base = request.host_url.rstrip("/")
        tid = sandbox.tenant_id
        # Every field of login.microsoftonline.com's v2.0 document, in its order (recorded answers in
        # the Azure SDK for JS test recordings); only the host is the emulator's.
        response = jsonify({
            "token_endpoint": f"{base}/{tid}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "jwks_uri": f"{base}/{tid}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/{tid}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/{tid}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/{tid}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/{tid}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                                 "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time",
                                 "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash",
                                 "c_hash", "email"],
            "kerberos_endpoint": f"{base}/{tid}/kerberos",
            "tenant_region_scope": "WW",
            "cloud_instance_name": "devstack.local",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        })
        response.headers["Cache-Control"] = "max-age=86400, private"
        return response

    @app.post("/<tenant>/oauth2/v2.0/token")
    def token(tenant: str) -> Response:
        sandbox = find(tenant)
        if sandbox is None:
            return _tenant_not_found(tenant)
        sandbox.counters.count("entra", "POST token")
        faulted = web.enter(sandbox, "entra")
        if faulted is not None:
            return faulted
        form = request.form
        grant_type = form.get("grant_type", "")
        client_id = form.get("client_id", "")
        if not grant_type:
            return aad_error(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'grant_type'.")
        if grant_type != "client_credentials":
            return aad_error(400, "unsupported_grant_type", 70003,
                             f"The app requested an unsupported grant type '{grant_type}'.")
        if not client_id:
            return aad_error(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'client_id'.")
        if client_id.lower() != sandbox.client_id.lower():
            return aad_error(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{sandbox.tenant_id}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You may have sent "
                "your authentication request to the wrong tenant.")
        scope = form.get("scope", "")
        if not scope:
            return aad_error(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'scope'.")
        resource, bad_scope = _resource_of(scope)
        if resource is None:
            return aad_error(
                400, "invalid_scope", 70011,
                f"The provided request must include a 'scope' input parameter. The provided value for the "
                f"input parameter 'scope' is not valid. The scope {bad_scope} is not valid.")
        secret = form.get("client_secret")
        assertion = form.get("client_assertion")
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                return aad_error(
                    400, "invalid_request", 90014,
                    "The required field 'client_assertion_type' is missing from the credential. Ensure that "
                    "you have all the necessary parameters for the login request.")
            base = request.host_url.rstrip("/").lower()
            endpoints = {f"{base}/{t.lower()}/oauth2/{v}token" for t in (tenant, sandbox.tenant_id)
                         for v in ("v2.0/", "")}
            rejected = check_assertion(registry, sandbox, assertion, client_id, endpoints)
            if rejected is not None:
                sandbox.counters.count("entra", f"assertion:{rejected.get_json()['error_codes'][0]}")
                return rejected
        elif not secret:
            return aad_error(
                401, "invalid_client", 7000216,
                "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' "
                "grant type.")
        verdict = "ok" if assertion else sandbox.check_client_secret(secret or "")
        if verdict == "invalid":
            return aad_error(
                401, "invalid_client", 7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{sandbox.client_id}'.")
        if verdict == "expired":
            return aad_error(
                401, "invalid_client", 7000222,
                f"The provided client secret keys for app '{sandbox.client_id}' are expired. Visit the Azure "
                "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using "
                "certificate credentials for added security: https://aka.ms/certCreds.")
        if resource.lower() not in known_resources(registry):
            return aad_error(
                400, "invalid_resource", 500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{sandbox.tenant_id}. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You might have sent "
                "your authentication request to the wrong tenant.")
        lifetime = sandbox.token_lifetime
        access_token, _ = registry.issue_token(sandbox, resource, oid=sandbox.app_object_id,
                                               appid=sandbox.client_id, lifetime=lifetime)
        response = jsonify({
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
        })
        response.headers["Cache-Control"] = "no-store, no-cache"
        return response

    return app
