"""The jobs of a run, generated the same way by the worker that sends them and the bench that checks them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ENTITY_SET = "contacts"
KEY_FIELD = "emailaddress1"


def actor_email(n: int) -> str:
    """The ``users=N`` seed of a sandbox: actor0001@contoso.com … actorNNNN@contoso.com."""
    return f"actor{n:04d}@contoso.com"


@dataclass(frozen=True)
class Workload:
    """``count`` upserts of distinct contacts; job i acts as actor ``i % actors + 1`` (0 actors: none)."""

    prefix: str
    count: int
    actors: int
    per_job: int = 1  # > 1: bulk jobs ("records"), each of up to per_job records for one actor (W6)

    def key(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}@example.com"

    def actor(self, i: int) -> str | None:
        return actor_email(i % self.actors + 1) if self.actors else None

    def job(self, i: int) -> dict[str, Any]:
        job: dict[str, Any] = {
            "id": f"{self.prefix}-{i:06d}",
            "entity": ENTITY_SET,
            "operation": "upsert",
            "key": {KEY_FIELD: self.key(i)},
            "data": {"firstname": "Bench", "lastname": f"Contact {i}", "jobtitle": "O'Neil & Co / R+D"},
        }
        actor = self.actor(i)
        if actor is not None:
            job["actAs"] = {"email": actor}
        return job

    def bulk_job(self, first: int) -> dict[str, Any]:
        """Records first .. first+per_job-1 (same keys and data as their single jobs) as one bulk job."""
        indexes = range(first, min(first + self.per_job, self.count))
        job: dict[str, Any] = {
            "id": f"{self.prefix}-b{first:06d}",
            "entity": ENTITY_SET,
            "operation": "upsert",
            "records": [{"key": self.job(i)["key"], "data": self.job(i)["data"]} for i in indexes],
        }
        actor = self.actor(first)
        if actor is not None:
            job["actAs"] = {"email": actor}
        return job

    def bodies(self, message_key: str | None = None) -> Iterator[str]:
        """The queue texts; with ``message_key`` each is signed as the webhook signs it (source ``bench``)."""
        from shared.messages import sign

        def text(job: dict[str, Any]) -> str:
            signed = job if message_key is None else sign(job, "bench", message_key)
            return json.dumps(signed, ensure_ascii=False, separators=(",", ":"))

        if self.per_job <= 1:
            for i in range(self.count):
                yield text(self.job(i))
            return
        if self.actors > 1:
            raise ValueError("bulk workloads use one actor (or none): a bulk job acts for one user")
        for first in range(0, self.count, self.per_job):
            yield text(self.bulk_job(first))

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "count": self.count, "actors": self.actors, "per_job": self.per_job}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(str(data["prefix"]), int(data["count"]), int(data["actors"]), int(data.get("per_job", 1)))
