"""Python client of the control API: ``Stack`` (from the state file) and ``SandboxClient`` (one sandbox).

Tests, ``make run`` (devstack.demo) and the benchmarks use it; it needs only the state file and plain HTTP on
loopback, never the stack's objects, so it runs in any process.  Every refusal raises ``ControlError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from devstack.sandboxes import (
    SERVICES,
)

# --- server -----------------------------------------------------------------------------------



class ControlError(RuntimeError):
    """The control API refused a request (bad argument, unknown sandbox, unsupported operation)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"control API {status}: {message}")
        self.status = status
        self.message = message


class _Http:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False  # plain HTTP on loopback: no proxies, no CA bundle

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        response = self.session.request(method, self.base_url + path, json=body, timeout=30)
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text}
        if response.status_code >= 400:
            raise ControlError(response.status_code, str(data.get("error", data)))
        return data


class SandboxClient:
    """One sandbox, seen from a test: settings to run the app against it, and knobs to misbehave."""

    def __init__(self, http: _Http, view: Mapping[str, Any]) -> None:
        self._http = http
        self.id: str = view["id"]
        self.info: dict[str, Any] = dict(view)
        self.env: dict[str, str] = dict(view["env"])
        self.users: list[dict[str, Any]] = list(view.get("users", []))
        self.tenant_id: str = view["tenant_id"]
        self.client_id: str = view["client_id"]
        self.identity_header: str = view["identity_header"]

    def _path(self, suffix: str = "") -> str:
        return f"/sandboxes/{self.id}{suffix}"

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = self._http.call("GET", self._path("/counters"))
        return result

    def reset_counters(self) -> None:
        self._http.call("DELETE", self._path("/counters"))

    def add_fault(self, service: str, *, method: str | None = None, path: str | None = None,
                  status: int | None = None, body: Any = None, raw_body: str | None = None,
                  headers: Mapping[str, str] | None = None, delay: float = 0.0, drop: bool = False,
                  times: int = 1) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
        self._http.call("POST", self._path("/faults"), {
            "service": service, "method": method, "path": path, "status": status, "body": body,
            "raw_body": raw_body, "headers": dict(headers) if headers else None, "delay": delay,
            "drop": drop, "times": times,
        })

    def faults(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._http.call("GET", self._path("/faults"))
        return result

    def clear_faults(self) -> None:
        self._http.call("DELETE", self._path("/faults"))

    def set_latency(self, service: str, seconds: float) -> None:
        self._http.call("PUT", self._path(f"/latency/{service}"), {"seconds": seconds})

    def set_limits(self, requests: int | None = None, window_seconds: float | None = None,
                   execution_ms: int | None = None, concurrent: int | None = None,
                   dop_hint: int | None = None) -> dict[str, Any]:
        """Service-protection limits (None keeps a value); returns the limits now in force."""
        limits = {"requests": requests, "window_seconds": window_seconds, "execution_ms": execution_ms,
                  "concurrent": concurrent, "dop_hint": dop_hint}
        result: dict[str, Any] = self._http.call(
            "PUT", self._path("/limits"), {k: v for k, v in limits.items() if v is not None})
        return result

    def set_secret(self, name: str, value: str) -> str:
        """Adds a new Key Vault version; returns its version id."""
        result = self._http.call("PUT", self._path(f"/secrets/{name}"), {"value": value})
        return str(result["version"])

    def secret(self, name: str) -> str:
        """The latest value of a Key Vault secret, read through the control API (no Key Vault counter)."""
        result = self._http.call("GET", self._path(f"/secrets/{name}"))
        return str(result["value"])

    def set_client_secret(self, value: str, *, keep_old: bool = False) -> None:
        self._http.call("PUT", self._path("/client-secret"), {"value": value, "keep_old": keep_old})

    def expire_client_secret(self) -> None:
        self._http.call("POST", self._path("/client-secret/expire"))

    def remove_client_secret(self) -> None:
        """No client secret on the app registration and none in Key Vault."""
        self._http.call("DELETE", self._path("/client-secret"))

    def use_credential(self, mode: str, *, fmt: str = "pem") -> dict[str, str]:
        """Set the sandbox up for DATAVERSE_CREDENTIAL=``mode`` (no client secret left for federated and
        certificate); returns, and keeps in ``env``, the settings to run the app with."""
        view = self._http.call("PUT", self._path("/credential"), {"mode": mode, "format": fmt})
        self.info = dict(view)
        self.env = dict(view["env"])
        return self.env

    def set_federation_errors(self, style: str) -> None:
        """How Entra refuses an unmatched federated assertion: "current" (401, AADSTS700211/2/3, the
        default) or "legacy" (400 invalid_request, AADSTS70021), which older tenants still answered."""
        self._http.call("PUT", self._path("/federation-errors"), {"style": style})

    def add_federated_credential(self, *, name: str | None = None, issuer: str | None = None,
                                 subject: str | None = None,
                                 audiences: list[str] | None = None) -> dict[str, Any]:
        """A federated credential on the app registration; omitted fields match the sandbox's identity."""
        body = {"name": name, "issuer": issuer, "subject": subject, "audiences": audiences}
        result: dict[str, Any] = self._http.call(
            "POST", self._path("/federated-credentials"), {k: v for k, v in body.items() if v is not None})
        return result

    def remove_federated_credentials(self) -> None:
        self._http.call("DELETE", self._path("/federated-credentials"))

    def add_certificate(self, *, fmt: str = "pem", register: bool = True, store: bool = True,
                        name: str | None = None) -> dict[str, Any]:
        """A new certificate, uploaded to the app registration (``register``) and/or stored in Key Vault
        as the certificate's latest version (``store``, content type by ``fmt``: pem or pfx)."""
        body: dict[str, Any] = {"format": fmt, "register": register, "store": store}
        if name is not None:
            body["name"] = name
        result: dict[str, Any] = self._http.call("POST", self._path("/certificates"), body)
        return result

    def remove_certificate(self, thumbprint: str) -> None:
        """Remove the certificate from the app registration (Key Vault keeps its versions)."""
        self._http.call("DELETE", self._path(f"/certificates/{thumbprint}"))

    def show(self) -> dict[str, Any]:
        """The sandbox as the control API sees it now (credentials on the app, secret names in the vault)."""
        result: dict[str, Any] = self._http.call("GET", self._path())
        return result

    def set_token_lifetime(self, seconds: int) -> None:
        self._http.call("PUT", self._path("/token-lifetime"), {"seconds": seconds})

    def revoke_tokens(self) -> None:
        self._http.call("POST", self._path("/revoke-tokens"))

    def set_keyvault_access(self, allowed: bool) -> None:
        """False: Key Vault answers 403 ForbiddenByRbac, as when the role assignment is missing."""
        self._http.call("PUT", self._path("/keyvault-access"), {"allowed": allowed})

    def set_privilege(self, *, impersonation: bool) -> None:
        self._http.call("PUT", self._path("/privilege"), {"impersonation": impersonation})

    def list_users(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._http.call("GET", self._path("/users"))
        return result

    def add_user(self, email: str, *, fullname: str | None = None, object_id: str | None = "auto",
                 disabled: bool = False, ignore_impersonation: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._http.call("POST", self._path("/users"), {
            "email": email, "fullname": fullname, "object_id": object_id, "disabled": disabled,
            "ignore_impersonation": ignore_impersonation,
        })
        return result

    def update_user(self, systemuserid: str, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._http.call("PATCH", self._path(f"/users/{systemuserid}"), fields)
        return result

    def remove_user(self, systemuserid: str) -> None:
        self._http.call("DELETE", self._path(f"/users/{systemuserid}"))

    def roles(self) -> list[dict[str, Any]]:
        """Security roles (``name``, ``roleid``, ``_roletemplateid_value``); System Administrator is seeded"""
        result: list[dict[str, Any]] = self._http.call("GET", self._path("/roles"))
        return result

    def role_id(self, name: str) -> str:
        return next(str(r["roleid"]) for r in self.roles() if r["name"] == name)

    def add_role(self, name: str, *, roletemplateid: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._http.call("POST", self._path("/roles"),
                                                 {"name": name, "roletemplateid": roletemplateid})
        return result

    def set_user_roles(self, systemuserid: str, roles: list[str]) -> list[str]:
        result: list[str] = self._http.call("PUT", self._path(f"/users/{systemuserid}/roles"),
                                            {"roles": roles})
        return result

    def add_team(
        self, name: str, *, members: Sequence[str] = (), roles: Sequence[str] = ()
    ) -> dict[str, Any]:
        body = {"name": name, "members": list(members), "roles": list(roles)}
        result: dict[str, Any] = self._http.call("POST", self._path("/teams"), body)
        return result

    def records(self, entity_set: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._http.call("GET", self._path(f"/records/{entity_set}"))
        return result

    def add_entity(self, entity_set: str, primary_id: str,
                   alternate_keys: list[list[str]] | None = None, columns: list[str] | None = None) -> None:
        """A table (or, for a stock table, its keys and extra columns: stock tables know only the columns
        in devstack.dataverse.STOCK_COLUMNS, so a test adds a customer's ``cr123_...`` column here)."""
        self._http.call("POST", self._path("/entities"), {
            "entity_set": entity_set, "primary_id": primary_id,
            "alternate_keys": alternate_keys if alternate_keys is not None else [["emailaddress1"]],
            "columns": columns or [],
        })

    def delete(self) -> None:
        self._http.call("DELETE", self._path())


class Stack:
    """A running stack, found through its state file."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)
        self.control_url: str = state["control_url"]
        self.ca_bundle: str = state["ca_bundle"]
        self.urls: dict[str, str] = dict(state["urls"])
        self.azurite: dict[str, str] = dict(state.get("azurite") or {})
        self._http = _Http(self.control_url)

    @classmethod
    def from_state(cls, path_or_env: str | os.PathLike[str] | None = None) -> Stack:
        """Reads the state file at ``path_or_env``, else at ``$DEVSTACK_STATE``."""
        path = path_or_env if path_or_env is not None else os.environ.get("DEVSTACK_STATE")
        if not path:
            raise RuntimeError(
                "no devstack state: set DEVSTACK_STATE or run under `python -m devstack exec --`")
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._http.call("GET", "/health")
        return result

    def create_sandbox(self, seed: str = "default", users: int = 0,
                       sandbox_id: str | None = None) -> SandboxClient:
        body: dict[str, Any] = {"seed": seed, "users": users}
        if sandbox_id is not None:
            body["id"] = sandbox_id
        return SandboxClient(self._http, self._http.call("POST", "/sandboxes", body))

    def sandbox(self, sandbox_id: str = "default") -> SandboxClient:
        """An existing sandbox (e.g. the fixed `default` one)."""
        return SandboxClient(self._http, self._http.call("GET", f"/sandboxes/{sandbox_id}"))


__all__ = ["ControlError", "SandboxClient", "Stack"]

