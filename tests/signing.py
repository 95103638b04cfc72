"""The one way tests put a job on the queue: signed with the app's message key, as the webhook does.

``sync_job`` refuses unsigned messages (dead-letter ``unauthenticated_message``), so a test that enqueues
directly or calls ``function_app.sync_job`` with a body signs it here.  Tests of the refusal itself build
their unsigned / tampered / wrong-key messages from these too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from devstack.sandboxes import MESSAGE_SECRET_NAME
from shared.messages import sign

if TYPE_CHECKING:
    from devstack.control import SandboxClient

SOURCE = "tests"
"""The source tests sign for (keyless-create ids are scoped by it: ``deterministic_id(e, id, SOURCE)``)."""

UNIT_MESSAGE_KEY = "unit-message-KEY-value-789"
"""The message key of the unit tests' FakeSecrets."""


def sign_job(
    job: Mapping[str, Any], key: str, *, source: str | None = None, now: float | None = None
) -> dict[str, Any]:
    """The message for ``job``: ``_auth`` added, ``source`` stamped (default: its own, else SOURCE)."""
    return sign(job, source or str(job.get("source") or SOURCE), key, now=now)


def signed_text(job: Mapping[str, Any], key: str = UNIT_MESSAGE_KEY, *, source: str | None = None) -> str:
    """The queue text of ``job`` signed with ``key`` (the unit tests' key by default)."""
    return json.dumps(sign_job(job, key, source=source), ensure_ascii=False, separators=(",", ":"))


def message_key(sandbox: SandboxClient) -> str:
    """The sandbox's current message key (through the control API: no Key Vault read is counted)."""
    return sandbox.secret(MESSAGE_SECRET_NAME)


def signed_for(sandbox: SandboxClient, job: Mapping[str, Any], *, source: str | None = None) -> str:
    """The queue text of ``job`` signed with the sandbox's message key."""
    return signed_text(job, message_key(sandbox), source=source)


CURRENT: list[SandboxClient] = []
"""The sandbox whose settings the ``sandbox_env`` fixture put in os.environ (the app under test's)."""


def signed_for_env(job: Mapping[str, Any], *, source: str | None = None) -> str:
    """The queue text of ``job`` signed with the message key of the app under test (``sandbox_env``)."""
    assert CURRENT, "signed_for_env needs the sandbox_env fixture"
    return signed_for(CURRENT[-1], job, source=source)
