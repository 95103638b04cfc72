"""The job contract's vocabulary that every layer shares: who a job acts as, and the one GUID and email
check the whole product uses.

It sits at the bottom of shared/ (it imports nothing of the project), so the user directory, the
reconciliation and the diagnostics can validate the same way the job parser does without importing the
module that runs jobs — imports in shared/ run one way (see ``.importlinter``).
"""

from __future__ import annotations

import re

ACT_AS_FIELDS = ("email", "systemUserId", "azureAdObjectId")
"""The ways a job names the user to act as; exactly one is given."""

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+")
_MAX_EMAIL = 254


def is_email_address(value: object) -> bool:
    """A deliberately loose check: one ``@``, something on each side, no spaces; quotes are fine (o'brien)."""
    return (
        isinstance(value, str)
        and len(value) <= _MAX_EMAIL
        and _EMAIL.fullmatch(value) is not None
        and not value.endswith(".")
    )


def is_guid(value: object) -> bool:
    return isinstance(value, str) and _GUID.fullmatch(value) is not None
