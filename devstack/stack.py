"""The local stack wired in one place: which services exist, how each is built, served and probed.

``RunningStack`` builds every emulator from ``SERVICES`` (one row per service: its Flask app factory, its
fixed port, whether it speaks TLS, the request that proves it answers), runs each on its own server thread,
starts Azurite as a child and writes the state file the clients read.  ``python -m devstack`` (``__main__``)
is only the command line around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from flask import Flask

from devstack import azurite, entra, identity, keyvault, tls, web
from devstack.control import server as control_server
from devstack.dataverse import api as dataverse_api
from devstack.dataverse import state as dataverse_state
from devstack.sandboxes import DEFAULT_SANDBOX_ID, DEFAULT_TENANT_ID, Registry


@dataclass(frozen=True)
class Service:
    """One emulator: how to build its app over the shared registry, where it listens, how to probe it."""

    create_app: Callable[[Registry], Flask]
    fixed_port: int
    tls: bool
    probe: str


SERVICES: dict[str, Service] = {
    "identity": Service(identity.create_app, 7072, tls=False, probe=identity.PATH),
    "entra": Service(entra.create_app, 7073, tls=True,
                     probe=f"/{DEFAULT_TENANT_ID}/v2.0/.well-known/openid-configuration"),
    "keyvault": Service(keyvault.create_app, 7074, tls=True, probe="/secrets/probe?api-version=7.6"),
    "control": Service(control_server.create_app, 7076, tls=False, probe="/health"),
    "dataverse": Service(dataverse_api.create_app, 7075, tls=True, probe="/api/data/v9.2/"),
}
FIXED_PORTS = {name: service.fixed_port for name, service in SERVICES.items()}
HOST = "127.0.0.1"


def new_registry() -> Registry:
    """The registry every service shares; each sandbox's Dataverse organisation is a ``state.Org``."""
    return Registry(org_factory=dataverse_state.Org)


log = logging.getLogger("devstack")


class RunningStack:
    """Every emulator on its own server thread, Azurite as a child; ``stop()`` undoes it all."""

    def __init__(self, state_path: Path, *, fixed_ports: bool, with_azurite: bool = True) -> None:
        self.state_path = state_path
        self.state_dir = state_path.parent
        self.fixed_ports = fixed_ports
        self.with_azurite = with_azurite
        self.registry = new_registry()
        self.servers: dict[str, web.ServerHandle] = {}
        self.azurite: azurite.Azurite | None = None
        self._wrote_state = False

    def start(self) -> dict[str, Any]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.with_azurite:
                # First, so its boot overlaps ours; and from the main thread, which lives as long as we do
                # (the parent-death signal fires when the spawning thread exits).
                self.azurite = azurite.start(self.state_dir / "azurite",
                                             azurite.FIXED_PORTS if self.fixed_ports else None, HOST)
            self.registry.ca_bundle = tls.write_ca_bundle(self.state_dir)
            for name, service in SERVICES.items():
                port = service.fixed_port if self.fixed_ports else 0
                handle = web.serve(service.create_app(self.registry), HOST, port, tls=service.tls)
                self.servers[name] = handle
                self.registry.urls[name] = handle.url
            self.registry.create(sandbox_id=DEFAULT_SANDBOX_ID)
            self._wait_until_answering()
            if self.azurite is not None:
                self.azurite.wait_ready()
            state = self.state()
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
            tmp.replace(self.state_path)
            self._wrote_state = True
            return state
        except BaseException:
            self.stop()
            raise

    def state(self) -> dict[str, Any]:
        urls = self.registry.urls
        return {
            "pid": os.getpid(),
            "ca_bundle": self.registry.ca_bundle,
            "control_url": urls["control"],
            "urls": {name: urls[name] for name in ("identity", "entra", "keyvault", "dataverse")},
            "identity_endpoint": urls["identity"] + identity.PATH,
            "default_sandbox": DEFAULT_SANDBOX_ID,
            "azurite": self.azurite.state() if self.azurite is not None else {},
        }

    def _wait_until_answering(self) -> None:
        """One real request per service through the real TLS path: the state file promises they answer."""
        session = requests.Session()
        session.trust_env = False
        session.verify = self.registry.ca_bundle or True
        for name, handle in self.servers.items():
            # The listening socket is bound before the server thread starts: one attempt suffices.
            response = session.get(handle.url + SERVICES[name].probe, timeout=10)
            log.debug("%s answered %s", name, response.status_code)
        # The probes hit the default sandbox's Entra counters; start it clean.
        default = self.registry.get(DEFAULT_SANDBOX_ID)
        if default is not None:
            default.counters.reset()
        session.close()

    def stop(self) -> None:
        for handle in self.servers.values():
            with contextlib.suppress(Exception):
                handle.shutdown()
        self.servers.clear()
        if self.azurite is not None:
            self.azurite.stop()
            self.azurite = None
        if self._wrote_state:
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
            self._wrote_state = False
