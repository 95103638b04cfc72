"""The app's own storage account, reached the way the Functions host reaches it: ``AzureWebJobsStorage``.

State that every instance must share (the webhook replay window, the deployment-wide Dataverse
throttle) lives in blobs of the account the host already uses for its queues and leases, so the app
needs no new resource and no new secret.  The connection is the host's own setting:

* ``AzureWebJobsStorage`` — a connection string (Azurite locally, ``UseDevelopmentStorage=true``);
* ``AzureWebJobsStorage__blobServiceUri`` or ``AzureWebJobsStorage__accountName`` — identity-based,
  as infra/ deploys it (``__credential=managedidentity`` with ``__clientId`` for a user-assigned one).

Nothing is read or imported until first use (the SDK import is lazy, like the other SDKs).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigurationError

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, ContainerClient

STORAGE_SETTING = "AzureWebJobsStorage"
TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class StorageTarget:
    """Where the account is and how to authenticate; ``source`` names the setting it came from."""

    source: str
    connection_string: str | None = None
    account_url: str | None = None
    client_id: str | None = None  # user-assigned managed identity (``__clientId``)


def resolve(environ: Mapping[str, str] | None = None) -> StorageTarget:
    """Read the host's storage settings, the way the Functions host reads them (first match wins)."""
    env = os.environ if environ is None else environ
    if env.get(STORAGE_SETTING):
        return StorageTarget(STORAGE_SETTING, connection_string=env[STORAGE_SETTING])
    client_id = env.get(f"{STORAGE_SETTING}__clientId") or None
    uri = env.get(f"{STORAGE_SETTING}__blobServiceUri")
    if uri:
        if not uri.startswith("https://"):
            raise ConfigurationError(
                f"{STORAGE_SETTING}__blobServiceUri",
                f"{STORAGE_SETTING}__blobServiceUri must be an https:// URL, got {uri!r}",
            )
        return StorageTarget(f"{STORAGE_SETTING}__blobServiceUri", account_url=uri.rstrip("/"),
                             client_id=client_id)
    account = env.get(f"{STORAGE_SETTING}__accountName")
    if account:
        return StorageTarget(f"{STORAGE_SETTING}__accountName",
                             account_url=f"https://{account}.blob.core.windows.net", client_id=client_id)
    raise ConfigurationError(
        STORAGE_SETTING,
        f"no storage account: set {STORAGE_SETTING} (a connection string) or "
        f"{STORAGE_SETTING}__blobServiceUri / {STORAGE_SETTING}__accountName (identity-based)",
        code="setting_missing",
    )


class BlobStore:
    """One ``BlobServiceClient`` per instance (its connection pool is reused), built at first use."""

    def __init__(self, target: StorageTarget | None = None) -> None:
        self._target = target
        self._client: BlobServiceClient | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> BlobServiceClient:
        with self._lock:
            if self._client is None:
                self._client = _build(self._target or resolve())
            return self._client

    def container(self, name: str) -> ContainerClient:
        return self.service.get_container_client(name)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _build(target: StorageTarget) -> BlobServiceClient:
    from azure.storage.blob import BlobServiceClient

    options: dict[str, Any] = {"connection_timeout": TIMEOUT_SECONDS, "read_timeout": TIMEOUT_SECONDS,
                               "retry_total": 2}
    if target.connection_string is not None:
        return BlobServiceClient.from_connection_string(target.connection_string, **options)
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential(managed_identity_client_id=target.client_id)
    assert target.account_url is not None
    return BlobServiceClient(target.account_url, credential=credential, **options)
