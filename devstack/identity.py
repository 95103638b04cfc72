"""Managed identity endpoint, App Service flavour (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``).

Speaks what MSAL's ``_obtain_token_on_app_service`` (used by azure-identity's
ManagedIdentityCredential) sends: ``GET ?api-version=2019-08-01&resource=...`` with
``X-IDENTITY-HEADER``, optionally ``client_id`` / ``object_id`` / ``mi_res_id`` for a user-assigned
identity.  Success carries ``expires_on`` as epoch seconds in a string; failures carry
``statusCode`` / ``message`` / ``correlationId`` like the real sidecar, with its messages: an
identity id it does not know is 400 "No User Assigned or Delegated Managed Identity found for
specified ClientId/ResourceId/PrincipalId." (MSAL.NET's App Service end-to-end tests), a resource
Entra does not know is 500 "An unexpected error occured while fetching the AAD Token." (sic; MSAL
Python: "Empirically, wrong resource ends up with a vague statusCode=500").

``resource=api://AzureADTokenExchange`` (azure-identity strips ``/.default`` from the scope) gives the
token a workload-identity-federated app registration accepts as its client assertion: issued by the
tenant's v2.0 issuer (``https://login.microsoftonline.com/<tenant>/v2.0``; here the Entra emulator's
host), subject = the identity's principal (object) id, audience ``api://AzureADTokenExchange``.
"""

from __future__ import annotations

import uuid

from flask import Flask, Response, jsonify, request

from devstack import web
from devstack.entra import known_resources
from devstack.sandboxes import TOKEN_EXCHANGE_AUDIENCE, Registry, Sandbox

API_VERSION = "2019-08-01"
PATH = "/msi/token"


def _error(status: int, message: str, sandbox: Sandbox | None = None) -> Response:
    response = jsonify({"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())})
    response.status_code = status
    return response


UNKNOWN_IDENTITY = (
    "No User Assigned or Delegated Managed Identity found for specified ClientId/ResourceId/PrincipalId."
)
TOKEN_FAILURE = "An unexpected error occured while fetching the AAD Token."


def _identity_matches(sandbox: Sandbox) -> bool:
    """Whether the requested identity (if one is named) is the sandbox's."""
    client_id = request.args.get("client_id")
    object_id = request.args.get("object_id") or request.args.get("principal_id")
    if client_id and client_id.lower() != sandbox.mi_client_id.lower():
        return False
    return not (object_id and object_id.lower() != sandbox.mi_principal_id.lower())


def create_app(registry: Registry) -> Flask:
    app = web.create_app("devstack-identity")

    @app.get(PATH)
    def token() -> Response:
        header = request.headers.get("X-IDENTITY-HEADER", "")
        sandbox = registry.by_identity_header(header) if header else None
        if sandbox is None:
            # Nothing to count against: an unknown header belongs to no sandbox.
            if not header:
                return _error(400, "X-IDENTITY-HEADER header is missing.")
            return _error(401, "Invalid X-IDENTITY-HEADER header.")
        sandbox.counters.count("identity", "GET msi")
        faulted = web.enter(sandbox, "identity")
        if faulted is not None:
            return faulted
        if request.args.get("api-version") != API_VERSION:
            return _error(400, f"api-version must be {API_VERSION}.")
        resource = (request.args.get("resource") or "").strip()
        if not resource:
            return _error(400, "Required query parameter 'resource' is missing.")
        if not _identity_matches(sandbox):
            return _error(400, UNKNOWN_IDENTITY)
        audience = resource.rstrip("/")
        if audience.endswith("/.default"):
            audience = audience[: -len("/.default")]
        if audience.lower() == TOKEN_EXCHANGE_AUDIENCE.lower():
            access_token, expires_on = registry.issue_token(
                sandbox, TOKEN_EXCHANGE_AUDIENCE, oid=sandbox.mi_principal_id, appid=sandbox.mi_client_id,
                issuer=registry.federation_issuer(sandbox))
            sandbox.counters.count("identity", "token-exchange")
        elif audience.lower() not in known_resources(registry):
            return _error(500, TOKEN_FAILURE)
        else:
            access_token, expires_on = registry.issue_token(
                sandbox, audience, oid=sandbox.mi_principal_id, appid=sandbox.mi_client_id)
        return jsonify({
            "access_token": access_token,
            "expires_on": str(expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": sandbox.mi_client_id,
        })

    return app
