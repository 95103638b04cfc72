"""The per-instance objects, wired once: settings -> secrets -> tokens -> Dataverse -> users -> attribution
-> authorization policy.

Everything expensive to warm (the Key Vault secret, the token, the connection pool, the user
cache) lives in these objects, so a warm Functions instance keeps them in one ``Runtime``,
built lazily at first use: importing the app never reads a setting or opens a connection.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from shared import logs
from shared.attribution import AttributionGuard
from shared.dataverse import DataverseClient
from shared.errors import ConfigurationError
from shared.keyring import KeyRing
from shared.memberships import MembershipDirectory
from shared.policy import Authorizer
from shared.replay import ReplayGuard
from shared.secrets import SecretStore
from shared.settings import Settings, get_settings, reset_settings
from shared.storage import BlobStore, resolve
from shared.throttle import BlobStateStore, DeploymentThrottle, NoThrottle, blob_name
from shared.tokens import TokenProvider
from shared.users import UserDirectory


@dataclass
class Runtime:
    settings: Settings
    secrets: SecretStore
    tokens: TokenProvider
    dataverse: DataverseClient
    users: UserDirectory
    attribution: AttributionGuard
    webhook_keys: KeyRing
    message_keys: KeyRing
    replay: ReplayGuard
    policy: Authorizer
    blobs: BlobStore = field(default_factory=BlobStore)  # AzureWebJobsStorage, at first use (claim-checks)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        secrets = SecretStore(settings.key_vault_url)
        tokens = TokenProvider(settings, secrets)
        blobs = BlobStore()
        dataverse = DataverseClient(settings, tokens, throttle=build_throttle(settings, blobs))
        users = UserDirectory(
            dataverse, ttl=settings.user_cache_ttl, negative_ttl=settings.user_cache_negative_ttl
        )
        attribution = AttributionGuard(dataverse, ttl=settings.user_cache_ttl)
        refresh, grace = settings.key_refresh_seconds, settings.key_grace_seconds
        webhook_keys = KeyRing(secrets, settings.webhook_secret_name, refresh_seconds=refresh,
                               grace_seconds=grace)
        # The app signs with the message key too: a new value is used only once every instance has read
        # it (settle = refresh), and the old one is kept longer by the same margin (shared/keyring.py).
        message_keys = KeyRing(secrets, settings.message_secret_name, refresh_seconds=refresh,
                               grace_seconds=grace + 2 * refresh, settle_seconds=refresh)
        memberships = MembershipDirectory(dataverse, ttl=settings.user_cache_ttl)
        policy = Authorizer(settings, users, memberships, blobs=blobs)
        return cls(settings, secrets, tokens, dataverse, users, attribution, webhook_keys, message_keys,
                   ReplayGuard(blobs), policy, blobs)

    def close(self) -> None:
        self.dataverse.close()
        self.secrets.close()
        self.blobs.close()


def build_throttle(settings: Settings, blobs: BlobStore) -> DeploymentThrottle | NoThrottle:
    """The deployment throttle: shared through the host's storage when it is configured (or forced).

    ``DATAVERSE_SHARED_THROTTLE=false`` keeps the client's per-request Retry-After handling only;
    ``true`` without a usable storage setting still throttles per instance (and says so once).
    """
    if settings.shared_throttle == "false":
        return NoThrottle()
    try:
        resolve()
        configured = True
    except ConfigurationError:
        configured = False
    if not configured:
        if settings.shared_throttle == "auto":
            return NoThrottle()
        logging.getLogger("shared.throttle").warning(
            "DATAVERSE_SHARED_THROTTLE=true but no storage is configured (AzureWebJobsStorage): "
            "throttling per instance only")
    name = blob_name(settings.dataverse_url, settings.client_id)
    store = BlobStateStore(blobs, name) if configured else None
    return DeploymentThrottle(
        store,
        refresh_seconds=settings.throttle_refresh_seconds,
        heartbeat_seconds=settings.throttle_heartbeat_seconds,
        grow_after=settings.throttle_grow_after,
    )


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """The instance's runtime, built at first use from the environment's settings (thread-safe)."""
    global _runtime
    runtime = _runtime
    if runtime is not None:
        return runtime
    with _lock:
        if _runtime is None:
            logs.install()
            _runtime = Runtime.from_settings(get_settings())
        return _runtime


def reset_runtime() -> None:
    """Drop the runtime and the cached settings (tests; the local host when it switches sandboxes)."""
    global _runtime
    with _lock:
        old, _runtime = _runtime, None
        reset_settings()
    if old is not None:
        old.close()
