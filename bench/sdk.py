"""Microsoft's SDK baseline: the same queue function written with ``powerplatform-dataverse-client``.

Used at its best: one module-level client per process, entered once so it keeps one pooled
``requests.Session`` (TLS reuse, the SDK's documented way to get pooling), one
``ClientSecretCredential`` (whose in-memory cache reuses the token), the client secret from an
environment variable.  The SDK cannot impersonate, so it runs the non-impersonated variant only
(the job's ``actAs`` must be absent).  The SDK retries network errors itself but not 429/5xx:
those raise, and the queue redelivers the message.  ``upsert`` takes the table's schema name
(``contact``), resolved to the entity set by one metadata query that the SDK caches.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import azure.functions as func
from azure.identity import ClientSecretCredential
from PowerPlatform.Dataverse.client import DataverseClient

DATAVERSE_URL = os.environ["DATAVERSE_URL"].rstrip("/")
TABLES = {"contacts": "contact", "accounts": "account", "leads": "lead"}

_lock = threading.Lock()
_client: DataverseClient | None = None


def client() -> DataverseClient:
    global _client
    with _lock:
        if _client is None:
            authority = os.environ.get("AZURE_AUTHORITY_HOST") or None
            credential = ClientSecretCredential(
                os.environ["DATAVERSE_TENANT_ID"],
                os.environ["DATAVERSE_CLIENT_ID"],
                os.environ["DATAVERSE_CLIENT_SECRET"],
                authority=authority,
                disable_instance_discovery=authority is not None,
            )
            _client = DataverseClient(DATAVERSE_URL, credential).__enter__()
        return _client


def main(msg: func.QueueMessage) -> None:
    job: dict[str, Any] = json.loads(msg.get_body())
    if job.get("actAs"):
        raise ValueError("the SDK has no impersonation")
    client().records.upsert(TABLES[job["entity"]], [{"alternate_key": job["key"], "record": job["data"]}])
