"""Control API of the stack: tests, `make run` and the benchmarks script sandboxes through it.

This is the HTTP side, in the stack process; ``devstack.control.client`` (``Stack`` / ``SandboxClient``)
is the Python client (it only needs the state file).  Dataverse-specific operations are forwarded to
``sandbox.org``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request

from devstack import certificates, web
from devstack.sandboxes import (
    CERTIFICATE_NAME,
    CLIENT_SECRET_NAME,
    CREDENTIAL_MODES,
    MESSAGE_SECRET_NAME,
    TOKEN_EXCHANGE_AUDIENCE,
    WEBHOOK_SECRET_NAME,
    Fault,
    FederatedCredential,
    RegisteredCertificate,
    Registry,
    Sandbox,
)

# --- server -----------------------------------------------------------------------------------


class _Problem(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sandbox_env(registry: Registry, sandbox: Sandbox) -> dict[str, str]:
    """The app settings that point the production code at this sandbox."""
    urls = registry.urls
    env = {
        "DATAVERSE_URL": urls.get("dataverse", ""),
        "DATAVERSE_TENANT_ID": sandbox.tenant_id,
        "DATAVERSE_CLIENT_ID": sandbox.client_id,
        "KEY_VAULT_URL": urls.get("keyvault", ""),
        "AZURE_AUTHORITY_HOST": urls.get("entra", ""),
        "IDENTITY_ENDPOINT": urls.get("identity", "") + "/msi/token" if urls.get("identity") else "",
        "IDENTITY_HEADER": sandbox.identity_header,
        "DATAVERSE_CLIENT_SECRET_NAME": CLIENT_SECRET_NAME,
        "WEBHOOK_SECRET_NAME": WEBHOOK_SECRET_NAME,
        "DATAVERSE_CREDENTIAL": sandbox.credential_mode,
        "DATAVERSE_CERTIFICATE_NAME": CERTIFICATE_NAME,
        "MESSAGE_SIGNING_SECRET_NAME": MESSAGE_SECRET_NAME,
    }
    if registry.ca_bundle:
        env["REQUESTS_CA_BUNDLE"] = registry.ca_bundle
    return env


def _users(sandbox: Sandbox) -> list[dict[str, Any]]:
    users_wire = getattr(sandbox.org, "users_wire", None)
    return list(users_wire()) if callable(users_wire) else []


def _view(registry: Registry, sandbox: Sandbox) -> dict[str, Any]:
    return {**sandbox.info(), "env": sandbox_env(registry, sandbox), "users": _users(sandbox)}


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True) if request.data else {}
    if data is None or not isinstance(data, dict):
        raise _Problem(400, "body must be a JSON object")
    return data


def _org_call(sandbox: Sandbox, method: str, *args: Any, **kwargs: Any) -> Any:
    target = getattr(sandbox.org, method, None)
    if not callable(target):
        raise _Problem(501, f"the Dataverse emulator does not support {method}()")
    try:
        return target(*args, **kwargs)
    except KeyError as error:
        raise _Problem(404, f"not found: {error.args[0] if error.args else error}") from None
    except (ValueError, TypeError) as error:
        raise _Problem(400, str(error)) from None


def federated_credential_for(registry: Registry, sandbox: Sandbox,
                             body: Mapping[str, Any]) -> FederatedCredential:
    """The record `az ad app federated-credential create` would add; defaults match the sandbox's MI."""
    audiences = body.get("audiences", [TOKEN_EXCHANGE_AUDIENCE])
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences) or not audiences:
        raise _Problem(400, "audiences must be a non-empty list of strings")
    fields = {
        "name": body.get("name", "function-app-identity"),
        "issuer": body.get("issuer", registry.federation_issuer(sandbox)),
        "subject": body.get("subject", sandbox.mi_principal_id),
    }
    for key, value in fields.items():
        if not isinstance(value, str) or not value:
            raise _Problem(400, f"{key} must be a non-empty string")
    return FederatedCredential(audiences=list(audiences), **fields)


def add_certificate(sandbox: Sandbox, *, fmt: str = "pem", register: bool = True, store: bool = True,
                    name: str = CERTIFICATE_NAME) -> dict[str, Any]:
    """A new certificate: uploaded to the app registration and/or added as the vault's latest version."""
    if fmt not in certificates.FORMATS:
        raise _Problem(400, f"format must be one of {', '.join(certificates.FORMATS)}")
    generated = certificates.generate(f"devstack-{sandbox.id}")
    if register:
        sandbox.register_certificate(RegisteredCertificate(
            sha1=generated.sha1_thumbprint, sha256=generated.sha256_thumbprint,
            public_key=generated.certificate.public_key(),
            not_after=generated.certificate.not_valid_after_utc.timestamp()))
    version = None
    if store:
        version = sandbox.set_secret(name, generated.key_vault_value(fmt),
                                     content_type=certificates.FORMATS[fmt], managed=True).version
    return {"thumbprint": generated.sha1_thumbprint, "thumbprint_sha256": generated.sha256_thumbprint,
            "version": version, "content_type": certificates.FORMATS[fmt]}


def use_credential(registry: Registry, sandbox: Sandbox, mode: str, fmt: str = "pem") -> None:
    """Set the sandbox up for ``mode`` the way an operator would, and point sandbox_env at it.

    federated: a matching federated credential, and no client secret anywhere; certificate: a
    registered certificate in Key Vault, and no client secret anywhere; secret: as created.
    """
    if mode not in CREDENTIAL_MODES:
        raise _Problem(400, f"mode must be one of {', '.join(CREDENTIAL_MODES)}")
    if mode == "federated":
        credential = federated_credential_for(registry, sandbox, {})
        found = sandbox.find_federated_credential(credential.issuer, credential.subject, credential.audiences)
        if found is None:
            sandbox.add_federated_credential(credential)
        sandbox.remove_client_secrets()
    elif mode == "certificate":
        if not sandbox.certificates or sandbox.get_secret(CERTIFICATE_NAME) is None:
            add_certificate(sandbox, fmt=fmt)
        sandbox.remove_client_secrets()
    sandbox.credential_mode = mode


def create_app(registry: Registry) -> Flask:
    app = web.create_app("devstack-control")

    @app.errorhandler(_Problem)
    def _problem(error: _Problem) -> Response:
        response = jsonify({"error": error.message})
        response.status_code = error.status
        return response

    def sandbox_or_404(sandbox_id: str) -> Sandbox:
        sandbox = registry.get(sandbox_id)
        if sandbox is None:
            raise _Problem(404, f"no sandbox {sandbox_id!r}")
        return sandbox

    def ok() -> Response:
        return jsonify({"ok": True})

    @app.get("/health")
    def health() -> Response:
        return jsonify({"ok": True, "sandboxes": len(registry), "urls": registry.urls})

    @app.post("/sandboxes")
    def create() -> Response:
        body = _body()
        try:
            sandbox = registry.create(seed=str(body.get("seed", "default")), users=int(body.get("users", 0)),
                                      sandbox_id=body.get("id"))
        except ValueError as error:
            raise _Problem(400, str(error)) from None
        response = jsonify(_view(registry, sandbox))
        response.status_code = 201
        return response

    @app.get("/sandboxes/<sandbox_id>")
    def show(sandbox_id: str) -> Response:
        return jsonify(_view(registry, sandbox_or_404(sandbox_id)))

    @app.delete("/sandboxes/<sandbox_id>")
    def delete(sandbox_id: str) -> Response:
        if sandbox_id == "default":
            raise _Problem(400, "the default sandbox cannot be deleted")
        if not registry.delete(sandbox_id):
            raise _Problem(404, f"no sandbox {sandbox_id!r}")
        return ok()

    @app.get("/sandboxes/<sandbox_id>/counters")
    def counters(sandbox_id: str) -> Response:
        return jsonify(sandbox_or_404(sandbox_id).counters.snapshot())

    @app.delete("/sandboxes/<sandbox_id>/counters")
    def reset_counters(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).counters.reset()
        return ok()

    @app.post("/sandboxes/<sandbox_id>/faults")
    def add_fault(sandbox_id: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        body = _body()
        try:
            fault = Fault(
                service=str(body.get("service")), method=body.get("method"), path_regex=body.get("path"),
                status=body.get("status"), body=body.get("body"), raw_body=body.get("raw_body"),
                headers=body.get("headers"), delay=float(body.get("delay") or 0.0),
                drop=bool(body.get("drop", False)), times=int(body.get("times", 1)),
            )
        except (ValueError, TypeError) as error:
            raise _Problem(400, str(error)) from None
        sandbox.add_fault(fault)
        return ok()

    @app.get("/sandboxes/<sandbox_id>/faults")
    def list_faults(sandbox_id: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        with sandbox.lock:
            return jsonify([f.to_dict() for f in sandbox.faults])

    @app.delete("/sandboxes/<sandbox_id>/faults")
    def clear_faults(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).clear_faults()
        return ok()

    @app.put("/sandboxes/<sandbox_id>/latency/<service>")
    def set_latency(sandbox_id: str, service: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        try:
            sandbox.set_latency(service, float(_body().get("seconds", 0.0)))
        except (ValueError, TypeError) as error:
            raise _Problem(400, str(error)) from None
        return ok()

    @app.put("/sandboxes/<sandbox_id>/secrets/<name>")
    def set_secret(sandbox_id: str, name: str) -> Response:
        value = _body().get("value")
        if not isinstance(value, str):
            raise _Problem(400, "value must be a string")
        version = sandbox_or_404(sandbox_id).set_secret(name, value)
        return jsonify({"name": name, "version": version.version})

    @app.get("/sandboxes/<sandbox_id>/secrets/<name>")
    def get_secret(sandbox_id: str, name: str) -> Response:
        """The latest value, for test and tool code that must sign as the app (never counted)."""
        found = sandbox_or_404(sandbox_id).get_secret(name)
        if found is None:
            raise _Problem(404, f"no secret {name!r}")
        return jsonify({"name": name, "value": found.value, "version": found.version})

    @app.put("/sandboxes/<sandbox_id>/client-secret")
    def set_client_secret(sandbox_id: str) -> Response:
        body = _body()
        value = body.get("value")
        if not isinstance(value, str) or not value:
            raise _Problem(400, "value must be a non-empty string")
        sandbox_or_404(sandbox_id).set_client_secret(value, keep_old=bool(body.get("keep_old", False)))
        return ok()

    @app.delete("/sandboxes/<sandbox_id>/client-secret")
    def remove_client_secret(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).remove_client_secrets()
        return ok()

    @app.put("/sandboxes/<sandbox_id>/credential")
    def set_credential(sandbox_id: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        body = _body()
        use_credential(registry, sandbox, str(body.get("mode")), str(body.get("format", "pem")))
        return jsonify(_view(registry, sandbox))

    @app.post("/sandboxes/<sandbox_id>/federated-credentials")
    def add_federated_credential(sandbox_id: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        credential = federated_credential_for(registry, sandbox, _body())
        try:
            sandbox.add_federated_credential(credential)
        except ValueError as error:
            raise _Problem(409, str(error)) from None
        response = jsonify(credential.to_dict())
        response.status_code = 201
        return response

    @app.put("/sandboxes/<sandbox_id>/federation-errors")
    def set_federation_errors(sandbox_id: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        style = _body().get("style")
        if style not in ("current", "legacy"):
            raise _Problem(400, "style must be current or legacy")
        with sandbox.lock:
            sandbox.federation_errors = str(style)
        return ok()

    @app.delete("/sandboxes/<sandbox_id>/federated-credentials")
    def remove_federated_credentials(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).remove_federated_credentials()
        return ok()

    @app.post("/sandboxes/<sandbox_id>/certificates")
    def new_certificate(sandbox_id: str) -> Response:
        body = _body()
        name = body.get("name", CERTIFICATE_NAME)
        if not isinstance(name, str) or not name:
            raise _Problem(400, "name must be a non-empty string")
        result = add_certificate(sandbox_or_404(sandbox_id), fmt=str(body.get("format", "pem")),
                                 register=bool(body.get("register", True)),
                                 store=bool(body.get("store", True)), name=name)
        response = jsonify(result)
        response.status_code = 201
        return response

    @app.delete("/sandboxes/<sandbox_id>/certificates/<thumbprint>")
    def remove_certificate(sandbox_id: str, thumbprint: str) -> Response:
        if not sandbox_or_404(sandbox_id).unregister_certificate(thumbprint):
            raise _Problem(404, f"no certificate {thumbprint!r} on the app registration")
        return ok()

    @app.post("/sandboxes/<sandbox_id>/client-secret/expire")
    def expire_client_secret(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).expire_client_secret()
        return ok()

    @app.put("/sandboxes/<sandbox_id>/token-lifetime")
    def set_token_lifetime(sandbox_id: str) -> Response:
        sandbox = sandbox_or_404(sandbox_id)
        seconds = _body().get("seconds")
        if not isinstance(seconds, int) or seconds < 1:
            raise _Problem(400, "seconds must be a positive integer")
        sandbox.token_lifetime = seconds
        return ok()

    @app.post("/sandboxes/<sandbox_id>/revoke-tokens")
    def revoke_tokens(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).revoke_tokens()
        return ok()

    @app.put("/sandboxes/<sandbox_id>/keyvault-access")
    def set_keyvault_access(sandbox_id: str) -> Response:
        sandbox_or_404(sandbox_id).keyvault_forbidden = not bool(_body().get("allowed", True))
        return ok()

    # --- Dataverse state, delegated to sandbox.org -------------------------------------------
    @app.put("/sandboxes/<sandbox_id>/limits")
    def set_limits(sandbox_id: str) -> Response:
        body = _body()
        allowed = {"requests", "window_seconds", "execution_ms", "concurrent", "dop_hint"}
        unknown = set(body) - allowed
        if unknown:
            raise _Problem(400, f"unknown limits: {sorted(unknown)}")
        limits = _org_call(sandbox_or_404(sandbox_id), "set_limits", **body)
        return jsonify(limits if isinstance(limits, dict) else {"ok": True})

    @app.put("/sandboxes/<sandbox_id>/privilege")
    def set_privilege(sandbox_id: str) -> Response:
        body = _body()
        _org_call(sandbox_or_404(sandbox_id), "set_privilege", impersonation=bool(body.get("impersonation")))
        return ok()

    @app.get("/sandboxes/<sandbox_id>/users")
    def list_users(sandbox_id: str) -> Response:
        return jsonify(_users(sandbox_or_404(sandbox_id)))

    @app.post("/sandboxes/<sandbox_id>/users")
    def add_user(sandbox_id: str) -> Response:
        body = _body()
        email = body.pop("email", None)
        if not isinstance(email, str):
            raise _Problem(400, "email must be a string")
        user = _org_call(sandbox_or_404(sandbox_id), "add_user", email, **body)
        response = jsonify(user)
        response.status_code = 201
        return response

    @app.patch("/sandboxes/<sandbox_id>/users/<systemuserid>")
    def update_user(sandbox_id: str, systemuserid: str) -> Response:
        user = _org_call(sandbox_or_404(sandbox_id), "update_user", systemuserid, **_body())
        return jsonify(user if user is not None else {"ok": True})

    @app.delete("/sandboxes/<sandbox_id>/users/<systemuserid>")
    def remove_user(sandbox_id: str, systemuserid: str) -> Response:
        _org_call(sandbox_or_404(sandbox_id), "remove_user", systemuserid)
        return ok()

    @app.get("/sandboxes/<sandbox_id>/roles")
    def list_roles(sandbox_id: str) -> Response:
        return jsonify(_org_call(sandbox_or_404(sandbox_id), "roles_wire"))

    @app.post("/sandboxes/<sandbox_id>/roles")
    def add_role(sandbox_id: str) -> Response:
        body = _body()
        response = jsonify(_org_call(sandbox_or_404(sandbox_id), "add_role", body.get("name"),
                                     body.get("roletemplateid")))
        response.status_code = 201
        return response

    @app.put("/sandboxes/<sandbox_id>/users/<systemuserid>/roles")
    def set_user_roles(sandbox_id: str, systemuserid: str) -> Response:
        roles = _body().get("roles")
        if not isinstance(roles, list):
            raise _Problem(400, "roles must be a list of role ids")
        return jsonify(_org_call(sandbox_or_404(sandbox_id), "set_user_roles", systemuserid, roles))

    @app.post("/sandboxes/<sandbox_id>/teams")
    def add_team(sandbox_id: str) -> Response:
        body = _body()
        team = _org_call(sandbox_or_404(sandbox_id), "add_team", body.get("name"), body.get("members") or [],
                         body.get("roles") or [], int(body.get("teamtype") or 0))
        response = jsonify(team)
        response.status_code = 201
        return response

    @app.get("/sandboxes/<sandbox_id>/records/<entity_set>")
    def records(sandbox_id: str, entity_set: str) -> Response:
        return jsonify(_org_call(sandbox_or_404(sandbox_id), "records", entity_set))

    @app.post("/sandboxes/<sandbox_id>/entities")
    def add_entity(sandbox_id: str) -> Response:
        body = _body()
        entity_set, primary_id = body.get("entity_set"), body.get("primary_id")
        if not isinstance(entity_set, str) or not isinstance(primary_id, str):
            raise _Problem(400, "entity_set and primary_id must be strings")
        alternate_keys = body.get("alternate_keys") or []
        _org_call(sandbox_or_404(sandbox_id), "add_entity", entity_set, primary_id,
                  alternate_keys=alternate_keys, columns=body.get("columns"))
        return ok()

    return app
