"""A signed webhook body is accepted once: the replay window, shared by every instance through blob storage.

The signature's timestamp already limits a captured request to 300 s; within them, anybody who saw it
(a proxy log, a sender's retry queue) could post it again and have its jobs enqueued again.  So each
accepted body is remembered for the window in the app's own storage account (``AzureWebJobsStorage``,
see ``shared.storage``), which every instance shares:

    container ``webhook-replay``, blob ``<t>/<sha256 hex of "<t>.<source>.<body>">`` (empty)

created with ``If-None-Match: *`` (``upload_blob(overwrite=False)``): the first instance to create it
wins; any later identical request gets ``ResourceExistsError`` and is a replay (409 ``replayed``).  The
digest is of the signed content, not of the HMAC, so the same body re-signed with a rotated key within
the same second is the same request, and the blob name reveals nothing that could be replayed.
An infra lifecycle rule deletes the blobs after one day; the timestamp check makes older ones irrelevant.

Storage unavailable: :class:`ReplayStoreUnavailable` (the webhook answers 503 with Retry-After) — a
body that cannot be proven new is never accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigurationError, ReplayStoreUnavailable

if TYPE_CHECKING:
    from azure.storage.blob import ContainerClient

    from shared.storage import BlobStore

log = logging.getLogger("shared.replay")

CONTAINER = "webhook-replay"
_FAST: dict[str, Any] = {"retry_total": 0, "connection_timeout": 3, "read_timeout": 5}
"""Per call: an HTTP request must not wait out the storage SDK's retry backoff (15 s, then 18 s...);
the sender is told 503 + Retry-After and tries again instead."""


def blob_name(timestamp: int, source: str, body: bytes) -> str:
    digest = hashlib.sha256(str(timestamp).encode("ascii") + b"." + source.encode("utf-8") + b"." + body)
    return f"{timestamp}/{digest.hexdigest()}"


class ReplayGuard:
    """``first_use(t, source, body)``: True the first time, False for a replay, raises when unsure."""

    def __init__(self, blobs: BlobStore, container: str = CONTAINER) -> None:
        self._blobs = blobs
        self._container = container
        self.writes = 0

    def first_use(self, timestamp: int, source: str, body: bytes) -> bool:
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

        name = blob_name(timestamp, source, body)
        try:
            container = self._blobs.container(self._container)
            try:
                self._claim(container, name)
            except ResourceNotFoundError:
                # a fresh account (Azurite, or before infra created it): create the container once
                with contextlib.suppress(ResourceExistsError):
                    container.create_container(**_FAST)
                self._claim(container, name)
        except ResourceExistsError:
            log.warning("source=%s webhook replay refused (t=%d)", source, timestamp)
            return False
        except ConfigurationError:
            raise
        except AzureError as exc:
            log.error("webhook replay window unavailable: %s", type(exc).__name__)
            raise ReplayStoreUnavailable(
                f"the replay window in container {self._container} could not be written "
                f"({type(exc).__name__}); the request was not accepted, try again",
                details=[{"container": self._container}],
            ) from exc
        return True

    def _claim(self, container: ContainerClient, name: str) -> None:
        self.writes += 1
        container.upload_blob(name, b"", overwrite=False, **_FAST)
